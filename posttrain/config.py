"""Where posttrain keeps its data, and typed recipes loaded from YAML.

A recipe is a pydantic model that forbids unknown keys; loading one reports problems as
`file:line: key: what is wrong`, and `--set a.b=value` overrides are applied before validation
so they are checked exactly like the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from posttrain.errors import PosttrainError


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def settings() -> Settings:
    """POSTTRAIN_HOME (default ./.posttrain) holds the model store and the SQLite database;
    POSTTRAIN_DB_URL points the database elsewhere (e.g. Postgres)."""
    home = Path(os.environ.get("POSTTRAIN_HOME", ".posttrain")).expanduser().absolute()
    try:
        (home / "models").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PosttrainError(f"cannot use data directory {home}: {exc.strerror}") from None
    if not os.access(home, os.W_OK):
        raise PosttrainError(f"data directory {home} is not writable (set POSTTRAIN_HOME)")
    db_url = os.environ.get("POSTTRAIN_DB_URL") or f"sqlite:///{home / 'posttrain.db'}"
    return Settings(home=home, db_url=db_url)


class Recipe(BaseModel):
    """Base of every recipe: strict keys, validated assignment, YAML in and out."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def load(cls: type[R], path: str | Path | None = None, overrides: Iterable[str] = ()) -> R:
        data: dict[str, Any] = {}
        lines: dict[tuple[str, ...], int] = {}
        where = "recipe"
        if path is not None:
            path = Path(path)
            where = str(path)
            data, lines = _read_yaml(path)
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise PosttrainError(f"--set {item!r}: expected key=value (e.g. lora.r=16)")
            _set_dotted(data, key.split("."), yaml.safe_load(raw) if raw else "")
            lines[tuple(key.split("."))] = 0
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = tuple(str(p) for p in (*err["loc"], *(err.get("ctx") or {}).get("where", ())))
            line = _nearest_line(lines, loc)
            at = f"{where}:{line}" if line else ("--set" if line == 0 else where)
            more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
            raise PosttrainError(f"{at}: {'.'.join(loc) or 'recipe'}: {err['msg']}{more}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


R = TypeVar("R", bound=Recipe)


def recipe_error(where: tuple[str | int, ...], message: str) -> PydanticCustomError:
    """For a model validator to raise about one place inside its model (`where`, relative to
    it), so the error names that place's line."""
    return PydanticCustomError("recipe", message.replace("{", "{{").replace("}", "}}"), {"where": where})


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PosttrainError(f"{path}: no such recipe file") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PosttrainError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise PosttrainError(f"{path}:1: a recipe must be a mapping of keys to values")
    lines: dict[tuple[str, ...], int] = {}
    _index_lines(node, (), lines)
    return data, lines


def _index_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (str(key.value),)
            out[path] = key.start_mark.line + 1
            _index_lines(value, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out[prefix + (str(i),)] = value.start_mark.line + 1
            _index_lines(value, prefix + (str(i),), out)


def _nearest_line(lines: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> int | None:
    """The line of the deepest key on the error's path that the file or a --set names. Parts of
    pydantic's location that are no key at all (a union member's tag) are stepped over."""
    prefixes = {key[:end] for key in lines for end in range(1, len(key) + 1)}
    path: tuple[str, ...] = ()
    line = None
    for part in loc:
        if path + (part,) in prefixes:
            path += (part,)
            line = lines.get(path, line)
    return line


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set data[k1][k2]... = value. A numeric key indexes a list, and the index one past its end
    appends (`data.0.path=a.jsonl` without a recipe file, `data.1.path=b.jsonl` to add a source)."""
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) > len(node):
                raise PosttrainError(f"--set {'.'.join(keys)}: {key} is not an index of that list "
                                     f"(it has {len(node)} entries)")
            key = int(key)
            if key == len(node):
                node.append({})
        elif not isinstance(node, dict):
            raise PosttrainError(f"--set {'.'.join(keys)}: {keys[depth - 1]} is not a mapping or list")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = [] if keys[depth + 1].isdigit() else {}
            node = node[key]
