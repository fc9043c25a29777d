"""How far to trust an LLM judge: it decides battles people already voted on (the same
conversations, shown in both orders, FastChat's pairwise prompts), and its verdicts are
compared with the people's, as in the MT-Bench paper (Zheng et al. 2023, section 4.2).

- `agreement_with_ties` (the paper's setup S1): the share of battles where the judge's outcome
  (A, B or tie; orders that disagree are a tie) equals the vote ("both are bad" is a tie).
  Chance: 1/3. The paper's anchors: GPT-4 vs humans 66%, human vs human 63%.
- `agreement_without_ties` (S2): the same over battles where neither said tie. Chance: 1/2.
  Anchors: GPT-4 85%, humans 81%.
- `cohen_kappa`: agreement beyond what the two sides' label frequencies give by chance (0 =
  chance, 1 = perfect), over the three outcomes.
- `position_bias`: the share of battles whose two orders got different verdicts.

Each comes with a bootstrap 95% interval (battles resampled with replacement, `rounds` times,
numpy with a fixed seed, percentiles 2.5 / 97.5; the stored stderr is the bootstrap's standard
deviation). A judge is "indistinguishable from chance" when kappa's interval reaches 0 or the
without-ties interval reaches 1/2.

Battles with one turn use the `pair-v2` prompt; longer ones `pair-v2-multi-turn` on their last
two turns (the judged turn and the one before, the prompt's shape). Stored as one EvalRun per
call (model = the judge, suite `judge-agreement`, task `judge_agreement`; intervals, source and
counts in its config); per-battle verdicts in the run's samples. The nightly report shows the
judge's latest one next to every score the judge produced.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from tqdm.auto import tqdm

from posttrain.errors import PosttrainError
from posttrain.evaluate.endpoint import Endpoint, RequestCache, connected, gather
from posttrain.evaluate.judge import JudgeSupport, ask_pair, detect_support, make_judge, orders_disagree
from posttrain.evaluate.mt_bench import judge_fields, safe_name
from posttrain.evaluate.mt_bench_files import PROMPT_NAMES, JudgePrompt, Question, load_judge_prompts
from posttrain.evaluate.runs import Score, evals_dir, finish_run, recorded_run, write_samples
from posttrain.registry import Registry
from posttrain.store import EvalRun, EvalScore, Store
from posttrain.ui.votes import load_battles

SUITE = "judge-agreement"
TASK = "judge_agreement"
METRICS = ("agreement_with_ties", "agreement_without_ties", "cohen_kappa", "position_bias")
CHANCE = {"agreement_with_ties": 1 / 3, "agreement_without_ties": 1 / 2, "cohen_kappa": 0.0}
ANCHORS = ("MT-Bench paper: GPT-4 vs humans 66% with ties / 85% without, human vs human 63% / 81%; "
           "chance 33% / 50%, kappa 0")
OUTCOMES = ("a", "b", "tie")
HUMAN_OUTCOME = {"a": "a", "b": "b", "tie": "tie", "bothbad": "tie"}


@dataclass
class Agreement:
    """A judge's measured agreement: {metric: (value, 95% low, 95% high, n)}."""

    judge: str
    source: str
    battles: int
    values: dict[str, tuple[float, float, float, int]]
    run_id: int | None = None

    @property
    def near_chance(self) -> bool:
        kappa = self.values.get("cohen_kappa")
        decisive = self.values.get("agreement_without_ties")
        return ((kappa is None or kappa[1] <= CHANCE["cohen_kappa"])
                or (decisive is None or decisive[1] <= CHANCE["agreement_without_ties"]))

    def text(self, metric: str) -> str:
        """A metric with its 95% interval, e.g. "62% [48-75%]" or "0.21 [0.02-0.40]"."""
        if (v := self.values.get(metric)) is None:
            return "-"
        if metric == "cohen_kappa":
            return f"{v[0]:.2f} [{v[1]:.2f}-{v[2]:.2f}]"
        return f"{v[0]:.0%} [{v[1]:.0%}-{v[2]:.0%}]"

    def short(self) -> str:
        """What goes next to a judge's score: its agreement without ties and its kappa."""
        return (f"{self.judge}: agrees {self.text('agreement_without_ties')} without ties, kappa "
                f"{self.text('cohen_kappa')}, n {self.battles}" + (" CHANCE?" if self.near_chance else ""))

    def summary(self) -> str:
        """One line: each number with its interval, and a warning when it could be chance."""
        text = (f"{self.judge} agrees with {self.source} votes {self.text('agreement_without_ties')} without ties, "
                f"{self.text('agreement_with_ties')} with ties, kappa {self.text('cohen_kappa')}, position bias "
                f"{self.text('position_bias')} ({self.battles} battles)")
        return text + ("; WARNING: indistinguishable from chance" if self.near_chance else "")


@dataclass
class AgreementResult:
    """What `run_judge_agreement` stored, and how the judging went."""

    run: EvalRun
    scores: list[EvalScore]
    agreement: Agreement
    samples_path: Path
    unparsable: int  # battles left out: a verdict in no recognizable format
    errors: int  # battles left out: the API refused a request
    skipped: dict[str, int]  # battles not asked about, by reason
    requests_sent: int
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)


def run_judge_agreement(
    judge_model: str,
    *,
    judge_base_url: str,
    judge_api_key: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    source: str = "human",
    limit: int | None = None,
    judge_prompts: str | Path | None = None,
    judge_max_tokens: int = 2048,
    parallel: int = 8,
    cache_dir: str | Path | None = None,
    rounds: int = 1000,
    seed: int = 0,
    constrain: bool = True,
    registry: Registry | None = None,
) -> AgreementResult:
    """Have `judge_model` at `judge_base_url` decide the stored battles of `source` (default
    "human": arena + side-by-side; or an imported source such as "fastchat"), the first `limit`
    of them in voting order, and store its agreement with the votes. The key: `judge_api_key`,
    else POSTTRAIN_JUDGE_API_KEY, else `api_key` when the judge is behind `base_url`, else
    OPENAI_API_KEY. Requests are cached in `cache_dir` (default
    `$POSTTRAIN_HOME/evals/judge_agreement_cache`)."""
    registry = registry or Registry()
    prompts = load_judge_prompts(judge_prompts)
    battles, skipped = _judgeable(load_battles(registry.store, source=source, conversations=True))
    battles = battles[:limit]
    if not battles:
        raise PosttrainError(f"no {source} battles with conversations to judge ({_skipped_text(skipped) or 'none stored'}); "
                             f"votes come from the arena or `posttrain arena import FILE`")
    cache_root = Path(cache_dir) if cache_dir else evals_dir(registry) / "judge_agreement_cache"
    judge = make_judge(registry, judge_model, judge_base_url, judge_api_key,
                       RequestCache(cache_root / f"judge-{safe_name(judge_model)}.jsonl"),
                       models_base_url=base_url, models_api_key=api_key)
    config = {"source": source, "judge_base_url": judge.base_url, "limit": limit, "rounds": rounds, "seed": seed,
              "judge_max_tokens": judge_max_tokens, "higher_is_better": {TASK: {"position_bias": False}}}
    with recorded_run(registry, judge_model, SUITE, config, "posttrain judge-agreement 1") as run:
        try:
            records, support = asyncio.run(_decide_all(judge, prompts, battles, parallel, judge_max_tokens, constrain))
        finally:
            judge.cache.close()
        decided = [r for r in records if r.get("outcome")]
        values = agreement_stats([r["outcome"] for r in decided], [r["human"] for r in decided],
                                 [r["orders_disagree"] for r in decided], rounds=rounds, seed=seed)
        counts = {"battles": len(decided), "skipped": skipped, "verdict_format": support.verdict_format,
                  "verdict_probabilities": support.logprobs,
                  "unparsable": sum(1 for r in records if r.get("unparsable")),
                  "errors": sum(1 for r in records if "error" in r),
                  "intervals": {m: [v[1], v[2]] for m, v in values.items()}}
        path = write_samples(registry, run, {"judge_agreement.jsonl": records})
        scores = [Score(TASK, m, v[0], v[4], v[3]) for m, v in values.items()]
        rows = finish_run(registry.store, run, scores, path, counts)
    agreement = Agreement(judge_model, source, len(decided), {m: v[:4] for m, v in values.items()}, run.id)
    return AgreementResult(run=run, scores=rows, agreement=agreement, samples_path=path,
                           unparsable=counts["unparsable"], errors=counts["errors"], skipped=skipped,
                           requests_sent=judge.sent, records=records)


def _judgeable(battles: pd.DataFrame) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The battles a judge can decide, as {battle, questions, answers: [side a, side b]}, and how
    many were left out for which reason."""
    usable, skipped = [], {}
    for battle in battles.to_dict("records"):
        sides = [_turns(battle["conversation_a"]), _turns(battle["conversation_b"])]
        reason = None
        if not battle["conversation_a"] or not battle["conversation_b"]:
            reason = "without conversations"
        elif None in sides:
            reason = "malformed conversations"
        elif [q for q, _ in sides[0]] != [q for q, _ in sides[1]]:
            reason = "whose sides were asked different questions"
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        usable.append({"battle": battle, "questions": [q for q, _ in sides[0]],
                       "answers": [[a for _, a in side] for side in sides]})
    return usable, skipped


def _turns(conversation: list[Any]) -> list[tuple[str, str]] | None:
    """(question, answer) per turn of a user/assistant conversation (a system prompt aside), or
    None if it is not one."""
    messages = [m for m in conversation if not (isinstance(m, dict) and m.get("role") == "system")]
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if not messages or roles != ["user", "assistant"] * (len(messages) // 2):
        return None
    return [(str(q.get("content") or ""), str(a.get("content") or "")) for q, a in zip(messages[::2], messages[1::2])]


def _skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items())


async def _decide_all(judge: Endpoint, prompts: dict[str, JudgePrompt], battles: list[dict[str, Any]], parallel: int,
                      max_tokens: int, constrain: bool) -> tuple[list[dict[str, Any]], JudgeSupport]:
    gate = asyncio.Semaphore(parallel)
    async with connected([judge]):
        support = await detect_support(judge, gate, constrain)
        with tqdm(total=len(battles), desc=f"judge {judge.model}", unit="battle") as bar:
            records = await gather(_decide(judge, support, prompts, b, gate, max_tokens, bar) for b in battles)
    return records, support


async def _decide(judge: Endpoint, support: JudgeSupport, prompts: dict[str, JudgePrompt], usable: dict[str, Any],
                  gate: asyncio.Semaphore, max_tokens: int, bar) -> dict[str, Any]:
    """The judge's verdict on one battle, beside the people's."""
    battle, questions = usable["battle"], usable["questions"][-2:]
    answers = [[{"text": text} for text in side[-2:]] for side in usable["answers"]]
    question = Question(question_id=battle["id"], category="battle", turns=tuple(questions))
    prompt = prompts[PROMPT_NAMES[("pairwise", len(questions), False)]]
    orders = [judge_fields(question, ordered, use_reference=False) for ordered in (answers, answers[::-1])]
    verdict = await ask_pair(judge, support, prompt, orders, gate, max_tokens)
    bar.update()
    record = {"battle_id": battle["id"], "model_a": battle["model_a"], "model_b": battle["model_b"],
              "source": battle["source"], "human": HUMAN_OUTCOME[battle["vote"]], "turns": len(usable["questions"]),
              "prompt": prompt.name} | verdict
    if verdict.get("outcome"):
        record["orders_disagree"] = orders_disagree(*verdict["verdicts"])
    return record


def _metrics(judge: np.ndarray, human: np.ndarray, disagree: np.ndarray) -> dict[str, np.ndarray]:
    """The four numbers over the last axis (one row per bootstrap sample, or a single row)."""
    agree = judge == human
    decisive = (judge != 2) & (human != 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        chance = sum((judge == k).mean(-1) * (human == k).mean(-1) for k in range(len(OUTCOMES)))
        return {"agreement_with_ties": agree.mean(-1),
                "agreement_without_ties": (agree & decisive).sum(-1) / decisive.sum(-1),
                "cohen_kappa": (agree.mean(-1) - chance) / (1 - chance),
                "position_bias": disagree.mean(-1)}


def agreement_stats(judge: list[str], human: list[str], disagree: list[bool], rounds: int = 1000,
                    seed: int = 0) -> dict[str, tuple[float, float, float, int, float]]:
    """{metric: (value, 95% low, 95% high, n, bootstrap stderr)} of a judge's outcomes ("a",
    "b", "tie") against people's, per battle; metrics that are undefined here (no battle
    without a tie, or kappa when both sides always said the same) are left out."""
    j = np.array([OUTCOMES.index(o) for o in judge], dtype=np.int8)
    h = np.array([OUTCOMES.index(o) for o in human], dtype=np.int8)
    d = np.array(disagree, dtype=bool)
    if not len(j):
        return {}
    point = _metrics(j, h, d)
    index = np.random.default_rng(seed).integers(0, len(j), size=(rounds, len(j)))
    samples = _metrics(j[index], h[index], d[index])
    sizes = {"agreement_without_ties": int(((j != 2) & (h != 2)).sum())}
    stats = {}
    for metric in METRICS:
        value, spread = float(point[metric]), samples[metric][np.isfinite(samples[metric])]
        if np.isfinite(value) and len(spread):
            low, high = np.percentile(spread, [2.5, 97.5])
            stats[metric] = (value, float(low), float(high), sizes.get(metric, len(j)),
                             float(spread.std(ddof=1)) if len(spread) > 1 else 0.0)
    return stats


def latest_agreements(store: Store) -> dict[str, Agreement]:
    """Each judge's latest finished agreement run."""
    stmt = select(EvalRun).where(EvalRun.suite == SUITE, EvalRun.status == "done").order_by(EvalRun.finished_at, EvalRun.id)
    with store.session() as s:
        runs = {run.id: run for run in {run.model: run for run in s.scalars(stmt)}.values()}
        scores = s.scalars(select(EvalScore).where(EvalScore.run_id.in_(list(runs)), EvalScore.task == TASK)).all()
    values: dict[int, dict[str, tuple[float, float, float, int]]] = {run_id: {} for run_id in runs}
    for score in scores:
        low, high = runs[score.run_id].config.get("intervals", {}).get(score.metric, [score.value, score.value])
        values[score.run_id][score.metric] = (score.value, low, high, score.n or 0)
    return {run.model: Agreement(run.model, run.config.get("source", "?"), run.config.get("battles", 0),
                                 values[run.id], run.id) for run in runs.values()}
