"""LLM judges you can read and trust: verdicts constrained to parse, verdict probabilities from
the judge's log-probabilities, and the judge's agreement with human votes.

Real vLLM judges: the session's `front_door` (tiny Qwen3 and its LoRA on one engine) and, as a
REMOTE judge behind its own URL and key, a second front door on tiny Qwen3 (`remote`, one more
engine for this module). The tiny model is random: what it says is noise, but every verdict
must parse, and every number must follow from what the engine returned, which the tests
recompute by hand (`hand_distribution`, `independent_agreement`)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
from conftest import TINY_LORA
from sklearn.metrics import cohen_kappa_score

from posttrain.config import Settings
from posttrain.errors import PosttrainError
from posttrain.evaluate.endpoint import RequestCache, connected, logprob_tail
from posttrain.evaluate.judge import (
    RATING, JudgeSupport, ask, expected_rating, make_judge, outcome_probs, verdict_distribution, verdict_grammar,
)
from posttrain.evaluate.judge_agreement import SUITE, agreement_stats, latest_agreements, run_judge_agreement
from posttrain.evaluate.mt_bench import run_mt_bench
from posttrain.evaluate.mt_bench_files import load_judge_prompts
from posttrain.evaluate.report import MTBenchSuite, NightlyConfig, nightly
from posttrain.registry import Registry
from posttrain.store import EvalRun
from posttrain.ui.imports import import_battles
from posttrain.ui.votes import record_vote


def tokens(*spec) -> list[list]:
    """A logprob tail as `logprob_tail` stores it, from (token, {alternative: probability})
    pairs (a bare string: a certain token)."""
    out = []
    for item in spec:
        token, alternatives = (item, {item: 1.0}) if isinstance(item, str) else item
        out.append([token, math.log(alternatives[token]), [[a, math.log(p)] for a, p in alternatives.items()]])
    return out


# --- verdict probabilities, on hand-made log-probabilities ---

def test_a_one_is_split_into_one_and_ten_by_the_next_token():
    tail = tokens("Fine. ", "[[", ("1", {"1": 0.5, "7": 0.3, "9": 0.2}), ("0", {"0": 0.75, "]]": 0.25}), "]]")
    probs = verdict_distribution(tail, "rating")
    assert probs["10"] == pytest.approx(0.375) and probs["1"] == pytest.approx(0.125)
    assert expected_rating(probs) == pytest.approx(10 * 0.375 + 0.125 + 7 * 0.3 + 9 * 0.2)


def test_another_digit_taken_counts_the_ones_as_rating_one_and_odd_tokens_are_read_or_ignored():
    tail = tokens("Ok ", ("[[8", {"[[8": 0.5, "[[1": 0.2, "[[10]]": 0.1, "[[": 0.1, "[[x": 0.1}), "]]")
    probs = verdict_distribution(tail, "rating")  # the token holds the brackets too: read past them
    assert probs == pytest.approx({**dict.fromkeys(map(str, range(1, 11)), 0.0), "8": 0.625, "1": 0.25, "10": 0.125})
    # The last `[[` opens no verdict: no probabilities, whatever came before.
    assert verdict_distribution(tokens("[[", "7", "]] then [[", "rating", "]]"), "rating") is None
    assert verdict_distribution(None, "rating") is None


def test_pairwise_probabilities_ignore_words_that_start_with_a_verdict_letter_and_average_both_orders():
    first = verdict_distribution(tokens(" [[", ("A", {"A": 0.5, "B": 0.3, "Assistant": 0.2}), "]]"), "winner")
    assert first == pytest.approx({"A": 0.625, "B": 0.375, "C": 0.0})
    second = {"A": 0.1, "B": 0.6, "C": 0.3}  # the model is B here
    assert outcome_probs(first, second) == pytest.approx({"a": 0.6125, "b": 0.2375, "tie": 0.15})


def test_the_explanation_is_capped_so_the_verdict_fits_in_max_tokens():
    from xgrammar.testing import _is_grammar_accept_string as accepts

    assert accepts(verdict_grammar("winner", 20), "x" * 12 + "[[C]]")
    assert not accepts(verdict_grammar("winner", 20), "x" * 13 + "[[C]]")  # 20 tokens, 8 kept for the verdict
    assert accepts(verdict_grammar("rating", 20), "Fine.\n[[10]]")
    assert not accepts(verdict_grammar("rating", 20), "see [1] [[10]]") and not accepts(verdict_grammar("rating", 20), "[[11]]")


# --- agreement math, against an independent computation ---

def independent_agreement(judge: list[str], human: list[str], disagree: list[bool]) -> dict[str, float]:
    """The four numbers by loops and scikit-learn, not the module's numpy."""
    pairs = list(zip(judge, human))
    decisive = [(j, h) for j, h in pairs if "tie" not in (j, h)]
    out = {"agreement_with_ties": sum(j == h for j, h in pairs) / len(pairs),
           "position_bias": sum(disagree) / len(disagree)}
    if decisive:
        out["agreement_without_ties"] = sum(j == h for j, h in decisive) / len(decisive)
    if len(set(judge) | set(human)) > 1:
        out["cohen_kappa"] = cohen_kappa_score(judge, human, labels=["a", "b", "tie"])
    return out


def independent_intervals(judge, human, disagree, rounds: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile intervals over the same resamples (numpy's generator with the documented seed)."""
    index = np.random.default_rng(seed).integers(0, len(judge), size=(rounds, len(judge)))
    samples: dict[str, list[float]] = {}
    for row in index:
        with np.errstate(invalid="ignore", divide="ignore"):
            numbers = independent_agreement([judge[i] for i in row], [human[i] for i in row], [disagree[i] for i in row])
        for metric, value in numbers.items():
            if math.isfinite(value):
                samples.setdefault(metric, []).append(value)
    return {m: tuple(np.percentile(v, [2.5, 97.5])) for m, v in samples.items()}


def bounds(intervals: dict) -> dict[str, float]:
    """{metric: (low, high)} flattened, for pytest.approx."""
    return {f"{metric} {side}": float(x) for metric, pair in intervals.items() for side, x in zip(("low", "high"), pair)}


def test_agreement_kappa_position_bias_and_intervals_match_an_independent_computation():
    judge = ["a", "a", "b", "tie", "b", "a", "tie", "b", "a", "a", "b", "tie"]
    human = ["a", "b", "b", "tie", "a", "a", "a", "b", "a", "tie", "b", "b"]
    disagree = [False, False, True, False, False, False, True, False, False, True, False, False]
    stats = agreement_stats(judge, human, disagree, rounds=300)
    expected = independent_agreement(judge, human, disagree)
    assert {m: v[0] for m, v in stats.items()} == pytest.approx(expected)
    assert stats["agreement_without_ties"][3] == 8 and stats["agreement_with_ties"][3] == 12
    intervals = independent_intervals(judge, human, disagree, rounds=300)
    assert bounds({m: v[1:3] for m, v in stats.items()}) == pytest.approx(bounds(intervals))
    # Everyone agrees on one label: kappa is undefined and left out, not reported as 0 or 1.
    assert "cohen_kappa" not in agreement_stats(["a"] * 5, ["a"] * 5, [False] * 5, rounds=50)


# --- real vLLM judges ---

def hand_distribution(tail: list[list]) -> dict[int, float]:
    """The rating distribution read off a tiny-Qwen3 tail by hand: the digit is the token after
    the text's last "[[" (one token or two); a "1" taken is 10 with the share of "0" at the next
    token."""
    at = max(i for i in range(1, len(tail)) if "".join(t[0] for t in tail[:i]).endswith("[["))
    probs = {int(alt): math.exp(lp) for alt, lp in tail[at][2] if alt in [str(d) for d in range(1, 10)]}
    if tail[at][0] == "1":
        following = {alt: math.exp(lp) for alt, lp in tail[at + 1][2]}
        zero = following.get("0", 0.0)
        close = sum(p for alt, p in following.items() if alt.startswith("]"))
        probs[10] = probs[1] * zero / (zero + close)
        probs[1] -= probs[10]
    total = sum(probs.values())
    return {rating: p / total for rating, p in probs.items()}


def hand_expectation(tail: list[list]) -> float:
    return sum(rating * p for rating, p in hand_distribution(tail).items())


def test_a_served_vllm_judge_is_constrained_and_every_verdict_parses(front_door, registry, tiny, tmp_path):
    result = run_mt_bench(tiny.name, judge_model=tiny.name, base_url=front_door.base_url, api_key=front_door.api_key,
                          limit=3, max_tokens=24, judge_max_tokens=40, cache_dir=tmp_path, suite="judge-served",
                          registry=registry)
    assert (result.run.config["verdict_format"], result.run.config["verdict_probabilities"]) == ("constrained", True)
    assert result.judgments == 6 and result.unparsable == 0 and result.errors == 0
    for record in result.records:  # explanation first (bounded), then the verdict, nothing after
        assert re.fullmatch(r"[^\[\]]{0,32}" + RATING, record["judgments"][0]) and 1 <= record["rating"] <= 10
        assert 1 <= record["expected_rating"] <= 10
    # Each expectation follows from the log-probabilities the engine returned (the judge's cache).
    cached = [json.loads(line) for line in (tmp_path / f"judge-{tiny.name}.jsonl").read_text().splitlines()]
    verdicts = [r for r in cached if r.get("text", "").endswith("]]")]
    assert sorted(hand_expectation(r["logprobs"]) for r in verdicts) == pytest.approx(
        sorted(r["expected_rating"] for r in result.records))
    scores = {s.metric: s.value for s in result.scores}
    assert scores["expected_score"] == pytest.approx(np.mean([r["expected_rating"] for r in result.records]))
    assert scores["score"] == pytest.approx(np.mean([r["rating"] for r in result.records]))


def test_probabilities_match_a_hand_computation_from_the_engines_reply(front_door, tiny):
    client = openai.OpenAI(base_url=front_door.base_url, api_key=front_door.api_key)
    messages = [{"role": "user", "content": "Rate the answer 'Paris' to 'Capital of France?' as [[rating]]."}]

    def ask(grammar: str):
        reply = client.chat.completions.create(model=tiny.name, messages=messages, max_tokens=40, temperature=0,
                                               logprobs=True, top_logprobs=20,
                                               extra_body={"structured_outputs": {"grammar": grammar}})
        tail = [[t.token, t.logprob, [[a.token, a.logprob] for a in t.top_logprobs]] for t in reply.choices[0].logprobs.content]
        return reply.choices[0], tail

    choice, tail = ask(verdict_grammar("rating", 40))
    ours = verdict_distribution(logprob_tail(choice), "rating")
    assert {int(k): p for k, p in ours.items() if p} == pytest.approx(hand_distribution(tail))
    # Forced through "[[1": the engine's next token decides between 1 and 10.
    choice, tail = ask('root ::= "Fine. [[1" "0"? "]]"')
    ours = verdict_distribution(logprob_tail(choice), "rating")
    assert 0 < ours["10"] < 1 and ours["10"] + ours["1"] == pytest.approx(1.0)
    assert ours["10"] == pytest.approx(hand_distribution(tail)[10])


def test_a_verdict_cut_short_by_the_context_is_asked_again_within_the_room_left(front_door, registry, tiny, tmp_path):
    judge = make_judge(registry, tiny.name, front_door.base_url, front_door.api_key, RequestCache(tmp_path / "j.jsonl"))
    assert judge.context == 2048

    def verdict(words: int, max_tokens: int) -> dict:
        async def asking():
            async with connected([judge]):
                return await ask(judge, JudgeSupport(constrained=True, logprobs=True), "rating",
                                 load_judge_prompts()["single-v1"], {"question": "Agree?", "answer": "yes " * words},
                                 asyncio.Semaphore(1), max_tokens)
        return asyncio.run(asking())

    short = verdict(100, 16)
    # " yes" is one token: grow the answer until the prompt leaves 12 tokens of the context,
    # which vLLM then gives instead of the 200 asked for (and 200 - 8 characters of explanation
    # would not fit in 12 tokens).
    words = 100 + judge.context - 12 - short["prompt_tokens"]
    record = verdict(words, 200)
    cached = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert [(r["prompt_tokens"], r["finish_reason"]) for r in cached[1:]] == [(2036, "length"), (2036, "stop")]
    assert record["verdict"] is not None and re.fullmatch(r"[^\[\]]{0,4}" + RATING, record["text"])


def test_pairwise_against_the_real_front_door(front_door, registry, tiny, tmp_path):
    result = run_mt_bench(TINY_LORA, judge_model=tiny.name, base_url=front_door.base_url, api_key=front_door.api_key,
                          mode="pairwise", baseline=tiny.name, limit=2, max_tokens=24, judge_max_tokens=40,
                          cache_dir=tmp_path, suite="judge-served-pair", registry=registry)
    assert result.run.config["verdict_format"] == "constrained" and result.unparsable == 0 and result.judgments == 4
    for record in result.records:
        assert all(re.fullmatch(r"[^\[\]]{0,32}\[\[[ABC]\]\]", j) for j in record["judgments"])
        first, second = record["order_probs"]
        assert sum(first.values()) == pytest.approx(1) and sum(record["outcome_probs"].values()) == pytest.approx(1)
        assert record["outcome_probs"]["a"] == pytest.approx((first["A"] + second["B"]) / 2)
    assert result.battles == 4 and {s.metric for s in result.scores} >= {"win_rate", "expected_win_rate"}


VOTES = [  # (source, conversation a, conversation b, vote)
    ("arena", ["What is 2+2?", "4."], ["What is 2+2?", "5."], "a"),
    ("arena", ["Name a color.", "Blue."], ["Name a color.", "I don't know."], "a"),
    ("arena", ["Capital of France?", "Berlin."], ["Capital of France?", "Paris."], "b"),
    ("side-by-side", ["Say hi.", "hi"], ["Say hi.", "hello"], "tie"),
    ("arena", ["'cat' in French?", "gato"], ["'cat' in French?", "Katze"], "bothbad"),
    ("arena", ["Count to 2.", "1 2", "Now to 3.", "1 2 3"], ["Count to 2.", "1, 2", "Now to 3.", "3"], "a"),
    ("arena", ["A", "b", "C", "d", "E", "f"], ["A", "x", "C", "y", "E", "z"], "b"),
    ("judge:gpt-4", ["Q", "a"], ["Q", "b"], "a"),  # not a human vote: left out
    ("arena", [], [], "a"),  # no conversation: skipped
    ("arena", ["Q1", "a"], ["Q2", "b"], "b"),  # the sides were asked different things: skipped
]


@pytest.fixture(scope="module")
def votes(tmp_path_factory) -> Registry:
    """A store of its own holding VOTES, so other tests' arena battles never mix in."""
    home = tmp_path_factory.mktemp("votes-home")
    registry = Registry(Settings(home=home, db_url=f"sqlite:///{home / 'posttrain.db'}"))
    for i, (source, a, b, vote) in enumerate(VOTES):
        record_vote(registry.store, session_hash=f"s{i}", model_a="m1", model_b="m2", conversation_a=chat(a),
                    conversation_b=chat(b), vote=vote, source=source)
    return registry


def chat(turns: list[str]) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def test_judge_agreement_reproduces_an_independent_computation(front_door, tiny, votes, tmp_path):
    result = run_judge_agreement(tiny.name, judge_base_url=front_door.base_url, judge_api_key=front_door.api_key,
                                 judge_max_tokens=40, cache_dir=tmp_path, rounds=200, registry=votes)
    assert result.skipped == {"without conversations": 1, "whose sides were asked different questions": 1}
    assert [r["prompt"] for r in result.records] == ["pair-v2"] * 5 + ["pair-v2-multi-turn"] * 2
    assert result.unparsable == 0 and result.errors == 0 and result.run.config["verdict_format"] == "constrained"
    known = {"a": "a", "b": "b", "tie": "tie", "bothbad": "tie"}
    human = [known[vote] for source, a, b, vote in VOTES[:7]]
    letters = [[re.search(r"\[\[([ABC])\]\]$", j)[1] for j in r["judgments"]] for r in result.records]
    as_model_a = [({"A": "a", "B": "b", "C": "tie"}[x], {"A": "b", "B": "a", "C": "tie"}[y]) for x, y in letters]
    judge = [first if first == second else "tie" for first, second in as_model_a]
    disagree = [first != second for first, second in as_model_a]
    stored = {s.metric: s for s in result.scores}
    assert {m: s.value for m, s in stored.items()} == pytest.approx(independent_agreement(judge, human, disagree))
    intervals = independent_intervals(judge, human, disagree, rounds=200)
    assert bounds(result.run.config["intervals"]) == pytest.approx(bounds(intervals))
    assert result.run.model == tiny.name and result.run.suite == SUITE and stored["position_bias"].n == 7
    assert latest_agreements(votes.store)[tiny.name].battles == 7


@pytest.fixture(scope="module")
def remote(registry, tiny):
    """A second front door with its own key: a judge somewhere else."""
    from posttrain.serve.app import start_front_door

    door = start_front_door([tiny.name], api_keys=["other-key"], registry=registry)
    yield door
    door.stop()


def chat_requests(door) -> float:
    text = httpx.get(door.base_url.removesuffix("/v1") + "/metrics").text
    return sum(float(v) for v in re.findall(r'^posttrain_requests_total\{[^}]*endpoint="chat"[^}]*\} (\S+)$', text, re.M))


def test_a_remote_judge_gets_its_own_key_never_ours(front_door, remote, registry, tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    common = {"base_url": front_door.base_url, "api_key": front_door.api_key, "limit": 1, "max_tokens": 24,
              "judge_max_tokens": 40, "cache_dir": tmp_path, "registry": registry}
    with pytest.raises(PosttrainError, match=f"^{remote.base_url} refused the API key"):  # ours was not sent
        run_mt_bench(tiny.name, judge_model=tiny.name, judge_base_url=remote.base_url, **common)
    before = chat_requests(remote)
    far = run_mt_bench(tiny.name, judge_model=tiny.name, judge_base_url=remote.base_url, judge_api_key="other-key",
                       **common)
    # 2 answers from our front door; the probe and 2 verdicts from the remote one.
    assert far.requests_sent == 5 and chat_requests(remote) - before == 3
    assert far.run.config["judge_base_url"] == remote.base_url and far.run.config["verdict_format"] == "constrained"
    assert far.unparsable == 0 and far.errors == 0
    # That door serves our registered checkpoint's folder: the same judge, whatever its URL.
    assert run_mt_bench(tiny.name, judge_model=tiny.name, **common).requests_sent == 0


def test_a_judges_identity_is_its_checkpoint_when_known_else_its_url_and_root(remote, registry, votes, tiny, tmp_path):
    def identity(where: Registry) -> str:
        return make_judge(where, tiny.name, remote.base_url, "other-key", RequestCache(tmp_path / "j.jsonl")).identity

    assert identity(registry) == f"{tiny.path}@{tiny.created_at}"  # re-registering the name changes it
    assert identity(votes) == f"{remote.base_url} {tiny.path}"  # a model this registry does not know


def test_judge_agreement_from_the_cli_with_a_remote_judge(remote, tiny, votes, tmp_path):
    env = {**os.environ, "POSTTRAIN_HOME": str(votes.settings.home), "POSTTRAIN_DB_URL": votes.settings.db_url}
    run = subprocess.run([sys.executable, "-m", "posttrain", "eval", "judge-agreement", "--judge", tiny.name,
                          "--judge-base-url", remote.base_url, "--judge-api-key", "other-key", "--limit", "3",
                          "--rounds", "100", "--judge-max-tokens", "40", "--cache-dir", str(tmp_path), "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    numbers = json.loads(run.stdout)
    assert numbers["agreement_with_ties"]["n"] == 3 and 0 <= numbers["agreement_with_ties"]["value"] <= 1
    assert "3 battles decided (constrained verdicts), 0 unparsable" in run.stderr
    latest = votes.store.all(EvalRun, EvalRun.suite == SUITE, order_by=EvalRun.id)[-1]
    assert latest.config["judge_base_url"] == remote.base_url and latest.config["battles"] == 3


def test_the_nightly_report_shows_agreement_next_to_every_judge_derived_score(front_door, registry, tiny, tmp_path):
    human = tmp_path / "human.jsonl"  # MT-Bench human judgments, imported and then judged
    human.write_text("".join(json.dumps({
        "question_id": 81 + i, "model_a": "gpt-4", "model_b": "llama-13b", "winner": winner, "judge": "expert_1",
        "turn": 1, "conversation_a": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}],
        "conversation_b": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "No."}],
    }) + "\n" for i, winner in enumerate(["model_a", "model_b", "tie", "model_a"])))
    import_battles(registry.store, human)
    run_judge_agreement(tiny.name, judge_base_url=front_door.base_url, judge_api_key=front_door.api_key,
                        source="mt-bench-human", judge_max_tokens=40, cache_dir=tmp_path, rounds=100, registry=registry)
    run_mt_bench(tiny.name, judge_model=tiny.name, base_url=front_door.base_url, api_key=front_door.api_key, limit=1,
                 max_tokens=16, judge_max_tokens=40, cache_dir=tmp_path, suite="judge-report", registry=registry)
    config = NightlyConfig(models=[tiny.name], benchmarks=[], mt_bench=[MTBenchSuite(name="judge-report",
                                                                                       judge_model=tiny.name)])
    report = nightly(config, run=False, registry=registry, out=tmp_path / "report.html")
    agreement = report.agreements[tiny.name]
    judged = [r for r in report.rows if r.get("judge") == tiny.name]
    assert {r["metric"] for r in judged} >= {"score", "expected_score"}
    lines = [line for line in report.markdown.splitlines() if "| judge-report |" in line]
    assert len(lines) == len(judged) and all(agreement.short() in line for line in lines)
    assert any("| judge verdicts |" in line for line in lines) and any("| judge, probability-weighted |" in line
                                                                        for line in lines)
    # Four battles cannot tell a random judge from chance: the report says so.
    assert agreement.near_chance and f"JUDGE WARNING {agreement.summary()}" in report.markdown
    html = report.html_path.read_text()
    assert "Judge agreement with human votes" in html and "indistinguishable from chance" in html
    assert "GPT-4 vs humans 66%" in html
