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
            loc = tuple(str(p) for p in err["loc"])
            line = _nearest_line(lines, loc)
            at = f"{where}:{line}" if line else ("--set" if line == 0 else where)
            more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
            raise PosttrainError(f"{at}: {'.'.join(loc) or 'recipe'}: {err['msg']}{more}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


R = TypeVar("R", bound=Recipe)


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
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise PosttrainError(f"--set {'.'.join(keys)}: {key} is not a mapping")
    data[keys[-1]] = value
