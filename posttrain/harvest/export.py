"""Training data from the API's traffic (`posttrain data export`): the JSONL `posttrain train
sft` and `train dpo` read as they are, written atomically, with a summary of what was kept and
why the rest was dropped. The store is read a batch at a time and duplicates are tracked on
disk, so memory stays flat however many requests were harvested.

SFT (`{"messages": [...]}`): each harvested chat answer after its conversation, filtered by
model, harvest time and answer length. An answer someone corrected is replaced by the (latest)
correction; one rated down on balance is dropped (`--positive-only` keeps only answers rated
up on balance or corrected).

DPO (`{"prompt", "chosen", "rejected", "meta"}`, TRL's conversational preference format; the
same as the arena export) from these sources, each pair's `meta.source` saying which:
- `feedback-choice`: a request with n > 1 where feedback rated a choice up: it is chosen over
  each choice of that request not rated up;
- `feedback-correction`: a correction (chosen) over the answer it corrects (rejected);
- `feedback-thumbs`: an answer rated up over one rated down, both to the same prompt (in
  different requests, any served model);
- `arena`: the arena's votes (`posttrain.ui.export.preference_pairs`; `meta.source` is the
  vote's, arena or side-by-side).
Ratings of one answer by several keys are summed. The time range applies to when the feedback
(the vote) was given, so a later export picks up new feedback on old answers.

Thinking models: an answer keeps its trace in the assistant message's `reasoning` field, which
train/data.py renders as the `<think>` block Qwen3's chat template writes; an answer given with
thinking off follows the empty think block its prompt ended in (`harvest.logs.reply`). A
correction is a person's answer, without a trace: after an empty think block where it replaces
a thinking model's answer. A pair whose one side thought and the other did not is flagged
(`meta.mode_mismatch`) and counted, or left out with `drop_mode_mismatch`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy import func, select

from posttrain.errors import PosttrainError
from posttrain.files import write_jsonl
from posttrain.harvest.logs import Filters, Seen, conversation, reply, stream
from posttrain.harvest.pii import Scrubber
from posttrain.store import Feedback, RequestLog, Store
from posttrain.thinking import MISMATCH_DROPPED, flag_mode_mismatch, has_trace, mismatch_line
from posttrain.train.data import THINK_OPEN, BadRecord, split_thinking, to_dpo, to_sft

KINDS = ("sft", "dpo")
FEEDBACK_SOURCES = ("choice", "correction", "thumbs")
DPO_SOURCES = (*FEEDBACK_SOURCES, "arena")
LOG_COLUMNS = (RequestLog.model, RequestLog.endpoint, RequestLog.request, RequestLog.completion,
               RequestLog.response_id, RequestLog.reasoning)


@dataclass
class HarvestSummary:
    out: Path
    unit: str
    kept: int = 0
    by_source: Counter = field(default_factory=Counter)
    corrected: int = 0
    thought: int = 0  # SFT conversations whose answer carries a reasoning trace
    mismatched: int = 0  # kept pairs whose one side thought and the other did not
    dropped: Counter = field(default_factory=Counter)
    scrubber: Scrubber | None = None

    def __str__(self) -> str:
        lines = [f"kept {self.kept} {self.unit} -> {self.out}"]
        if self.by_source:
            lines.append("  by source: " + ", ".join(f"{s} {n}" for s, n in sorted(self.by_source.items())))
        if self.corrected:
            lines.append(f"  {self.corrected} with the answer replaced by a user's correction")
        if self.thought:
            lines.append(f"  {self.thought} with the model's reasoning trace (the assistant's `reasoning` field)")
        if self.mismatched:
            lines.append(mismatch_line(self.mismatched))
        if self.scrubber is not None:
            lines.append(str(self.scrubber))
        lines += [f"dropped {n} {reason}" for reason, n in sorted(self.dropped.items())]
        return "\n".join(lines)


class _Checks:
    """The last steps every exported record takes: PII masking, the training loader's own
    validation, exact-duplicate removal."""

    def __init__(self, summary: HarvestSummary, seen: Seen, validate: Callable[[dict], Any], min_length: int):
        self.summary, self.seen, self.validate, self.min_length = summary, seen, validate, min_length

    def short(self, *answers: str) -> bool:
        """Whether an answer is too short; an empty think block before it does not count."""
        if min(len(split_thinking(a)[1].strip()) for a in answers) >= self.min_length:
            return False
        self.summary.dropped["with an empty answer" if self.min_length <= 1 else
                              f"with an answer shorter than {self.min_length} characters"] += 1
        return True

    def passed(self, record: dict[str, Any]) -> bool:
        if (scrubber := self.summary.scrubber) is not None:
            for key in ("messages", "prompt", "chosen", "rejected"):
                if key in record:  # a trace may quote the user's personal data as well
                    record[key] = [m | {k: scrubber.scrub(m[k]) for k in ("content", "reasoning") if k in m}
                                   for m in record[key]]
        try:
            self.validate(record)
        except BadRecord:
            self.summary.dropped["refused by the training data checks (e.g. a broken <think> block)"] += 1
            return False
        if not self.seen.add({k: v for k, v in record.items() if k != "meta"}):
            self.summary.dropped["exact duplicates"] += 1
            return False
        return True


def _rated() -> Any:
    """Per answer with feedback: the sum of its ratings and when it was last given."""
    return (select(Feedback.request_log_id, func.coalesce(func.sum(Feedback.rating), 0).label("score"),
                   func.max(Feedback.created_at).label("rated_at"))
            .group_by(Feedback.request_log_id).subquery())


def export_sft(store: Store, out: str | Path, filters: Filters = Filters(), *, min_length: int = 1,
               positive_only: bool = False, scrub_pii: bool = False) -> HarvestSummary:
    """Harvested chat answers as SFT conversations (see the module docstring); written to `out`."""
    summary = HarvestSummary(Path(out), "conversations", scrubber=Scrubber() if scrub_pii else None)
    rated = _rated()
    correction = (select(Feedback.correction).where(Feedback.request_log_id == RequestLog.id,
                                                    Feedback.correction.is_not(None))
                  .order_by(Feedback.id.desc()).limit(1).correlate(RequestLog).scalar_subquery())
    stmt = (select(*LOG_COLUMNS, func.coalesce(rated.c.score, 0).label("score"), correction.label("correction"))
            .outerjoin(rated, rated.c.request_log_id == RequestLog.id)
            .where(*filters.where(RequestLog.created_at)).order_by(RequestLog.id))

    def records(checks: _Checks) -> Iterator[dict[str, Any]]:
        for row in stream(store, stmt):
            turns = conversation(row.endpoint, row.request)
            if isinstance(turns, str):
                summary.dropped[turns] += 1
            elif row.correction is None and row.score < 0:
                summary.dropped["rated down"] += 1
            elif positive_only and row.correction is None and row.score <= 0:
                summary.dropped["not rated up (--positive-only)"] += 1
            elif not checks.short(row.correction or row.completion):
                answer = _corrected(row.correction, row.reasoning) if row.correction is not None \
                    else reply(row.completion, row.reasoning)
                record = {"messages": turns + answer}
                if checks.passed(record):
                    summary.corrected += row.correction is not None
                    summary.thought += has_trace(answer[0])
                    yield record

    return _write(summary, lambda record: to_sft("messages", record), min_length, records)


def _write(summary: HarvestSummary, validate: Callable[[dict], Any], min_length: int,
           records: Callable[[_Checks], Iterable[dict[str, Any]]]) -> HarvestSummary:
    with Seen() as seen:
        summary.kept = write_jsonl(summary.out, records(_Checks(summary, seen, validate, min_length)))
    return summary


def export_dpo(store: Store, out: str | Path, filters: Filters = Filters(), *, sources: Iterable[str] = DPO_SOURCES,
               min_length: int = 1, scrub_pii: bool = False, arena_source: str = "human",
               drop_mode_mismatch: bool = False) -> HarvestSummary:
    """Preference pairs from feedback and arena votes (see the module docstring); written to `out`."""
    sources = list(dict.fromkeys(sources))
    if unknown := [s for s in sources if s not in DPO_SOURCES]:
        raise PosttrainError(f"unknown preference source {unknown[0]!r} (one of {', '.join(DPO_SOURCES)})")
    summary = HarvestSummary(Path(out), "preference pairs", scrubber=Scrubber() if scrub_pii else None)
    makers = {"choice": _choice_pairs, "correction": _correction_pairs, "thumbs": _thumbs_pairs}

    def records(checks: _Checks) -> Iterator[dict[str, Any]]:
        for source in sources:
            pairs = (_arena_pairs(store, filters, arena_source, min_length, summary) if source == "arena"
                     else makers[source](store, filters, summary))
            for pair in pairs:
                mismatched = flag_mode_mismatch(pair)
                if pair["chosen"] == pair["rejected"]:
                    summary.dropped["with the same answer chosen and rejected"] += 1
                elif mismatched and drop_mode_mismatch:
                    summary.dropped[MISMATCH_DROPPED] += 1
                elif not checks.short(pair["chosen"][0]["content"], pair["rejected"][0]["content"]) \
                        and checks.passed(pair):
                    summary.by_source[pair["meta"]["source"]] += 1
                    summary.mismatched += mismatched
                    yield pair

    return _write(summary, lambda record: to_dpo("preference", record), min_length, records)


def _pair(prompt: list[dict], chosen: Any, rejected: Any, **meta: Any) -> dict[str, Any]:
    """A pair of two harvested answers (rows with `completion` and `reasoning`)."""
    return {"prompt": prompt, "chosen": reply(chosen.completion, chosen.reasoning),
            "rejected": reply(rejected.completion, rejected.reasoning), "meta": meta}


def _corrected(correction: str, reasoning: str | None) -> list[dict[str, str]]:
    """A correction as the answer: a person's text has no trace, so where it replaces a thinking
    model's answer (`reasoning` not None) it follows an empty think block, unless the person
    wrote a think block themselves."""
    thinking_model = reasoning is not None and not correction.lstrip().startswith(THINK_OPEN)
    return reply(correction, "" if thinking_model else None)


def _prompt(row: Any, summary: HarvestSummary) -> list[dict[str, str]] | None:
    """The conversation a feedback pair's prompt is, or None (counted) when it cannot be one."""
    turns = conversation(row.endpoint, row.request)
    if isinstance(turns, str):
        summary.dropped[f"feedback on answers {turns}"] += 1
        return None
    return turns


def _choice_pairs(store: Store, filters: Filters, summary: HarvestSummary) -> Iterator[dict[str, Any]]:
    rated = _rated()
    picked = (select(RequestLog.response_id).join(rated, rated.c.request_log_id == RequestLog.id)
              .where(rated.c.score > 0, *filters.where(rated.c.rated_at)))
    stmt = (select(*LOG_COLUMNS, RequestLog.choice, func.coalesce(rated.c.score, 0).label("score"))
            .outerjoin(rated, rated.c.request_log_id == RequestLog.id)
            .where(RequestLog.response_id.in_(picked))
            .order_by(RequestLog.response_id, RequestLog.choice))
    for response_id, group in groupby(stream(store, stmt), key=lambda row: row.response_id):
        rows = list(group)
        if len(rows) < 2 or (prompt := _prompt(rows[0], summary)) is None:
            continue
        for up in (r for r in rows if r.score > 0):
            for other in (r for r in rows if r.score <= 0):
                yield _pair(prompt, up, other, source="feedback-choice", model=up.model,
                            response_id=response_id, chosen_choice=up.choice, rejected_choice=other.choice)


def _correction_pairs(store: Store, filters: Filters, summary: HarvestSummary) -> Iterator[dict[str, Any]]:
    stmt = (select(*LOG_COLUMNS, Feedback.correction, Feedback.created_at.label("rated_at"))
            .join(Feedback, Feedback.request_log_id == RequestLog.id)
            .where(Feedback.correction.is_not(None), *filters.where(Feedback.created_at)).order_by(Feedback.id))
    for row in stream(store, stmt):
        if (prompt := _prompt(row, summary)) is not None:
            yield {"prompt": prompt, "chosen": _corrected(row.correction, row.reasoning),
                   "rejected": reply(row.completion, row.reasoning),
                   "meta": {"source": "feedback-correction", "model": row.model, "response_id": row.response_id,
                            "rated_at": row.rated_at.isoformat()}}


def _thumbs_pairs(store: Store, filters: Filters, summary: HarvestSummary) -> Iterator[dict[str, Any]]:
    rated = _rated()
    stmt = (select(*LOG_COLUMNS, RequestLog.prompt_hash, rated.c.score)
            .join(rated, rated.c.request_log_id == RequestLog.id)
            .where(rated.c.score != 0, RequestLog.prompt_hash.is_not(None), *filters.where(rated.c.rated_at))
            .order_by(RequestLog.prompt_hash, RequestLog.id))
    for _, group in groupby(stream(store, stmt), key=lambda row: row.prompt_hash):
        rows = list(group)
        ups, downs = [r for r in rows if r.score > 0], [r for r in rows if r.score < 0]
        if not ups or not downs or (prompt := _prompt(rows[0], summary)) is None:
            continue
        for up in ups:
            # Two choices of one request are feedback-choice's pair already.
            for down in (d for d in downs if d.response_id != up.response_id):
                yield _pair(prompt, up, down, source="feedback-thumbs",
                            chosen_model=up.model, rejected_model=down.model,
                            chosen_response_id=up.response_id, rejected_response_id=down.response_id)


def _arena_pairs(store: Store, filters: Filters, source: str, min_length: int,
                 summary: HarvestSummary) -> list[dict[str, Any]]:
    """The arena export's pairs (ties and both-bad are not preferences and stay out)."""
    from posttrain.ui.export import preference_pairs
    from posttrain.ui.votes import load_battles

    battles = load_battles(store, source=source, since=filters.since, until=filters.until, models=filters.models,
                           conversations=True)
    pairs, _, arena = preference_pairs(battles, min_length)
    summary.dropped.update({f"arena votes {reason}": n for reason, n in arena.dropped.items()})
    if arena.ties:
        summary.dropped["arena votes that were ties or both-bad"] += arena.ties
    return pairs
