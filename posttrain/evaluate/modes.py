"""Evaluating thinking models in both modes (`--thinking on|off|both`).

A mode reaches a model through its chat template (vLLM's `chat_template_kwargs:
{"enable_thinking": bool}`, which the front door passes to `qwen3` models), and the served
model's reasoning parser returns the trace apart from the answer, so what is scored (and what a
judge reads) is the answer alone; the tokens each mode spent are stored beside its scores.

Storage: a score measured in a mode is stored under its task name with the mode as a suffix
(`mt_bench@think`, `gsm8k@no_think`), not in a new column. Everything that reads the history
(the report's previous-run and baseline comparisons, its regression rules, score-over-time
plots, `models show`) keys scores by task and metric already, so a mode is its own series with
no change there and no migration, and a run without `--thinking` keeps the plain task names its
history has. Only the side-by-side table needs to read the suffix back (`split_task`).
"""

from __future__ import annotations

from typing import Any, Iterable

from posttrain.errors import PosttrainError
from posttrain.evaluate.runs import Score

CHOICES = ("on", "off", "both")
SUFFIX = {True: "@think", False: "@no_think"}
LABEL = {True: "thinking", False: "not thinking"}
# Tokens spent per sample (the seed's trade-off: quality for latency). Cost, not quality: they
# move with any retraining, so the report shows them and never flags them as regressions.
COMPLETION_TOKENS = "completion_tokens"
REASONING_TOKENS = "reasoning_tokens"
COST_METRICS = (COMPLETION_TOKENS, REASONING_TOKENS)


def modes(thinking: str | None, model: str, fmt: str | None) -> list[bool | None]:
    """The modes to evaluate `model` (thinking format `fmt`) in: [None] (the model's default,
    scores under plain task names), [True], [False] or [True, False]; a mode the model cannot
    run in is a one-line error."""
    if thinking is None:
        return [None]
    if thinking not in CHOICES:
        raise PosttrainError(f"--thinking {thinking!r}: expected one of {', '.join(CHOICES)}")
    wanted = {"on": [True], "off": [False], "both": [True, False]}[thinking]
    if True in wanted and fmt is None:
        raise PosttrainError(f"--thinking {thinking}: {model} does not think (no thinking format in the registry; "
                             f"`posttrain models set-thinking {model} qwen3` if it does)")
    if False in wanted and fmt == "deepseek_r1":
        raise PosttrainError(f"--thinking {thinking}: {model} always thinks (deepseek_r1 format); it has no mode "
                             f"without thinking (use --thinking on)")
    return wanted


def request_body(mode: bool | None, fmt: str | None) -> dict[str, Any]:
    """Extra request fields that put a model with thinking format `fmt` in `mode`; none where it
    runs so anyway (or cannot: a baseline keeps its only mode)."""
    if mode is None or fmt is None or (fmt == "deepseek_r1" and mode is False):
        return {}
    return {"chat_template_kwargs": {"enable_thinking": mode}}


def task_name(task: str, mode: bool | None) -> str:
    return task + SUFFIX[mode] if mode is not None else task


def split_task(task: str) -> tuple[str, bool | None]:
    """(the task's own name, the mode it was measured in, None without one)."""
    for mode, suffix in SUFFIX.items():
        if task.endswith(suffix):
            return task[:-len(suffix)], mode
    return task, None


def side_by_side(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Score rows measured in both modes, paired: one entry per (model, suite, task, metric) with
    `modes` {True: row, False: row} (a mode may be missing) and `tokens` {mode: {metric: row}}."""
    pairs: dict[tuple, dict[str, Any]] = {}
    tokens: dict[tuple, dict[bool, dict[str, Any]]] = {}
    for row in rows:
        task, mode = split_task(row["task"])
        if mode is None:
            continue
        key = (row["model"], row["suite"], task)
        if row["metric"] in COST_METRICS:
            tokens.setdefault(key, {}).setdefault(mode, {})[row["metric"]] = row
            continue
        entry = pairs.setdefault((*key, row["metric"]), {"model": row["model"], "suite": row["suite"], "task": task,
                                                         "metric": row["metric"], "modes": {}})
        entry["modes"][mode] = row
    for (model, suite, task, _), entry in pairs.items():
        entry["tokens"] = tokens.get((model, suite, task), {})
    return list(pairs.values())


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    import statistics

    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


def token_scores(task: str, spent: list[tuple[int | None, int | None]]) -> list[Score]:
    """Mean completion and reasoning tokens per sample (with stderr and n) as scores of `task`, from
    (completion_tokens, reasoning_tokens) pairs as the API's usage gives them (a reply without
    reasoning details spent no reasoning tokens)."""
    out = []
    counted = [(c, r or 0) for c, r in spent if c is not None]
    for metric, values in ((COMPLETION_TOKENS, [c for c, _ in counted]), (REASONING_TOKENS, [r for _, r in counted])):
        if values:
            out.append(Score(task, metric, *mean_and_stderr([float(v) for v in values]), len(values)))
    return out


SIDE_BY_SIDE_HEADER = ["task", "metric", "thinking", "not thinking", "difference", "tokens thinking",
                       "tokens not thinking"]


def side_by_side_cells(entry: dict[str, Any]) -> list[str]:
    """One `side_by_side` entry as text cells under SIDE_BY_SIDE_HEADER (the CLI and the report's)."""
    on, off = (entry["modes"].get(m) for m in (True, False))
    difference = f"{on['value'] - off['value']:+.4f}" if on and off else "-"
    return [entry["task"], entry["metric"], _value(on), _value(off), difference,
            *(_tokens(entry["tokens"].get(m) or {}) for m in (True, False))]


def _value(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return f"{row['value']:.4f}" + (f" ± {row['stderr']:.4f}" if row.get("stderr") else "")


def _tokens(spent: dict[str, dict[str, Any]]) -> str:
    """Mean tokens per sample: all of the reply, and of them the trace."""
    if COMPLETION_TOKENS not in spent:
        return "-"
    reasoning = spent.get(REASONING_TOKENS)
    return f"{spent[COMPLETION_TOKENS]['value']:.1f}" + (f" ({reasoning['value']:.1f} reasoning)" if reasoning else "")
