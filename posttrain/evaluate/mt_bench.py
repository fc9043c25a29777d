"""MT-Bench: two-turn questions answered by a served model and graded by an LLM judge, after
FastChat's llm_judge (Zheng et al. 2023, "Judging LLM-as-a-Judge").

- Questions and judge prompts in the original's formats (`mt_bench_files.py`): ours (10
  questions over 8 categories; prompts written after the original semantics) ship in `data/`,
  FastChat's `question.jsonl` and `judge_prompts.jsonl` are accepted by path.
- Single-answer grading: 1-10 with `[[rating]]`, per turn (the second turn judged on the whole
  conversation). Pairwise against a baseline: `[[A]]` / `[[B]]` / `[[C]]`, asked in both orders to
  cancel position bias; the orders disagreeing is a tie, as in FastChat. Questions in math,
  reasoning and coding are graded against their reference answer when they have one.
- The judge is any OpenAI-compatible endpoint, including one of our own served models. Where it
  can be constrained (vLLM), every verdict comes in the prompts' format and parses; where it
  returns log-probabilities, each verdict also gets its distribution (`judge.py`).
- Every request (answer or judgment) is cached in JSONL under its request's hash, so a re-run,
  after a crash or Ctrl-C, resumes without asking anything twice; requests run concurrently
  under a bound. A verdict that cannot be parsed is recorded and counted, never fatal.

Scores go to the store as EvalScore rows (task `mt_bench`: `score`, `score_turn1/2` and
`score_<category>`; pairwise: task `mt_bench_vs_<baseline>` with `win_rate...`), each beside its
probability-weighted twin where the judge gave log-probabilities (`expected_score...`: the
expected rating; `expected_win_rate...`: P(win) + P(tie) / 2). The run's config says how the
verdicts were read (`verdict_format`: constrained or parsed; `verdict_probabilities`). Pairwise
verdicts become `battles` rows with source `judge:<judge model>`, which the arena rates.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from tqdm.auto import tqdm

from posttrain.errors import PosttrainError
from posttrain.evaluate.endpoint import Endpoint, RequestCache, check_serves, connected, gather
from posttrain.evaluate.judge import (
    JudgeSupport, ask, ask_pair, detect_support, expected_rating, make_judge, orders_disagree,
)
from posttrain.evaluate.mt_bench_files import (
    PROMPT_NAMES, QUESTIONS, JudgePrompt, Question, load_judge_prompts, load_questions,
)
from posttrain.evaluate.modes import COST_METRICS, mean_and_stderr, modes, request_body, task_name, token_scores
from posttrain.evaluate.runs import Score, evals_dir, finish_run, recorded_run, write_samples
from posttrain.registry import Registry
from posttrain.store import Battle, EvalRun, EvalScore, Store

NEED_REFERENCE = ("math", "reasoning", "coding")
# FastChat's answer sampling temperature per category (creative ones sample, exact ones don't).
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
Mode = Literal["single", "pairwise"]


@dataclass
class MTBenchResult:
    """What `run_mt_bench` stored, and how the judging went."""

    run: EvalRun
    scores: list[EvalScore]
    samples_path: Path
    judgments: int  # verdicts asked for (pairwise: both orders count once)
    unparsable: int  # verdicts the judge gave in no recognizable format
    errors: int  # answers or judgments the API refused
    requests_sent: int  # requests this call actually sent (the rest came from the cache)
    battles: int = 0  # pairwise verdicts newly written to the battles table
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def run_mt_bench(
    model: str,
    *,
    judge_model: str,
    base_url: str,
    judge_base_url: str | None = None,
    api_key: str | None = None,
    judge_api_key: str | None = None,
    mode: Mode = "single",
    baseline: str | None = None,
    question_file: str | Path | None = None,
    judge_prompts: str | Path | None = None,
    limit: int | None = None,
    max_tokens: int = 1024,
    judge_max_tokens: int = 2048,
    parallel: int = 8,
    cache_dir: str | Path | None = None,
    suite: str = "mt-bench",
    constrain: bool = True,
    thinking: str | None = None,
    registry: Registry | None = None,
) -> MTBenchResult:
    """Run MT-Bench on a served, registered model and store the scores.

    - `base_url` / `api_key`: the OpenAI-compatible API serving `model` (and `baseline`).
    - `judge_model` at `judge_base_url` (default: `base_url`) with `judge_api_key` (default:
      POSTTRAIN_JUDGE_API_KEY, else `api_key` when the judge is behind `base_url`, else
      OPENAI_API_KEY).
    - `mode`: "single" (1-10 ratings) or "pairwise" against the registered `baseline`.
    - `question_file` (default: ours) and `judge_prompts` (default: ours), in MT-Bench's formats;
      `limit`: only the first N questions.
    - `max_tokens` per answer (FastChat: 1024), `judge_max_tokens` per judgment (2048);
      answers sample at FastChat's per-category temperatures, judges at 0.
    - `parallel`: requests in flight at once (answers and judgments share the bound).
    - `cache_dir`: the request caches (default `$POSTTRAIN_HOME/evals/mt_bench_cache`).
    - `constrain=False`: free-text verdicts even where the judge could be constrained.
    - `thinking`: "on", "off" or "both" (a thinking model's modes; default: its served default).
      Each mode's answers are judged on their own, scores stored as `mt_bench@think` /
      `mt_bench@no_think` with the tokens spent (`modes.py`); the judge sees only the answer,
      never the trace. A baseline answers in the same mode where it can, else in its only one.
    """
    if mode not in ("single", "pairwise"):
        raise PosttrainError(f"unknown mode {mode!r} (single or pairwise)")
    if mode == "pairwise" and not baseline:
        raise PosttrainError("pairwise mode needs a baseline model (--baseline NAME)")
    if mode == "single" and baseline:
        raise PosttrainError("a baseline is only used in pairwise mode (--mode pairwise)")
    registry = registry or Registry()
    answerers = [registry.get(model)] + ([registry.get(baseline)] if baseline else [])
    bodies = {m: [request_body(m, row.thinking) for row in answerers]
              for m in modes(thinking, model, answerers[0].thinking)}
    questions = load_questions(question_file)[:limit]
    prompts = load_judge_prompts(judge_prompts)
    base_url = base_url.rstrip("/")
    check_serves(base_url, api_key, *[row.name for row in answerers])
    cache_root = Path(cache_dir) if cache_dir else evals_dir(registry) / "mt_bench_cache"
    judge = make_judge(registry, judge_model, judge_base_url or base_url, judge_api_key,
                       RequestCache(cache_root / f"judge-{safe_name(judge_model)}.jsonl"),
                       models_base_url=base_url, models_api_key=api_key)
    endpoints = [Endpoint(row.name, base_url, api_key, RequestCache(cache_root / f"{safe_name(row.name)}.jsonl"),
                          identity=f"{row.path}@{row.created_at}") for row in answerers]
    config = {"mode": mode, "baseline": baseline, "judge_model": judge_model, "judge_base_url": judge.base_url,
              "base_url": base_url, "question_file": str(question_file or QUESTIONS), "questions": len(questions),
              "max_tokens": max_tokens, "judge_max_tokens": judge_max_tokens, "thinking": thinking}
    with recorded_run(registry, model, suite, config, "posttrain mt-bench 2") as run:
        try:
            records, support = asyncio.run(_run(questions, prompts, endpoints, judge, mode, max_tokens,
                                                judge_max_tokens, parallel, constrain, bodies))
        finally:
            for endpoint in [*endpoints, judge]:
                endpoint.cache.close()
        scores, counts = _scores_per_mode(records, mode, baseline, list(bodies))
        counts |= {"verdict_format": support.verdict_format, "verdict_probabilities": support.logprobs}
        path = write_samples(registry, run, {"mt_bench.jsonl": records})
        battles = 0
        if mode == "pairwise":
            counts["battle_source"] = f"judge:{judge_model}"
            battles = _store_battles(registry.store, records, counts["battle_source"])
        rows = finish_run(registry.store, run, scores, path, counts)
    return MTBenchResult(run=run, scores=rows, samples_path=path, judgments=counts["judgments"],
                         unparsable=counts["unparsable"], errors=counts["errors"],
                         requests_sent=sum(e.sent for e in [*endpoints, judge]), battles=battles, records=records)


async def _run(questions: list[Question], prompts: dict[str, JudgePrompt], endpoints: list[Endpoint], judge: Endpoint,
               mode: Mode, max_tokens: int, judge_max_tokens: int, parallel: int, constrain: bool,
               bodies: dict[bool | None, list[dict]]) -> tuple[list[dict[str, Any]], JudgeSupport]:
    """Answers in each thinking mode (`bodies`: the extra request fields per mode and endpoint),
    then the verdicts on them; each record says its mode in `thinking`."""
    gate = asyncio.Semaphore(parallel)
    async with connected([*endpoints, judge]):
        jobs = [(m, q, e, body) for m, per_endpoint in bodies.items() for q in questions
                for e, body in zip(endpoints, per_endpoint)]
        with tqdm(total=sum(len(q.turns) for _, q, _, _ in jobs), desc="answers", unit="turn") as bar:
            answers = await gather(_answer(e, q, gate, max_tokens, bar, body) for _, q, e, body in jobs)
        by_question = {(m, e.model, q.question_id): a for (m, q, e, _), a in zip(jobs, answers)}
        # Probed after the answers, so an interrupted answering phase has asked the judge nothing.
        support = await detect_support(judge, gate, constrain)
        verdicts = [(m, q, turn) for m in bodies for q in questions for turn in range(1, len(q.turns) + 1)]
        with tqdm(total=len(verdicts), desc=f"judge {judge.model}", unit="verdict") as bar:
            records = await gather(
                _judge(judge, support, prompts, mode, q, turn, [by_question[(m, e.model, q.question_id)] for e in endpoints],
                       [e.model for e in endpoints], gate, judge_max_tokens, bar) for m, q, turn in verdicts)
    return [r | {"thinking": m} for (m, _, _), r in zip(verdicts, records)], support


async def _answer(endpoint: Endpoint, question: Question, gate: asyncio.Semaphore, max_tokens: int, bar,
                  body: dict[str, Any] | None = None) -> list[dict]:
    """Both turns of one question, in order: turn 2 sees the model's own first answer (the answer
    only, as Qwen3's template keeps earlier turns). `body`: extra request fields (the mode)."""
    messages, turns = [], []
    temperature = TEMPERATURE.get(question.category, DEFAULT_TEMPERATURE)
    extra = {"extra_body": body} if body else {}  # none: the same request (and cache key) as before modes
    for turn in question.turns:
        messages = [*messages, {"role": "user", "content": turn}]
        record = answer_only(await endpoint.chat(messages, gate, max_tokens=max_tokens, temperature=temperature,
                                                 seed=0, **extra))
        turns.append(record)
        bar.update()
        if "error" in record:
            bar.update(len(question.turns) - len(turns))
            break
        messages = [*messages, {"role": "assistant", "content": record["text"]}]
    return turns


def answer_only(record: dict[str, Any]) -> dict[str, Any]:
    """A reply whose think block stayed in its text (a server without a reasoning parser) as the
    parser would have split it: a judge reads the answer, the trace goes to `reasoning`."""
    from posttrain.train.data import split_thinking

    trace, answer = split_thinking(record.get("text") or "")
    return record if trace is None else record | {"text": answer, "reasoning": trace}


def judge_fields(question: Question, ordered: list[list[dict]], use_reference: bool) -> dict[str, str]:
    """The template's fields: single grading names the one model's answers `answer...`,
    pairwise names them `answer_a...` / `answer_b...` in the order shown to the judge."""
    turns = [*question.turns, ""]
    kwargs = {"question": turns[0], "question_1": turns[0], "question_2": turns[1]}
    if use_reference:
        references = [*question.reference, ""]
        kwargs |= {"ref_answer_1": references[0], "ref_answer_2": references[1]}
    sides = {"": ordered[0]} if len(ordered) == 1 else {"_a": ordered[0], "_b": ordered[1]}
    for suffix, answers in sides.items():
        texts = [a["text"] for a in answers] + [""]
        kwargs |= {f"answer{suffix}": texts[0], f"answer{suffix}_1": texts[0], f"answer{suffix}_2": texts[1]}
    return kwargs


async def _judge(judge: Endpoint, support: JudgeSupport, prompts: dict[str, JudgePrompt], mode: Mode,
                 question: Question, turn: int, answers: list[list[dict]], models: list[str], gate: asyncio.Semaphore,
                 max_tokens: int, bar) -> dict:
    """One verdict on one turn: a rating, or the combined outcome of both orders."""
    use_reference = question.category in NEED_REFERENCE and question.reference is not None
    prompt = prompts[PROMPT_NAMES[(mode, turn, use_reference)]]
    record = {"question_id": question.question_id, "category": question.category, "turn": turn,
              "questions": list(question.turns), "models": models, "judge": judge.model, "prompt": prompt.name,
              "answers": [[a.get("text") for a in per_model] for per_model in answers],
              # What each side spent, its trace included (the trace itself is in the answer cache,
              # never shown to the judge).
              **{spent: [[a.get(spent) for a in per_model] for per_model in answers] for spent in COST_METRICS}}
    missing = [m for m, per_model in zip(models, answers) if len(per_model) < turn or "error" in per_model[turn - 1]]
    if missing:
        bar.update()
        return record | {"error": f"no answer from {', '.join(missing)}"}
    if mode == "pairwise":
        orders = [judge_fields(question, ordered, use_reference) for ordered in (answers, answers[::-1])]
        verdict = await ask_pair(judge, support, prompt, orders, gate, max_tokens)
        bar.update()
        return record | verdict
    reply = await ask(judge, support, "rating", prompt, judge_fields(question, answers, use_reference), gate, max_tokens)
    bar.update()
    record["judgments"] = [reply.get("text")]
    if "error" in reply:
        return record | {"error": reply["error"]}
    return record | {"rating": reply["verdict"], "unparsable": reply["verdict"] is None,
                     "rating_probs": reply["probs"], "expected_rating": expected_rating(reply["probs"])}


def _scores(records: list[dict[str, Any]], mode: Mode, baseline: str | None) -> tuple[list[Score], dict[str, Any]]:
    """Overall, per-turn and per-category means of the parsed verdicts (pairwise: win rate
    against the baseline, a tie counting half) with their standard errors, and the same of the
    probability-weighted verdicts where there are any."""
    parsed = [r for r in records if "error" not in r and not r["unparsable"]]
    if mode == "single":
        task, prefix = "mt_bench", "score"
        values = [(r, r["rating"], r["expected_rating"]) for r in parsed]
    else:
        task, prefix = f"mt_bench_vs_{baseline}", "win_rate"
        values = [(r, {"a": 1.0, "b": 0.0, "tie": 0.5}[r["outcome"]],
                   r["outcome_probs"] and r["outcome_probs"]["a"] + r["outcome_probs"]["tie"] / 2) for r in parsed]
    groups: dict[str, list[float]] = {}
    for record, verdict, expected in values:
        for name, value in ((prefix, verdict), (f"expected_{prefix}", expected)):
            if value is not None:
                for metric in (name, f"{name}_turn{record['turn']}", f"{name}_{record['category']}"):
                    groups.setdefault(metric, []).append(value)
    scores = [Score(task, metric, *mean_and_stderr(group), len(group)) for metric, group in sorted(groups.items())]
    counts = {
        "judgments": len(records),
        "unparsable": sum(1 for r in records if r.get("unparsable")),
        "errors": sum(1 for r in records if "error" in r),
    }
    if mode == "pairwise":
        counts["inconsistent"] = sum(1 for r in parsed if orders_disagree(*r["verdicts"]))
        for outcome in ("a", "b", "tie"):
            counts[{"a": "wins", "b": "losses", "tie": "ties"}[outcome]] = sum(1 for r in parsed if r["outcome"] == outcome)
    return scores, counts


def _scores_per_mode(records: list[dict[str, Any]], mode: Mode, baseline: str | None,
                     thinking: list[bool | None]) -> tuple[list[Score], dict[str, Any]]:
    """`_scores` for each thinking mode's records under its task name (`mt_bench@think`), with
    the evaluated model's tokens spent per answered turn; counts add up over the modes."""
    scores: list[Score] = []
    counts: dict[str, Any] = {}
    for m in thinking:
        mine = [r for r in records if r["thinking"] is m]
        found, tally = _scores(mine, mode, baseline)
        scores += [replace(s, task=task_name(s.task, m)) for s in found]
        for key, value in tally.items():
            counts[key] = counts.get(key, 0) + value
        if m is not None:
            task = task_name("mt_bench" if mode == "single" else f"mt_bench_vs_{baseline}", m)
            scores += token_scores(task, [_spent(r) for r in mine])
    return scores, counts


def _spent(record: dict[str, Any]) -> tuple[int | None, int | None]:
    """(completion, reasoning) tokens of the evaluated model's answer to the judged turn."""
    turn = record["turn"] - 1
    completion, reasoning = (record.get(metric, [[]])[0] for metric in COST_METRICS)
    return (completion[turn], reasoning[turn]) if len(completion) > turn else (None, None)


def _store_battles(store: Store, records: list[dict[str, Any]], source: str) -> int:
    """Each parsed pairwise verdict as a battle (model = side a, baseline = side b), once: a
    resumed or repeated run finds its verdicts already there by their key. Returns how many
    were new."""
    decided = [r for r in records if r.get("outcome")]
    with store.session() as s:
        existing = set(s.scalars(select(Battle.session_hash).where(
            Battle.source == source, Battle.session_hash.in_([r["key"] for r in decided]))))
        new = [r for r in decided if r["key"] not in existing]
        for r in new:
            model_a, model_b = r["models"]
            s.add(Battle(session_hash=r["key"], model_a=model_a, model_b=model_b,
                         conversation_a=_conversation(r, 0), conversation_b=_conversation(r, 1),
                         vote=r["outcome"], source=source))
    return len(new)


def _conversation(record: dict[str, Any], side: int) -> list[dict[str, str]]:
    """What the judge saw of one side: the questions up to the judged turn and that side's answers."""
    questions = record["questions"]
    messages = []
    for question, answer in zip(questions[:record["turn"]], record["answers"][side]):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages
