"""Public human votes into the battles table, so judges can be measured against more than our
own arena (`posttrain arena import FILE --format fastchat`).

FastChat publishes two kinds of records, both read from a JSON array (how its scripts write
them), JSON lines, or Parquet (how the Hugging Face copies are stored):
- Chatbot Arena battles (`clean_battle_data.py` output, lmsys/chatbot_arena_conversations):
  model_a, model_b, winner (model_a, model_b, tie, "tie (bothbad)"), tstamp, and usually
  conversation_a / conversation_b as OpenAI messages (the Elo-only releases leave them out:
  such battles rate models but cannot be judged or exported). Source `fastchat`.
- MT-Bench human judgments (lmsys/mt_bench_human_judgments): question_id, model_a, model_b,
  winner (model_a, model_b, tie), judge (author_N, expert_N), turn (1 or 2), and both turns of
  each conversation; the battle keeps the conversation up to the judged turn. Source
  `mt-bench-human`. GPT-4's verdicts in the same format (judge gpt4_pair) are refused: they are
  not human votes.

A record's `session_hash` is the SHA-256 of what it says, so importing a file twice (or two
files that overlap) adds each battle once. The whole file is checked before anything is
written, and written in one transaction: a bad record is `file:record: what is wrong` and
nothing is imported. Records are numbered from 1 (lines, for JSON lines).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import select

from posttrain.errors import PosttrainError
from posttrain.store import Battle, Store, utcnow

FORMATS = ("fastchat",)
ARENA_SOURCE = "fastchat"
MT_BENCH_SOURCE = "mt-bench-human"
WINNERS = {"model_a": "a", "model_b": "b", "tie": "tie", "tie (bothbad)": "bothbad"}
BATCH = 500  # hashes per IN (...) query, well under SQLite's variable limit


@dataclass
class ImportSummary:
    path: Path
    added: dict[str, int] = field(default_factory=dict)  # source -> new battles
    already: int = 0  # records whose battle was already stored (or repeated in the file)

    def __str__(self) -> str:
        added = ", ".join(f"{n} {source}" for source, n in self.added.items() if n) or "nothing new"
        hint = " ".join(f"`posttrain arena leaderboard --source {s}`" for s, n in self.added.items() if n)
        return (f"imported {sum(self.added.values())} battles from {self.path} ({added}); {self.already} already there"
                + (f"; rate them with {hint}" if hint else ""))


def import_battles(store: Store, path: str | Path, fmt: str = "fastchat") -> ImportSummary:
    """Import every record of `path` as a battle, or none (see the module's docstring)."""
    if fmt not in FORMATS:
        raise PosttrainError(f"unknown import format {fmt!r} (one of {', '.join(FORMATS)})")
    path = Path(path)
    rows = []
    for number, record in _records(path):
        try:
            rows.append(_battle(record))
        except ValueError as exc:
            raise PosttrainError(f"{path}:{number}: {exc}") from None
    summary = ImportSummary(path, added={ARENA_SOURCE: 0, MT_BENCH_SOURCE: 0})
    with store.session() as s:
        stored = set()
        for source in {row.source for row in rows}:
            hashes = [row.session_hash for row in rows if row.source == source]
            for i in range(0, len(hashes), BATCH):
                stored |= {(source, h) for h in s.scalars(select(Battle.session_hash).where(
                    Battle.source == source, Battle.session_hash.in_(hashes[i:i + BATCH])))}
        for row in rows:
            if (row.source, row.session_hash) in stored:
                summary.already += 1
                continue
            stored.add((row.source, row.session_hash))
            s.add(row)
            summary.added[row.source] += 1
    return summary


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(record number, record) from a JSON array, JSON lines or Parquet file."""
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise PosttrainError(f"{path}: cannot read it as Parquet ({exc})") from None
        # Through JSON, so nested columns come back as plain lists and dicts.
        yield from enumerate(json.loads(frame.to_json(orient="records")), 1)
        return
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PosttrainError(f"{path}: cannot read the file ({getattr(exc, 'strerror', None) or exc})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as exc:
            raise PosttrainError(f"{path}: not valid JSON ({exc})") from None
        yield from enumerate(records, 1)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                raise PosttrainError(f"{path}:{number}: not valid JSON ({exc})") from None


def _battle(record: Any) -> Battle:
    """The battle a FastChat record describes; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("model_a", "model_b"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{key} must be a model name")
    if record.get("winner") not in WINNERS:
        raise ValueError(f"winner must be one of {', '.join(WINNERS)}, not {record.get('winner')!r}")
    if "tstamp" in record:
        source, turns, voted_at = ARENA_SOURCE, None, _time(record["tstamp"])
    elif "turn" in record and "question_id" in record:
        source, turns, voted_at = MT_BENCH_SOURCE, _mt_bench_turn(record), utcnow()
    else:
        raise ValueError("neither an arena battle (no tstamp) nor an MT-Bench judgment (no question_id and turn)")
    conversations = [_conversation(record, key, turns) for key in ("conversation_a", "conversation_b")]
    if (conversations[0] == []) != (conversations[1] == []):
        raise ValueError("has one conversation but not the other")
    identity = {k: record.get(k) for k in ("model_a", "model_b", "winner", "judge", "question_id", "turn", "tstamp")}
    digest = hashlib.sha256(json.dumps([source, identity, conversations], sort_keys=True).encode()).hexdigest()
    return Battle(session_hash=digest, model_a=record["model_a"], model_b=record["model_b"],
                  conversation_a=conversations[0], conversation_b=conversations[1], vote=WINNERS[record["winner"]],
                  source=source, created_at=voted_at, voted_at=voted_at)


def _time(tstamp: Any) -> datetime:
    if isinstance(tstamp, bool) or not isinstance(tstamp, (int, float)):
        raise ValueError(f"tstamp must be a Unix time in seconds, not {tstamp!r}")
    try:
        return datetime.fromtimestamp(tstamp, timezone.utc).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"tstamp {tstamp!r} is not a usable time") from None


def _mt_bench_turn(record: dict[str, Any]) -> int:
    judge = record.get("judge")
    if not isinstance(judge, str) or not judge.startswith(("author", "expert")):
        raise ValueError(f"judge {judge!r} is not a human (author_N or expert_N): GPT-4's verdicts are not votes")
    if isinstance(record["turn"], bool) or record["turn"] not in (1, 2):
        raise ValueError(f"turn must be 1 or 2, not {record['turn']!r}")
    return record["turn"]


def _conversation(record: dict[str, Any], key: str, turns: int | None) -> list[dict[str, str]]:
    """The messages up to the judged turn (all of them for arena battles); [] when absent."""
    messages = record.get(key)
    if messages is None:
        return []
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages] if isinstance(messages, list) else None
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2) or not all(
            isinstance(m.get("content"), str) for m in messages):
        raise ValueError(f"{key} must be a list of alternating user and assistant messages with text content")
    if turns is not None and len(messages) < 2 * turns:
        raise ValueError(f"{key} has {len(messages) // 2} turn(s), but turn {turns} was judged")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:2 * turns if turns else None]]
