"""MT-Bench: two-turn questions answered by a served model and graded by an LLM judge, after
FastChat's llm_judge (Zheng et al. 2023, "Judging LLM-as-a-Judge").

- Questions and judge prompts in the original's formats (`mt_bench_files.py`): ours (10
  questions over 8 categories; prompts written after the original semantics) ship in `data/`,
  FastChat's `question.jsonl` and `judge_prompts.jsonl` are accepted by path.
- Single-answer grading: 1-10 with `[[rating]]`, per turn (the second turn judged on the whole
  conversation). Pairwise against a baseline: `[[A]]` / `[[B]]` / `[[C]]`, asked in both orders to
  cancel position bias; the orders disagreeing is a tie, as in FastChat. Questions in math,
  reasoning and coding are graded against their reference answer when they have one.
- The judge is any OpenAI-compatible endpoint, including one of our own served models.
- Every request (answer or judgment) is cached in JSONL under its request's hash, so a re-run,
  after a crash or Ctrl-C, resumes without asking anything twice; requests run concurrently
  under a bound. A verdict that cannot be parsed is recorded and counted, never fatal.

Scores go to the store as EvalScore rows (task `mt_bench`: `score`, `score_turn1/2` and
`score_<category>`; pairwise: task `mt_bench_vs_<baseline>` with `win_rate...`), and pairwise
verdicts become `battles` rows with source `judge:<judge model>`, which the arena rates.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from tqdm.auto import tqdm

from posttrain.errors import PosttrainError
from posttrain.evaluate.endpoint import Endpoint, RequestCache, check_serves, first_key
from posttrain.evaluate.mt_bench_files import (
    PROMPT_NAMES, QUESTIONS, JudgePrompt, Question, load_judge_prompts, load_questions,
)
from posttrain.evaluate.runs import Score, evals_dir, finish_run, recorded_run, write_samples
from posttrain.registry import Registry
from posttrain.store import Battle, EvalRun, EvalScore, Store

NEED_REFERENCE = ("math", "reasoning", "coding")
# FastChat's answer sampling temperature per category (creative ones sample, exact ones don't).
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
Mode = Literal["single", "pairwise"]


def parse_rating(judgment: str) -> float | None:
    """The last `[[n]]` (or, failing that, `[n]`) in a judgment, if it is a rating from 1 to 10."""
    for pattern in (r"\[\[(\d+(?:\.\d+)?)\]\]", r"\[(\d+(?:\.\d+)?)\]"):
        found = re.findall(pattern, judgment)
        if found:
            rating = float(found[-1])
            return rating if 1 <= rating <= 10 else None
    return None


def parse_winner(judgment: str) -> str | None:
    """"A", "B" or "C" (tie) from the last `[[A]]` / `[[B]]` / `[[C]]` in a judgment."""
    found = re.findall(r"\[\[([ABC])\]\]", judgment)
    return found[-1] if found else None


def pair_outcome(first: str | None, second: str | None) -> str | None:
    """Combine the verdicts of both orders (first: model is A; second: model is B) into "a"
    (the model won), "b" (the baseline won) or "tie"; None when either is unparsable. Orders
    that disagree are a tie: that is position bias, not a preference."""
    if first is None or second is None:
        return None
    model_first = {"A": "a", "B": "b", "C": "tie"}[first]
    model_second = {"A": "b", "B": "a", "C": "tie"}[second]
    return model_first if model_first == model_second else "tie"


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


def _safe_name(name: str) -> str:
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
    """
    if mode not in ("single", "pairwise"):
        raise PosttrainError(f"unknown mode {mode!r} (single or pairwise)")
    if mode == "pairwise" and not baseline:
        raise PosttrainError("pairwise mode needs a baseline model (--baseline NAME)")
    if mode == "single" and baseline:
        raise PosttrainError("a baseline is only used in pairwise mode (--mode pairwise)")
    registry = registry or Registry()
    answerers = [registry.get(model)] + ([registry.get(baseline)] if baseline else [])
    questions = load_questions(question_file)[:limit]
    prompts = load_judge_prompts(judge_prompts)
    judge_base_url = (judge_base_url or base_url).rstrip("/")
    base_url = base_url.rstrip("/")
    # Never send our own API key to another host: a remote judge's key comes from its variables.
    judge_api_key = judge_api_key or first_key("POSTTRAIN_JUDGE_API_KEY") or (
        api_key if judge_base_url == base_url else first_key("OPENAI_API_KEY"))
    check_serves(base_url, api_key, *[row.name for row in answerers])
    check_serves(judge_base_url, judge_api_key, judge_model)

    cache_root = Path(cache_dir) if cache_dir else evals_dir(registry) / "mt_bench_cache"
    endpoints = [Endpoint(row.name, base_url, api_key, RequestCache(cache_root / f"{_safe_name(row.name)}.jsonl"),
                          identity=f"{row.path}@{row.created_at}") for row in answerers]
    judge = Endpoint(judge_model, judge_base_url, judge_api_key,
                     RequestCache(cache_root / f"judge-{_safe_name(judge_model)}.jsonl"))
    config = {"mode": mode, "baseline": baseline, "judge_model": judge_model, "judge_base_url": judge_base_url,
              "base_url": base_url, "question_file": str(question_file or QUESTIONS), "questions": len(questions),
              "max_tokens": max_tokens, "judge_max_tokens": judge_max_tokens}
    with recorded_run(registry, model, suite, config, "posttrain mt-bench 1") as run:
        try:
            records = asyncio.run(_run(questions, prompts, endpoints, judge, mode, max_tokens, judge_max_tokens, parallel))
        finally:
            for endpoint in [*endpoints, judge]:
                endpoint.cache.close()
        scores, counts = _scores(records, mode, baseline)
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
               mode: Mode, max_tokens: int, judge_max_tokens: int, parallel: int) -> list[dict[str, Any]]:
    import openai

    gate = asyncio.Semaphore(parallel)
    clients = {}
    for endpoint in [*endpoints, judge]:
        key = (endpoint.base_url, endpoint.api_key)
        if key not in clients:
            clients[key] = openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "none",
                                              timeout=600, max_retries=2)
        endpoint.client = clients[key]
    try:
        with tqdm(total=sum(len(q.turns) for q in questions) * len(endpoints), desc="answers", unit="turn") as bar:
            answers = await _gather(_answer(e, q, gate, max_tokens, bar) for q in questions for e in endpoints)
        by_question = {(e.model, q.question_id): answers[i * len(endpoints) + j]
                       for i, q in enumerate(questions) for j, e in enumerate(endpoints)}
        jobs = [(q, turn) for q in questions for turn in range(1, len(q.turns) + 1)]
        with tqdm(total=len(jobs), desc=f"judge {judge.model}", unit="verdict") as bar:
            return await _gather(_judge(judge, prompts, mode, q, turn, [by_question[(e.model, q.question_id)] for e in endpoints],
                                        [e.model for e in endpoints], gate, judge_max_tokens, bar) for q, turn in jobs)
    finally:
        for client in clients.values():
            await client.close()


async def _gather(coroutines) -> list:
    """Like asyncio.gather, but the first failure cancels the rest (nothing keeps running
    behind an error or Ctrl-C)."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(c) for c in coroutines]
    return [t.result() for t in tasks]


async def _answer(endpoint: Endpoint, question: Question, gate: asyncio.Semaphore, max_tokens: int, bar) -> list[dict]:
    """Both turns of one question, in order: turn 2 sees the model's own first answer."""
    messages, turns = [], []
    temperature = TEMPERATURE.get(question.category, DEFAULT_TEMPERATURE)
    for turn in question.turns:
        messages = [*messages, {"role": "user", "content": turn}]
        record = await endpoint.chat(messages, gate, max_tokens=max_tokens, temperature=temperature, seed=0)
        turns.append(record)
        bar.update()
        if "error" in record:
            bar.update(len(question.turns) - len(turns))
            break
        messages = [*messages, {"role": "assistant", "content": record["text"]}]
    return turns


def _judge_kwargs(question: Question, ordered: list[list[dict]], use_reference: bool) -> dict[str, str]:
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


async def _judge(judge: Endpoint, prompts: dict[str, JudgePrompt], mode: Mode, question: Question, turn: int,
                 answers: list[list[dict]], models: list[str], gate: asyncio.Semaphore, max_tokens: int, bar) -> dict:
    """One verdict on one turn: a rating, or the combined outcome of both orders."""
    use_reference = question.category in NEED_REFERENCE and question.reference is not None
    prompt = prompts[PROMPT_NAMES[(mode, turn, use_reference)]]
    record = {"question_id": question.question_id, "category": question.category, "turn": turn,
              "questions": list(question.turns), "models": models, "judge": judge.model, "prompt": prompt.name,
              "answers": [[a.get("text") for a in per_model] for per_model in answers]}
    missing = [m for m, per_model in zip(models, answers) if len(per_model) < turn or "error" in per_model[turn - 1]]
    if missing:
        bar.update()
        return record | {"error": f"no answer from {', '.join(missing)}"}
    orders = [answers] if mode == "single" else [answers, answers[::-1]]
    judgments = []
    for ordered in orders:
        user = prompt.prompt_template.format(**_judge_kwargs(question, ordered, use_reference))
        messages = [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]
        judgments.append(await judge.chat(messages, gate, max_tokens=max_tokens, temperature=0))
    bar.update()
    record["judgments"] = [j.get("text") for j in judgments]
    if errors := [j["error"] for j in judgments if "error" in j]:
        return record | {"error": "; ".join(errors)}
    if mode == "single":
        record["rating"] = parse_rating(judgments[0]["text"])
        record["unparsable"] = record["rating"] is None
    else:
        verdicts = [parse_winner(j["text"]) for j in judgments]
        record |= {"verdicts": verdicts, "outcome": pair_outcome(*verdicts), "unparsable": None in verdicts,
                   "key": hashlib.sha256("".join(j["key"] for j in judgments).encode()).hexdigest()[:16]}
    return record


def _mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None)


def _scores(records: list[dict[str, Any]], mode: Mode, baseline: str | None) -> tuple[list[Score], dict[str, Any]]:
    """Overall, per-turn and per-category means of the parsed verdicts (pairwise: win rate
    against the baseline, a tie counting half) with their standard errors."""
    if mode == "single":
        task, prefix, value_of = "mt_bench", "score", lambda r: r["rating"]
    else:
        task, prefix, value_of = f"mt_bench_vs_{baseline}", "win_rate", lambda r: {"a": 1.0, "b": 0.0, "tie": 0.5}[r["outcome"]]
    parsed = [r for r in records if "error" not in r and not r["unparsable"]]
    groups: dict[str, list[float]] = {prefix: [value_of(r) for r in parsed]}
    for r in parsed:
        groups.setdefault(f"{prefix}_turn{r['turn']}", []).append(value_of(r))
    for r in parsed:
        groups.setdefault(f"{prefix}_{r['category']}", []).append(value_of(r))
    scores = [Score(task, metric, *_mean_and_stderr(values), len(values)) for metric, values in groups.items() if values]
    counts = {
        "judgments": len(records),
        "unparsable": sum(1 for r in records if r.get("unparsable")),
        "errors": sum(1 for r in records if "error" in r),
    }
    if mode == "pairwise":
        counts["inconsistent"] = sum(1 for r in parsed if r["outcome"] == "tie" and "C" not in r["verdicts"])
        for outcome in ("a", "b", "tie"):
            counts[{"a": "wins", "b": "losses", "tie": "ties"}[outcome]] = sum(1 for r in parsed if r["outcome"] == outcome)
    return scores, counts


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
