"""The checkpoint registry: every model posttrain knows, with its lineage.

Parts meet here: training registers what it writes, serving resolves names to folders (and
adapters to their base), evaluation attaches scores, the arena lists what it can pit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import delete, select

from posttrain.config import Settings, settings
from posttrain.errors import PosttrainError
from posttrain.files import write_atomically
from posttrain.store import Checkpoint, EvalRun, EvalScore, Meta, Store
from posttrain.thinking import FORMATS, detect_thinking

ARENA_ROSTER = "arena_roster"
STAGES = ("pulled", "tiny", "base", "sft", "dpo", "grpo", "merge", "quantize", "distill")
DETECT = "detect"  # Registry.add: find the thinking format from the lineage and the template


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(path: str | Path) -> str:
    """One hash over a folder's files: each file's path inside it and its content's hash, in
    order, so a renamed, added, removed or edited file changes it."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def data_lineage(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of one data source: a file's or a folder's sha256; a dict (a Hub
    dataset's `revision`, or `unhashed` with the reason nothing could be hashed) as it is."""
    if isinstance(source, dict):
        return source
    path = Path(source).absolute()
    try:
        return {"path": str(path), "sha256": folder_sha256(path) if path.is_dir() else file_sha256(path)}
    except OSError as exc:  # moved or deleted while training ran
        return {"path": str(path), "unhashed": f"cannot read it: {exc.strerror}"}


def describe_data(entry: dict[str, Any]) -> str:
    """One line per data source for `models show` and the model card."""
    if entry.get("sha256"):
        return f"{entry['path']}  sha256 {entry['sha256']}"
    if entry.get("revision"):
        return f"{entry['path']}  revision {entry['revision']}"
    return f"{entry['path']}  unhashed ({entry.get('unhashed') or 'no hash recorded'})"


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The posttrain commit that produced a checkpoint (or the package version outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from posttrain import __version__

    return f"v{__version__}"


@dataclass(frozen=True)
class Served:
    """How to load a checkpoint: a full model folder, plus an adapter folder on top if any."""

    base_path: str
    adapter_path: str | None

    @property
    def tokenizer_path(self) -> str:
        """An adapter saved with its own tokenizer (added tokens, its chat template) is read with
        that one; otherwise the base's."""
        if self.adapter_path and (Path(self.adapter_path) / "tokenizer_config.json").exists():
            return self.adapter_path
        return self.base_path


class Registry:
    def __init__(self, cfg: Settings | None = None, store: Store | None = None):
        self.settings = cfg or settings()
        self.store = store or Store(self.settings.db_url)

    def model_dir(self, name: str) -> Path:
        """Where a new checkpoint called `name` should be written."""
        _check_name(name)
        return self.settings.models_dir / name

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A folder to write the checkpoint `name` into. It replaces `model_dir(name)` only when
        the block completes, so a crash or a bad input never leaves half a checkpoint."""
        target = self.model_dir(name)
        with tempfile.TemporaryDirectory(dir=self.settings.models_dir, prefix=f".{name}.") as root:
            tmp = Path(root) / name
            yield tmp
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(tmp), str(target))

    def add(
        self,
        name: str,
        path: str | Path,
        stage: str,
        parent: str | None = None,
        kind: str = "full",
        recipe: dict[str, Any] | None = None,
        datasets: Iterable[str | Path | dict[str, Any]] = (),
        replace: bool = False,
        thinking: str | None = DETECT,
    ) -> Checkpoint:
        """Register a checkpoint folder; data files and folders are hashed into its lineage
        (see `data_lineage`) and a model card with the same facts is written (see `card_path`).
        `thinking`: its format (see `posttrain.thinking`), None for a model that does not think."""
        _check_name(name)
        _check_thinking(thinking, allow_detect=True)
        if stage not in STAGES:
            raise PosttrainError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
        if kind not in ("full", "adapter"):
            raise PosttrainError(f"unknown kind {kind!r} (full or adapter)")
        path = Path(path).absolute()
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise PosttrainError(f"{path}: not a Hugging Face model folder (no config.json)")
        if parent is not None:
            parent_row = self.get(parent)
            if kind == "adapter" and parent_row.kind != "full":
                raise PosttrainError(f"adapter {name}: its parent {parent} must be a full model")
        elif kind == "adapter":
            raise PosttrainError(f"adapter {name}: needs the parent it was trained on")
        if thinking == DETECT:
            thinking = detect_thinking(path, recipe, parent_row.thinking if parent is not None else None)
        row = Checkpoint(
            name=name, path=str(path), kind=kind, stage=stage, parent=parent,
            recipe=recipe or {}, git_commit=git_commit(),
            datasets=[data_lineage(d) for d in datasets], thinking=thinking,
        )
        with self.store.session() as s:
            existing = s.scalar(select(Checkpoint).where(Checkpoint.name == name))
            if existing is not None:
                if not replace:
                    raise PosttrainError(f"a model named {name!r} is already registered")
                s.delete(existing)
                s.flush()
            s.add(row)
        self.write_card(row)
        return row

    def find(self, name: str) -> Checkpoint | None:
        with self.store.session() as s:
            return s.scalar(select(Checkpoint).where(Checkpoint.name == name))

    def get(self, name: str) -> Checkpoint:
        row = self.find(name)
        if row is None:
            known = ", ".join(c.name for c in self.list()) or "none registered yet"
            raise PosttrainError(f"unknown model {name!r} (known: {known})")
        return row

    def list(self) -> list[Checkpoint]:
        return self.store.all(Checkpoint, order_by=Checkpoint.created_at)

    def remove(self, name: str, delete_files: bool = False) -> Checkpoint:
        row = self.get(name)
        children = [c.name for c in self.list() if c.parent == name]
        if children:
            raise PosttrainError(f"cannot remove {name}: {', '.join(children)} derive from it")
        with self.store.session() as s:
            s.execute(delete(Checkpoint).where(Checkpoint.name == name))
        if delete_files and Path(row.path).is_relative_to(self.settings.models_dir):
            shutil.rmtree(row.path, ignore_errors=True)
        if not Path(row.path).is_relative_to(self.settings.models_dir):
            self.card_path(row).unlink(missing_ok=True)
        return row

    def set_thinking(self, name: str, thinking: str | None) -> Checkpoint:
        """Record a checkpoint's thinking format by hand (one registered before posttrain recorded
        it, or one the detection got wrong)."""
        _check_thinking(thinking)
        self.get(name)  # an unknown name: the error that lists the known ones
        with self.store.session() as s:
            row = s.scalar(select(Checkpoint).where(Checkpoint.name == name))
            row.thinking = thinking
        self.write_card(row)
        return row

    def lineage(self, name: str) -> list[Checkpoint]:
        """The checkpoint and its ancestors, newest first."""
        chain = [self.get(name)]
        while chain[-1].parent is not None:
            chain.append(self.get(chain[-1].parent))
        return chain

    def served(self, name: str) -> Served:
        row = self.get(name)
        if row.kind == "adapter":
            return Served(base_path=self.get(row.parent).path, adapter_path=row.path)
        return Served(base_path=row.path, adapter_path=None)

    def arena_roster(self) -> list[str]:
        """Models that joined the arena (a pipeline's serve stage, a promoted loop candidate);
        `posttrain up` serves them beside the default pair."""
        with self.store.session() as s:
            row = s.get(Meta, ARENA_ROSTER)
            return json.loads(row.value) if row is not None else []

    def enter_arena(self, name: str) -> None:
        self.get(name)
        with self.store.session() as s:
            row = s.get(Meta, ARENA_ROSTER) or s.merge(Meta(key=ARENA_ROSTER, value="[]"))
            row.value = json.dumps(list(dict.fromkeys([*json.loads(row.value), name])))

    def latest_scores(self, name: str) -> list[EvalScore]:
        """The newest score per (task, metric) for a model."""
        with self.store.session() as s:
            rows = s.scalars(
                select(EvalScore).join(EvalRun, EvalRun.id == EvalScore.run_id)
                .where(EvalScore.model == name, EvalRun.status == "done")
                .order_by(EvalScore.created_at.desc(), EvalScore.id.desc())
            )
            latest: dict[tuple[str, str], EvalScore] = {}
            for row in rows:
                latest.setdefault((row.task, row.metric), row)
            return list(latest.values())

    def card_path(self, row: Checkpoint) -> Path:
        """README.md inside the checkpoints posttrain wrote (the model store). A folder registered
        from elsewhere is the user's: its own card stays, and in a Hugging Face cache snapshot a
        README.md is a link into shared blobs. Its card goes to $POSTTRAIN_HOME/cards/NAME.md."""
        if Path(row.path).is_relative_to(self.settings.models_dir):
            return Path(row.path) / "README.md"
        return self.settings.home / "cards" / f"{row.name}.md"

    def write_card(self, row: Checkpoint) -> None:
        chain = " <- ".join(c.name for c in self.lineage(row.name))
        data = "\n".join(f"- `{describe_data(d)}`" for d in row.datasets) or "- none"
        card = (
            f"---\nlibrary_name: {'peft' if row.kind == 'adapter' else 'transformers'}\n"
            f"tags: [posttrain, {row.stage}]\n---\n\n# {row.name}\n\n"
            f"Produced by posttrain (commit `{row.git_commit}`), stage **{row.stage}**, "
            f"{row.kind} checkpoint, created {row.created_at:%Y-%m-%d %H:%M} UTC.\n\n"
            + (f"Thinks before it answers ({row.thinking} format).\n\n" if row.thinking else "")
            + f"## Lineage\n\n{chain}\n\n## Data\n\n{data}\n\n"
            f"## Recipe\n\n```yaml\n{_yaml(row.recipe)}```\n"
        )
        # Replaced, never written through: a link in place of README.md keeps its target.
        write_atomically(self.card_path(row), card)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False) if data else "{}\n"


def _check_thinking(thinking: str | None, allow_detect: bool = False) -> None:
    if thinking is not None and thinking not in FORMATS and not (allow_detect and thinking == DETECT):
        raise PosttrainError(f"unknown thinking format {thinking!r} (one of {', '.join(FORMATS)}, or none)")


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise PosttrainError(f"invalid model name {name!r}: use letters, digits, '-', '_' and '.'")
