"""Reading the harvested request logs as training material, a batch at a time, and deleting
them (retention).

What the API's traffic holds that training cannot use is dropped with a reason: requests to
endpoints other than chat (/v1/completions is text, not a conversation), tool calls and non-text content (images, audio),
and conversations that do not end with a user turn.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import ColumnElement, Select, delete, select, text
from sqlalchemy.engine import Row

from posttrain.store import Feedback, RequestLog, Store
from posttrain.train.data import EMPTY_THINK

BATCH = 1000
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def stream(store: Store, stmt: Select, batch: int = BATCH) -> Iterator[Row]:
    """The rows of `stmt`, fetched `batch` at a time (a server-side cursor on Postgres), never
    all of them in memory."""
    with store.engine.connect() as conn:
        result = conn.execution_options(yield_per=batch).execute(stmt)
        for rows in result.partitions():
            yield from rows


def _responses_messages(request: dict[str, Any]) -> list[Any] | None:
    """A Responses API request as chat messages: `instructions` is the system turn, `input` a
    user turn (a string) or the messages themselves (a list)."""
    given = request.get("input")
    messages = [{"role": "user", "content": given}] if isinstance(given, str) else given
    if not isinstance(messages, list):
        return None
    instructions = request.get("instructions")
    return ([{"role": "system", "content": instructions}] if isinstance(instructions, str) else []) + messages


TEXT_PARTS = ("text", "input_text", "output_text")  # chat's text parts, and the Responses API's


def conversation(endpoint: str, request: dict[str, Any]) -> list[dict[str, str]] | str:
    """A chat (or Responses API) request's messages as training turns ({role, content} strings;
    `developer` is a system turn), or the reason they cannot be one."""
    if endpoint not in ("chat", "responses"):
        return f"from /v1/{endpoint} (not a chat conversation)"
    messages = request.get("messages") if endpoint == "chat" else _responses_messages(request)
    if not isinstance(messages, list) or not messages:
        return "without messages"
    turns = []
    for message in messages:
        role = ROLES.get(message.get("role")) if isinstance(message, dict) else None
        content = message.get("content") if role else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str) or message.get("tool_calls"):
            return "with tool calls or non-text content"
        turns.append({"role": role, "content": content})
    if turns[-1]["role"] != "user":
        return "not ending with a user turn (a prefilled answer)"
    return turns


def reply(content: str, reasoning: str | None = None) -> list[dict[str, str]]:
    """An answer as the one assistant turn training reads: a thinking model's trace in the
    `reasoning` field (train/data.py renders it as the `<think>` block Qwen3's template writes),
    and an answer given with thinking off after the empty think block its prompt ended in, as
    posttrain's `thinking: no_think` data has it. None: no thinking involved."""
    if reasoning is not None and reasoning.strip():
        return [{"role": "assistant", "content": content, "reasoning": reasoning}]
    if reasoning is not None:
        return [{"role": "assistant", "content": EMPTY_THINK + content}]
    return [{"role": "assistant", "content": content}]


@dataclass(frozen=True)
class Filters:
    """Which harvested answers an export reads: `models` (any of them; empty: all) and a time
    range [since, until) on the column a kind of export dates its material by."""

    models: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None

    def where(self, when: ColumnElement) -> list[ColumnElement]:
        clauses = [RequestLog.model.in_(self.models)] if self.models else []
        if self.since is not None:
            clauses.append(when >= self.since)
        if self.until is not None:
            clauses.append(when < self.until)
        return clauses


class Seen:
    """Digests of the records written so far, in a temporary SQLite file: exact-duplicate
    removal over any number of rows in constant memory."""

    def __enter__(self) -> Seen:
        self._dir = tempfile.TemporaryDirectory(prefix="posttrain-seen-")
        self._db = sqlite3.connect(Path(self._dir.name) / "seen.db", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (digest BLOB PRIMARY KEY) WITHOUT ROWID")
        self._db.execute("BEGIN")  # never committed: the file is thrown away
        return self

    def add(self, record: dict[str, Any]) -> bool:
        """False if an identical record was added before."""
        digest = hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode(),
                                 digest_size=16).digest()
        return self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (digest,)).rowcount == 1

    def __exit__(self, *exc) -> None:
        self._db.close()
        self._dir.cleanup()


def purge(store: Store, before: datetime, models: Iterable[str] = ()) -> tuple[int, int]:
    """Delete the request logs harvested before `before` (of `models`, if any) and the feedback
    on them; returns (request logs, feedback) deleted. On SQLite the freed pages are zeroed too
    (secure_delete), so the text does not linger in the file."""
    harvested_before = Filters(tuple(models), until=before).where(RequestLog.created_at)
    bulk = {"synchronize_session": False}
    with store.session() as s:
        if store.engine.dialect.name == "sqlite":
            s.execute(text("PRAGMA secure_delete=ON"))
        doomed = select(RequestLog.id).where(*harvested_before)
        feedback = s.execute(delete(Feedback).where(Feedback.request_log_id.in_(doomed)), execution_options=bulk)
        logs = s.execute(delete(RequestLog).where(*harvested_before), execution_options=bulk)
    return logs.rowcount, feedback.rowcount
