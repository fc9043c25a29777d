"""The nightly report: run (or read) the configured suites for the chosen checkpoints, compare
every score with the previous run of the same model and suite and with a pinned baseline, and
flag regressions, so cron or CI can alert on a non-zero exit.

A regression is a drop (a rise, for lower-is-better metrics) larger than `threshold` standard
errors of the difference, sqrt(se_now^2 + se_then^2). Where lm-eval reports no stderr (IFEval's
inst_level_acc, for one), a task's own `absolute_thresholds` entry decides; else a proportion
with a known n gets the binomial stderr sqrt(p(1-p)/n), because a fixed absolute threshold would
flag one flipped sample of a small suite; else `absolute_threshold`, in the metric's own units.

Every score an LLM judge produced (MT-Bench, the judge-verdict ratings) is shown with that judge's
latest measured agreement with human votes (`posttrain eval judge-agreement`), and the summary
warns when that agreement is indistinguishable from chance or was never measured.

The suite name is the unit of comparison: runs of one suite share tasks and settings, so change
a suite's settings under a new name. Configuration is a YAML recipe (`recipes/nightly.yaml`);
API keys come from the environment only (POSTTRAIN_API_KEY, POSTTRAIN_JUDGE_API_KEY or
OPENAI_API_KEY), never from the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from sqlalchemy import select

from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.evaluate.bench import OFFLINE_PACK
from posttrain.evaluate.endpoint import first_key
from posttrain.evaluate.judge_agreement import Agreement, latest_agreements
from posttrain.evaluate.modes import COST_METRICS
from posttrain.evaluate.runs import score_history
from posttrain.registry import Registry
from posttrain.store import Battle, EvalRun, Store, utcnow
from posttrain.ui.ratings import MIN_BATTLES, leaderboard


JUDGE_BOARD = "MT-Bench judge verdicts"  # the arena ratings of the judges' pairwise verdicts


class BenchSuite(Recipe):
    """lm-eval tasks (see `run_bench`)."""

    name: str = "bench"
    tasks: list[str] = [OFFLINE_PACK]
    backend: Literal["auto", "api", "hf", "vllm"] = "auto"
    limit: Annotated[int, Field(gt=0)] | None = None
    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    max_gen_toks: Annotated[int, Field(gt=0)] | None = None
    data_dir: str | None = None
    thinking: Literal["on", "off", "both"] | None = None  # thinking models only; see `modes.py`


class MTBenchSuite(Recipe):
    """MT-Bench with an LLM judge (see `run_mt_bench`); needs `base_url`."""

    name: str = "mt-bench"
    judge_model: str
    judge_base_url: str | None = None
    mode: Literal["single", "pairwise"] = "single"
    baseline: str | None = None
    question_file: str | None = None
    judge_prompts: str | None = None
    limit: Annotated[int, Field(gt=0)] | None = None
    max_tokens: Annotated[int, Field(gt=0)] = 1024
    judge_max_tokens: Annotated[int, Field(gt=0)] = 2048
    parallel: Annotated[int, Field(gt=0)] = 8
    thinking: Literal["on", "off", "both"] | None = None  # thinking models only; see `modes.py`


class NightlyConfig(Recipe):
    """What the nightly report evaluates and how it judges the numbers."""

    models: list[str] = []
    baseline: str | None = None
    threshold: Annotated[float, Field(gt=0)] = 2.0
    absolute_threshold: Annotated[float, Field(ge=0)] = 0.02
    absolute_thresholds: dict[str, Annotated[float, Field(ge=0)]] = {}
    base_url: str | None = None
    benchmarks: list[BenchSuite] = [BenchSuite()]
    mt_bench: list[MTBenchSuite] = []
    arena_source: str = "human"
    min_battles: Annotated[int, Field(ge=0)] = MIN_BATTLES  # fewer: provisional on the arena boards, not ranked
    out: str | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> NightlyConfig:
        names = [s.name for s in self.suites]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"suite names must be unique ({', '.join(dupes)} repeated)")
        return self

    @property
    def suites(self) -> list[BenchSuite | MTBenchSuite]:
        return [*self.benchmarks, *self.mt_bench]


@dataclass(frozen=True)
class Regression:
    model: str
    suite: str
    task: str
    metric: str
    value: float
    against: str  # "previous run #12" or "baseline NAME"
    reference: float
    limit: str  # the threshold that was crossed, in words

    def __str__(self) -> str:
        return (f"{self.model} [{self.suite}] {self.task} {self.metric}: {self.value:.4f} vs {self.reference:.4f} "
                f"({self.against}; {self.value - self.reference:+.4f}, beyond {self.limit})")


@dataclass
class NightlyReport:
    """The comparison table (one row per model/suite/task/metric of the latest runs), what
    regressed, which evaluations failed, and where the HTML went."""

    config: NightlyConfig
    rows: list[dict[str, Any]]
    history: list[dict[str, Any]]
    regressions: list[Regression]
    failures: list[str]
    unscored: list[str] = field(default_factory=list)  # evaluations that ran but produced no score
    arena: dict[str, Any] = field(default_factory=dict)  # source label -> leaderboard DataFrame
    agreements: dict[str, Agreement] = field(default_factory=dict)  # judge -> its latest agreement with humans
    battle_judges: list[str] = field(default_factory=list)  # judges whose verdicts are in the battles table
    created_at: datetime = field(default_factory=utcnow)
    html_path: Path | None = None
    markdown: str = ""

    @property
    def ok(self) -> bool:
        return not self.regressions and not self.failures

    @property
    def judges(self) -> list[str]:
        """Every judge behind a score in this report."""
        return list(dict.fromkeys([*(r["judge"] for r in self.rows if r.get("judge")), *self.battle_judges]))


def _check_config(registry: Registry, config: NightlyConfig, run: bool) -> None:
    """Fail before any work on unknown models or an MT-Bench suite with no server to ask."""
    for name in [*config.models, *([config.baseline] if config.baseline else [])]:
        registry.get(name)
    for suite in config.suites:
        if isinstance(suite, MTBenchSuite):
            if run and not config.base_url:
                raise PosttrainError(f"suite {suite.name!r} (mt-bench) needs base_url: the API serving the models "
                                     f"(base_url in the config, --base-url or POSTTRAIN_BASE_URL)")
            if suite.baseline:
                registry.get(suite.baseline)


def run_suites(config: NightlyConfig, models: list[str], registry: Registry) -> tuple[list[str], list[str]]:
    """Evaluate every model (and the baseline, the first time) on every suite; a failing
    evaluation is reported and the others still run. Returns the failures and the evaluations
    that ran but scored nothing (a judge whose every verdict was unparsable)."""
    from posttrain.evaluate.bench import run_bench
    from posttrain.evaluate.mt_bench import run_mt_bench

    api_key = first_key("POSTTRAIN_API_KEY")
    evaluated = {(r["model"], r["suite"]) for r in score_history(registry.store, [config.baseline] if config.baseline else [])}
    failures, unscored = [], []
    for suite in config.suites:
        baseline = [config.baseline] if config.baseline and (config.baseline, suite.name) not in evaluated else []
        # A baseline is only comparable on the same suite: run it there once.
        for model in dict.fromkeys([*models, *baseline]):
            if isinstance(suite, MTBenchSuite) and model == suite.baseline:
                continue  # pairwise against itself says nothing
            # A suite's thinking modes are for the models that think; the others, in the same
            # nightly, run in their one mode instead of failing every night.
            thinking = suite.thinking if registry.get(model).thinking else None
            try:
                if isinstance(suite, BenchSuite):
                    run_bench(model, suite.tasks, base_url=config.base_url, api_key=api_key, backend=suite.backend,
                              limit=suite.limit, num_fewshot=suite.num_fewshot, max_gen_toks=suite.max_gen_toks,
                              data_dir=suite.data_dir, suite=suite.name, thinking=thinking, registry=registry)
                else:
                    result = run_mt_bench(
                        model, judge_model=suite.judge_model, base_url=config.base_url,
                        judge_base_url=suite.judge_base_url, api_key=api_key, mode=suite.mode, baseline=suite.baseline,
                        question_file=suite.question_file, judge_prompts=suite.judge_prompts, limit=suite.limit,
                        max_tokens=suite.max_tokens, judge_max_tokens=suite.judge_max_tokens, parallel=suite.parallel,
                        suite=suite.name, thinking=thinking, registry=registry)
                    if not result.scores:
                        unscored.append(f"{model} [{suite.name}]: judge {suite.judge_model} gave no parsable verdict "
                                        f"({result.unparsable} unparsable, {result.errors} errors of "
                                        f"{result.judgments} judgments)")
            except Exception as exc:  # noqa: BLE001 - one broken model must not hide the others' results
                failures.append(f"{model} [{suite.name}]: {type(exc).__name__}: {exc}")
    return failures, unscored


def compare(history: list[dict[str, Any]], config: NightlyConfig, models: list[str]) -> tuple[list[dict], list[Regression]]:
    """One row per score of each model's latest run per suite, with the previous run's value
    and the baseline's latest value in the same suite, and the regressions among them."""
    runs: dict[tuple[str, str], list[int]] = {}
    values: dict[tuple[int, str, str], dict[str, Any]] = {}
    for h in history:
        ids = runs.setdefault((h["model"], h["suite"]), [])
        if h["run_id"] not in ids:
            ids.append(h["run_id"])
        values[(h["run_id"], h["task"], h["metric"])] = h
    rows, regressions = [], []
    for (model, suite), ids in runs.items():
        if model not in models:
            continue
        base_ids = runs.get((config.baseline, suite), []) if config.baseline and config.baseline != model else []
        for h in (v for (run_id, _, _), v in values.items() if run_id == ids[-1]):
            row = dict(h)
            # The newest earlier run that has this score; the baseline's latest run only.
            for kind, ref_ids in (("previous", reversed(ids[:-1])), ("baseline", base_ids[-1:])):
                ref = next((values[key] for i in ref_ids if (key := (i, h["task"], h["metric"])) in values), None)
                row[kind] = ref
                if ref is not None and (limit := _regressed(h, ref, config)):
                    row.setdefault("regressed", []).append(kind)
                    against = f"previous run #{ref['run_id']}" if kind == "previous" else f"baseline {config.baseline}"
                    regressions.append(Regression(model, suite, h["task"], h["metric"], h["value"], against,
                                                  ref["value"], limit))
            rows.append(row)
    rows.sort(key=lambda r: (models.index(r["model"]), r["suite"], r["task"], r["metric"]))
    return rows, regressions


def _regressed(now: dict[str, Any], then: dict[str, Any], config: NightlyConfig) -> str | None:
    """The crossed threshold, in words, if `now` is worse than `then` beyond it."""
    if now["metric"] in COST_METRICS:
        return None  # tokens spent: shown beside the scores, not a loss of quality
    drop = (then["value"] - now["value"]) * (1 if now["higher_is_better"] else -1)
    errors = [se for se in (now["stderr"], then["stderr"]) if se]
    if errors:
        se = math.sqrt(sum(e * e for e in errors))
        return f"{config.threshold:g} x stderr {se:.4f}" if drop > config.threshold * se else None
    if now["task"] not in config.absolute_thresholds and _binomial(now) is not None and _binomial(then) is not None:
        se = math.sqrt(_binomial(now) ** 2 + _binomial(then) ** 2)
        return f"{config.threshold:g} x binomial stderr {se:.4f}" if drop > config.threshold * se else None
    limit = config.absolute_thresholds.get(now["task"], config.absolute_threshold)
    return f"absolute threshold {limit:g} (no stderr)" if drop > limit else None


def _binomial(score: dict[str, Any]) -> float | None:
    """The standard error of a proportion measured on n samples; None for other numbers."""
    p, n = score["value"], score.get("n")
    return math.sqrt(p * (1 - p) / n) if n and 0 <= p <= 1 else None


def arena_ratings(registry: Registry, source: str, min_battles: int = MIN_BATTLES) -> dict[str, Any]:
    """Leaderboards of the arena's human votes and of MT-Bench judge verdicts, where any exist."""
    from posttrain.ui.votes import load_battles

    boards = {}
    for label, which in ((f"arena votes ({source})", source), (JUDGE_BOARD, "judge")):
        battles = load_battles(registry.store, which)
        board = leaderboard(battles, min_battles=min_battles) if len(battles) else []
        if len(board):  # self-battles alone rate nobody
            boards[label] = board
    return boards


def judged_by(store: Store, rows: list[dict[str, Any]]) -> None:
    """Mark each row an LLM judge produced with the judge's name (`row["judge"]`)."""
    with store.session() as s:
        configs = dict(s.execute(select(EvalRun.id, EvalRun.config).where(EvalRun.id.in_({r["run_id"] for r in rows}))).all())
    for row in rows:
        if judge := (configs.get(row["run_id"]) or {}).get("judge_model"):
            row["judge"] = judge


def battle_judges(store: Store) -> list[str]:
    """The judges whose pairwise verdicts are stored as battles (sources `judge:<model>`)."""
    with store.session() as s:
        sources = s.scalars(select(Battle.source).where(Battle.source.startswith("judge:")).distinct())
        return sorted(source.removeprefix("judge:") for source in sources)


def nightly(config: NightlyConfig, *, run: bool = True, registry: Registry | None = None,
            out: str | Path | None = None) -> NightlyReport:
    """Run the configured suites on `config.models` (default: every registered checkpoint) or,
    with `run=False`, read what is stored (default: every model with scores); compare, and write
    the HTML report to `out` (default: `config.out`, else `$POSTTRAIN_HOME/reports/
    nightly-<date>.html`). `.regressions` lists what got worse; `.markdown` is the same report
    for CI logs; `.ok` is False on regressions or failed evaluations."""
    from posttrain.evaluate.render import render_html, render_markdown
    from posttrain.files import write_atomically

    registry = registry or Registry()
    _check_config(registry, config, run)
    models, failures, unscored = list(config.models), [], []
    if run:
        models = models or [c.name for c in registry.list()]
        if not models:
            raise PosttrainError("no models to evaluate: none registered (`posttrain models pull-default`)")
        failures, unscored = run_suites(config, models, registry)
    stored = score_history(registry.store)
    models = models or list(dict.fromkeys(h["model"] for h in stored))
    # --no-run with no suites configured reports every stored suite.
    if run or config.model_fields_set & {"benchmarks", "mt_bench"}:
        wanted = {s.name for s in config.suites}
        stored = [h for h in stored if h["suite"] in wanted]
    keep = set(models) | ({config.baseline} if config.baseline else set())
    history = [h for h in stored if h["model"] in keep]
    rows, regressions = compare(history, config, models)
    judged_by(registry.store, rows)
    report = NightlyReport(config=config, rows=rows, history=history, regressions=regressions, failures=failures, unscored=unscored,
                           arena=arena_ratings(registry, config.arena_source, config.min_battles),
                           agreements=latest_agreements(registry.store),
                           battle_judges=battle_judges(registry.store))
    report.markdown = render_markdown(report)
    target = Path(out or config.out or registry.settings.home / "reports" / f"nightly-{report.created_at:%Y-%m-%d}.html")
    write_atomically(target, render_html(report))
    report.html_path = target.absolute()
    return report
