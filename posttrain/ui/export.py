"""Votes out of the store: DPO preference pairs (what `posttrain train dpo` reads) or the raw
battles.

DPO rows are TRL's conversational preference format, one JSON object per line:
    {"prompt": [messages, ending with the user turn], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}], "meta": {battle id, models, vote, source, voted_at}}
The winner's last reply is chosen, the loser's rejected. The prompt is the conversation both
models saw; in a multi-turn battle each model saw its own earlier replies, so when the
histories differ the prompt is the winner's (meta.shared_history is false then).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from posttrain.errors import PosttrainError
from posttrain.files import write_jsonl
from posttrain.store import Store
from posttrain.ui.votes import load_battles

FORMATS = ("dpo", "battles")


@dataclass
class ExportSummary:
    out: Path
    unit: str = "preference pairs"
    kept: int = 0
    ties: int = 0
    ties_out: Path | None = None
    winner_history: int = 0  # multi-turn pairs whose histories differed (prompt = the winner's)
    dropped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        lines = [f"kept {self.kept} {self.unit} -> {self.out}"]
        if self.winner_history:
            lines.append(f"  {self.winner_history} of them multi-turn with differing histories (prompt = the winner's)")
        if self.ties_out is not None:
            lines.append(f"wrote {self.ties} ties / both-bad -> {self.ties_out}")
        elif self.ties:
            lines.append(f"excluded {self.ties} ties / both-bad (--ties-out FILE keeps them)")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"dropped {n} {reason}")
        return "\n".join(lines)


def _split(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str] | None:
    """(history ending with the user turn, last assistant reply) or None if malformed."""
    if len(conversation) < 2 or conversation[-1].get("role") != "assistant" or conversation[-2].get("role") != "user":
        return None
    history = [{"role": m["role"], "content": m["content"]} for m in conversation[:-1]]
    return history, str(conversation[-1].get("content") or "")


def preference_pairs(battles, min_length: int = 1) -> tuple[list[dict], list[dict], ExportSummary]:
    """Turn battles (with conversations) into DPO rows and tie/both-bad rows."""
    summary = ExportSummary(out=Path())
    pairs: list[dict] = []
    ties: list[dict] = []
    seen: set[str] = set()
    for b in battles.itertuples(index=False):
        a, bb = _split(b.conversation_a), _split(b.conversation_b)
        if a is None or bb is None:
            summary.dropped["malformed conversations (not ending in a user turn and a reply)"] += 1
            continue
        (history_a, reply_a), (history_b, reply_b) = a, bb
        if not reply_a.strip() or not reply_b.strip():
            summary.dropped["with an empty reply"] += 1
            continue
        if min(len(reply_a.strip()), len(reply_b.strip())) < min_length:
            summary.dropped[f"with a reply shorter than {min_length} characters"] += 1
            continue
        meta = {"battle_id": b.id, "model_a": b.model_a, "model_b": b.model_b, "vote": b.vote,
                "source": b.source, "voted_at": b.voted_at.isoformat(), "shared_history": history_a == history_b}
        if b.vote in ("tie", "bothbad"):
            ties.append({"prompt": history_a, "responses": [
                {"role": "assistant", "content": reply_a}, {"role": "assistant", "content": reply_b}], "meta": meta})
            continue
        won_a = b.vote == "a"
        row = {"prompt": history_a if won_a else history_b,
               "chosen": [{"role": "assistant", "content": reply_a if won_a else reply_b}],
               "rejected": [{"role": "assistant", "content": reply_b if won_a else reply_a}]}
        key = json.dumps(row, sort_keys=True)
        if key in seen:
            summary.dropped["exact duplicates"] += 1
            continue
        seen.add(key)
        pairs.append(row | {"meta": meta | {"chosen_model": b.model_a if won_a else b.model_b,
                                            "rejected_model": b.model_b if won_a else b.model_a}})
        summary.winner_history += not meta["shared_history"]
    summary.kept, summary.ties = len(pairs), len(ties)
    return pairs, ties, summary


def export_votes(store: Store, out: str | Path, fmt: str = "dpo", *, source: str = "human",
                 since: datetime | None = None, until: datetime | None = None, models: Iterable[str] = (),
                 min_length: int = 1, ties_out: str | Path | None = None) -> ExportSummary:
    """Export the votes matching the filters to `out` (JSONL, written atomically). `dpo`:
    preference pairs, ties/both-bad to `ties_out` if given; `battles`: every battle as stored."""
    if fmt not in FORMATS:
        raise PosttrainError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    battles = load_battles(store, source=source, since=since, until=until, models=models, conversations=True)
    if fmt == "battles":
        n = write_jsonl(Path(out), battles.to_dict("records"))
        return ExportSummary(out=Path(out), unit="battles", kept=n)
    pairs, ties, summary = preference_pairs(battles, min_length)
    summary.out = Path(out)
    write_jsonl(summary.out, pairs)
    if ties_out is not None:
        summary.ties_out = Path(ties_out)
        write_jsonl(summary.ties_out, ties)
    return summary
