"""Where posttrain keeps its data, and typed recipes loaded from YAML.

A recipe is a pydantic model that forbids unknown keys; loading one reports problems as
`file:line: key: what is wrong`, and `--set a.b=value` overrides are applied before validation
so they are checked exactly like the file. SET_VALUES says how a `--set` value is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

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
    def load(cls: type[R], path: str | Path | None = None, overrides: Iterable[str] = (),
             values: Mapping[str, Any] | None = None) -> R:
        """The recipe file, then `--set key=value` overrides, then `values`: dotted keys a CLI
        flag already typed (a teacher name, an API key, a path), taken as they are."""
        data: dict[str, Any] = {}
        lines: dict[tuple[str, ...], int] = {}
        where = "recipe"
        if path is not None:
            path = Path(path)
            where = str(path)
            data, lines = _read_yaml(path)
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key or not key.isprintable():
                raise PosttrainError(f"--set {item!r}: expected key=value (e.g. lora.r=16)")
            _set_dotted(data, key.split("."), override_value(key, raw))
            lines[tuple(key.split("."))] = 0
        for key, value in (values or {}).items():
            _set_dotted(data, key.split("."), value)
            lines[tuple(key.split("."))] = 0
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = tuple(str(p) for p in (*err["loc"], *(err.get("ctx") or {}).get("where", ())))
            line = _nearest_line(lines, loc)
            at = f"{where}:{line}" if line else ("--set" if line == 0 else where)
            more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
            # Keys and messages can quote what the user typed, line breaks included: keep one line.
            what = f"{'.'.join(loc) or 'recipe'}: {err['msg']}".replace("\n", "\\n")
            raise PosttrainError(f"{at}: {what}{more}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


R = TypeVar("R", bound=Recipe)

# Help text, so no square brackets: Typer's rich markup would swallow them.
SET_VALUES = ("A value is read as YAML when it is a number, true/false, null, a quoted string, or a list or "
              "mapping in brackets or braces; anything else is the text as typed (a: b, *x, @x and 2024-01-01 "
              "stay text). Quote to keep a string: --set output=\"'2024'\".")
_NULLS = ("~", "null", "Null", "NULL")
# Anchors, aliases, tags and block structure in a one-line value are text a user typed, not YAML
# they meant: `--set system_prompt=Note: be brief` is that sentence, not a mapping.
_NOT_A_VALUE = (yaml.AnchorToken, yaml.AliasToken, yaml.TagToken, yaml.DirectiveToken, yaml.DocumentStartToken,
                yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.BlockEntryToken)


def override_value(key: str, raw: str) -> Any:
    """The value of `--set key=raw` (see SET_VALUES)."""
    if raw.lstrip()[:1] in ("[", "{"):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise PosttrainError(f"--set {key}: invalid YAML {'list' if raw.lstrip()[0] == '[' else 'mapping'}: "
                                 f"{problem}") from None
    try:
        tokens = list(yaml.scan(raw))
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    scalars = [t for t in tokens if isinstance(t, yaml.ScalarToken)]
    if any(isinstance(t, _NOT_A_VALUE) for t in tokens) or len(scalars) != 1:
        return raw
    if isinstance(value, (bool, int, float)) or (value is None and raw.strip() in _NULLS):
        return value
    # A quoted string is what its quotes hold; any other text (a date too) is kept as typed.
    return value if isinstance(value, str) and not scalars[0].plain else raw


def recipe_error(where: tuple[str | int, ...], message: str) -> PydanticCustomError:
    """For a model validator to raise about one place inside its model (`where`, relative to
    it), so the error names that place's line."""
    return PydanticCustomError("recipe", message.replace("{", "{{").replace("}", "}}"), {"where": where})


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PosttrainError(f"{path}: no such recipe file") from None
    except UnicodeDecodeError as exc:
        raise PosttrainError(f"{path}: not UTF-8 text (at byte {exc.start + 1})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except RecursionError:
        raise PosttrainError(f"{path}: invalid YAML: nested too deeply") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise PosttrainError(f"{path}{line}: invalid YAML: {exc.problem or exc.context or 'unreadable'}") from None
    except yaml.reader.ReaderError as exc:  # a control character or invalid Unicode
        line = text.count("\n", 0, exc.position) + 1
        raise PosttrainError(f"{path}:{line}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise PosttrainError(f"{path}:1: a recipe must be a mapping of keys to values")
    return data, _key_lines(path, node)


def _key_lines(path: Path, root: yaml.Node) -> dict[tuple[str, ...], int]:
    """Each key's line. An alias repeats its anchor's node, which is indexed once, under the
    anchor (so aliases cannot multiply the work); a node that contains itself is refused."""
    lines: dict[tuple[str, ...], int] = {}
    done: set[int] = set()

    def walk(node: yaml.Node, prefix: tuple[str, ...], open_nodes: frozenset[int]) -> None:
        if id(node) in open_nodes:
            raise PosttrainError(f"{path}:{node.start_mark.line + 1}: invalid YAML: an alias refers to the "
                                 "mapping or list that contains it")
        if id(node) in done:
            return
        done.add(id(node))
        children: list[tuple[str, int, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            children = [(str(key.value), key.start_mark.line + 1, value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(str(i), value.start_mark.line + 1, value) for i, value in enumerate(node.value)]
        for key, line, child in children:
            lines.setdefault(prefix + (key,), line)
            walk(child, prefix + (key,), open_nodes | {id(node)})

    walk(root, (), frozenset())
    return lines


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
            if not _is_index(key) or int(key) > len(node):
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
                node[key] = [] if _is_index(keys[depth + 1]) else {}
            node = node[key]


def _is_index(key: str) -> bool:
    # str.isdigit() also accepts digits int() refuses, like "²".
    return key.isascii() and key.isdigit()
