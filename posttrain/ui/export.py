"""Votes out of the store: DPO preference pairs (what `posttrain train dpo` reads) or the raw
battles.

DPO rows are TRL's conversational preference format, one JSON object per line:
    {"prompt": [messages, ending with the user turn], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}], "meta": {battle id, models, vote, source, voted_at,
     thinking: the mode of an arena battle that recorded one}}
The winner's last reply is chosen, the loser's rejected. The prompt is the conversation both
models saw; in a multi-turn battle each model saw its own earlier replies, so when the
histories differ the prompt is the winner's (meta.shared_history is false then).

A thinking model's reply keeps its trace (an assistant `reasoning` or `reasoning_content` field in
the stored conversation) as the chosen / rejected message's `reasoning` field, which
train/data.py renders as Qwen3's `<think>` block; earlier turns' traces are left out of the
prompt, as Qwen3's template leaves them out. A pair whose one side thought and the other did not
is flagged (meta.mode_mismatch) and counted, or left out with `drop_mode_mismatch`.

Replies the user regenerated away on a voted turn are weak preferences: each is rejected
against the reply that replaced it, on the same side, with its own trace if it thought
(meta.source "arena-regenerate", meta.weak true; `regenerated=False` leaves them out). Ties and
both-bad votes keep them too: the user still asked for another answer.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from posttrain.errors import PosttrainError
from posttrain.files import write_jsonl
from posttrain.store import Store
from posttrain.thinking import MISMATCH_DROPPED, MODE_MISMATCH, flag_mode_mismatch, mismatch_line
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
    weak: int = 0  # pairs from regenerated replies
    mismatched: int = 0  # kept pairs whose one side thought and the other did not
    dropped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        lines = [f"kept {self.kept} {self.unit} -> {self.out}"]
        if self.weak:
            lines.append(f"  {self.weak} of them weak, from regenerated replies (meta.source arena-regenerate)")
        if self.winner_history:
            lines.append(f"  {self.winner_history} of them multi-turn with differing histories (prompt = the winner's)")
        if self.mismatched:
            lines.append(mismatch_line(self.mismatched))
        if self.ties_out is not None:
            lines.append(f"wrote {self.ties} ties / both-bad -> {self.ties_out}")
        elif self.ties:
            lines.append(f"excluded {self.ties} ties / both-bad (--ties-out FILE keeps them)")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"dropped {n} {reason}")
        return "\n".join(lines)


def _split(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]] | None:
    """(history ending with the user turn, last assistant reply as a message) or None if malformed."""
    if len(conversation) < 2 or conversation[-1].get("role") != "assistant" or conversation[-2].get("role") != "user":
        return None
    history = [{"role": m["role"], "content": m["content"]} for m in conversation[:-1]]
    return history, _reply(conversation[-1])


def _reply(stored: dict[str, Any] | str) -> dict[str, str]:
    """A stored reply as the assistant message a pair carries: its text, and its trace if it
    thought. A regenerated reply stored before revision 0006 is its text alone."""
    stored = {"content": stored} if isinstance(stored, str) else stored
    reply = {"role": "assistant", "content": str(stored.get("content") or "")}
    trace = stored.get("reasoning") or stored.get("reasoning_content")
    if isinstance(trace, str) and trace.strip():
        reply["reasoning"] = trace
    return reply


def _regenerated_pairs(battle, sides: dict[str, tuple[list, dict]], meta: dict[str, Any]) -> list[dict]:
    pairs = []
    for side, replaced in (getattr(battle, "regenerated", None) or {}).items():
        history, final = sides[side]
        model = getattr(battle, f"model_{side}")
        olds = [_reply(old) for old in replaced]
        pairs += [{"prompt": history, "chosen": [final], "rejected": [old],
                   "meta": meta | {"source": "arena-regenerate", "weak": True, "chosen_model": model,
                                   "rejected_model": model}}
                  for old in olds if old["content"].strip() and old["content"] != final["content"]]
    return pairs


def _mode_mismatches(pairs: list[dict], summary: ExportSummary, drop: bool) -> list[dict]:
    """The pairs, mode-mismatched ones flagged and counted, or left out when `drop`."""
    kept = []
    for pair in pairs:
        if flag_mode_mismatch(pair) and drop:
            summary.dropped[MISMATCH_DROPPED] += 1
            continue
        summary.mismatched += pair["meta"].get(MODE_MISMATCH, False)
        kept.append(pair)
    return kept


def preference_pairs(battles, min_length: int = 1, regenerated: bool = True,
                     drop_mode_mismatch: bool = False) -> tuple[list[dict], list[dict], ExportSummary]:
    """Turn battles (with conversations) into DPO rows and tie/both-bad rows."""
    summary = ExportSummary(out=Path())
    pairs: list[dict] = []
    ties: list[dict] = []
    weak: list[dict] = []
    seen: set[str] = set()
    for b in battles.itertuples(index=False):
        a, bb = _split(b.conversation_a), _split(b.conversation_b)
        if a is None or bb is None:
            summary.dropped["malformed conversations (not ending in a user turn and a reply)"] += 1
            continue
        (history_a, message_a), (history_b, message_b) = a, bb
        reply_a, reply_b = message_a["content"], message_b["content"]
        if not reply_a.strip() or not reply_b.strip():
            summary.dropped["with an empty reply"] += 1
            continue
        if min(len(reply_a.strip()), len(reply_b.strip())) < min_length:
            summary.dropped[f"with a reply shorter than {min_length} characters"] += 1
            continue
        meta = {"battle_id": b.id, "model_a": b.model_a, "model_b": b.model_b, "vote": b.vote,
                "source": b.source, "voted_at": b.voted_at.isoformat(), "shared_history": history_a == history_b}
        if isinstance(getattr(b, "thinking", None), (bool, np.bool_)):  # the mode both sides ran in, if recorded
            meta["thinking"] = bool(b.thinking)
        if regenerated:
            weak += _regenerated_pairs(b, {"a": (history_a, message_a), "b": (history_b, message_b)}, meta)
        if b.vote in ("tie", "bothbad"):
            ties.append({"prompt": history_a, "responses": [message_a, message_b], "meta": meta})
            continue
        won_a = b.vote == "a"
        row = {"prompt": history_a if won_a else history_b,
               "chosen": [message_a if won_a else message_b], "rejected": [message_b if won_a else message_a]}
        key = json.dumps(row, sort_keys=True)
        if key in seen:
            summary.dropped["exact duplicates"] += 1
            continue
        seen.add(key)
        pairs.append(row | {"meta": meta | {"chosen_model": b.model_a if won_a else b.model_b,
                                            "rejected_model": b.model_b if won_a else b.model_a}})
        summary.winner_history += not meta["shared_history"]
    pairs = _mode_mismatches(pairs + weak, summary, drop_mode_mismatch)
    summary.weak = sum(bool(p["meta"].get("weak")) for p in pairs)
    summary.kept, summary.ties = len(pairs), len(ties)
    return pairs, ties, summary


def export_votes(store: Store, out: str | Path, fmt: str = "dpo", *, source: str = "human",
                 since: datetime | None = None, until: datetime | None = None, models: Iterable[str] = (),
                 min_length: int = 1, ties_out: str | Path | None = None,
                 regenerated: bool = True, drop_mode_mismatch: bool = False) -> ExportSummary:
    """Export the votes matching the filters to `out` (JSONL, written atomically). `dpo`:
    preference pairs, ties/both-bad to `ties_out` if given; `battles`: every battle as stored."""
    if fmt not in FORMATS:
        raise PosttrainError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    battles = load_battles(store, source=source, since=since, until=until, models=models, conversations=True)
    if fmt == "battles":
        n = write_jsonl(Path(out), battles.to_dict("records"))
        return ExportSummary(out=Path(out), unit="battles", kept=n)
    pairs, ties, summary = preference_pairs(battles, min_length, regenerated, drop_mode_mismatch)
    summary.out = Path(out)
    write_jsonl(summary.out, pairs)
    if ties_out is not None:
        summary.ties_out = Path(ties_out)
        write_jsonl(summary.ties_out, ties)
    return summary
