"""Writing files so readers never see half of one: a temporary file beside the target, renamed
into place only once complete (exports, generated data, reports)."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from posttrain.errors import PosttrainError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# mkstemp makes its file private (0600) and the rename keeps that; the finished file gets the
# mode a plain open() would give it (read once at import: os.umask can only be read by setting it).
_FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_open(path: str | Path) -> Iterator[TextIO]:
    """A text file to write `path` through; it replaces `path` only if the block completes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise PosttrainError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line; returns how many."""
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n
