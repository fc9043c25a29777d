"""MT-Bench: question and judge-prompt files, verdict parsing, scoring, caching and battles.

The judge here is `eval_judge_stub.JudgeStub`, a STAND-IN FOR A REMOTE GPT-4 JUDGE served over
real HTTP (free-text verdicts with log-probabilities, as OpenAI's API gives them); MT-Bench
against a real vLLM server, judged by our own served model, with an interrupted run resumed, is
in test_eval_served.py, and constrained verdicts from real vLLM judges in test_eval_judge.py."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from eval_judge_stub import JUDGE, PREFERRED, JudgeStub
from held_relay import HeldRelay

from posttrain.errors import PosttrainError
from posttrain.evaluate.judge import pair_outcome, parse_rating, parse_winner
from posttrain.evaluate.mt_bench import run_mt_bench
from posttrain.evaluate.mt_bench_files import load_judge_prompts, load_questions
from posttrain.store import Battle

OFFICIAL = Path("/work/shared/data/mt_bench")


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_our_question_file_covers_every_category_with_references_where_graded_against_them():
    questions = load_questions()
    assert len(questions) == 10 and all(len(q.turns) == 2 for q in questions)
    assert {q.category for q in questions} == {"writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                               "stem", "humanities"}
    assert all(q.reference and len(q.reference) == 2 for q in questions if q.category in ("math", "reasoning", "coding"))


@pytest.mark.parametrize("line, problem", [
    ('{"question_id": 1, "category": "math", "turns": ["a", "b"]', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"category": "math", "turns": ["a"]}', "no question_id"),
    ('{"question_id": [1], "category": "math", "turns": ["a"]}', "question_id must be"),
    ('{"question_id": 1, "turns": ["a"]}', "category must be"),
    ('{"question_id": 1, "category": "math", "turns": []}', "turns must be a list of 1 or 2"),
    ('{"question_id": 1, "category": "math", "turns": ["a", "b", "c"]}', "turns must be a list of 1 or 2"),
    ('{"question_id": 1, "category": "math", "turns": ["a", "b"], "reference": ["x"]}', "one per turn"),
])
def test_a_bad_question_line_is_named_by_file_and_line(tmp_path, line, problem):
    path = write(tmp_path, '{"question_id": 0, "category": "writing", "turns": ["Hi"]}', line)
    with pytest.raises(PosttrainError, match=f"^{path}:2: .*{problem}"):
        load_questions(path)


def test_duplicate_question_ids_and_empty_files_are_refused(tmp_path):
    row = '{"question_id": 7, "category": "writing", "turns": ["Hi"]}'
    with pytest.raises(PosttrainError, match=r":3: question_id 7 already used on line 1"):
        load_questions(write(tmp_path, row, "", row))
    with pytest.raises(PosttrainError, match="no questions"):
        load_questions(write(tmp_path, ""))
    with pytest.raises(PosttrainError, match="cannot read the question file"):
        load_questions(tmp_path / "missing.jsonl")


def test_judge_prompt_files_are_checked(tmp_path):
    prompts = load_judge_prompts()
    assert prompts["single-math-v1"].type == "single" and "{ref_answer_1}" in prompts["single-math-v1"].prompt_template
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"name": "x", "type": "single", "system_prompt": "", "prompt_template": "{oops}"}) + "\n")
    with pytest.raises(PosttrainError, match=r"prompts.jsonl:1: prompt_template uses unknown placeholders \['oops'\]"):
        load_judge_prompts(bad)


@pytest.mark.skipif(not OFFICIAL.exists(), reason=f"{OFFICIAL} (FastChat's files, test data only) is missing")
def test_the_official_question_and_judge_prompt_files_are_accepted():
    questions = load_questions(OFFICIAL / "question.jsonl")
    assert len(questions) == 80 and len({q.category for q in questions}) == 8
    assert sum(q.reference is not None for q in questions if q.category == "math") == 10
    assert set(load_judge_prompts(OFFICIAL / "judge_prompts.jsonl")) >= {"single-v1", "pair-v2", "pair-math-v1"}


def test_verdict_parsing_and_both_orders():
    assert parse_rating("Good answer.\nRating: [[7]]") == 7.0
    assert parse_rating("Rating: [[8.5]]") == 8.5
    assert parse_rating("I'd say [6]") == 6.0  # FastChat's fallback pattern
    assert parse_rating("Format is [[rating]]... final: [[3]]") == 3.0  # the last verdict counts
    assert parse_rating("Rating: [[11]]") is None and parse_rating("no idea") is None
    assert parse_winner("...[[B]]") == "B" and parse_winner("tie: [[C]]") == "C" and parse_winner("A is better") is None
    assert pair_outcome("A", "B") == "a"  # model is A first, then B: it won both
    assert pair_outcome("B", "A") == "b"
    assert pair_outcome("A", "A") == "tie"  # position bias: the orders disagree
    assert pair_outcome("C", "C") == "tie" and pair_outcome("A", None) is None


@pytest.fixture(scope="module")
def stub(tiny):
    judge = JudgeStub(models=["tiny-qwen3", PREFERRED])
    yield judge
    judge.stop()


@pytest.fixture(scope="module")
def lora(registry, tiny):
    from conftest import build_tiny_lora

    return build_tiny_lora(registry)


def expected_rating(qid: int, turn: int) -> float:
    return max(1, qid % 9 + 1 - (turn - 1))


def weighted_rating(qid: int, turn: int) -> float:
    """The stub's rating weighted by its probabilities: 0.6 x the rating + 0.4 x its neighbour."""
    rating = expected_rating(qid, turn)
    return 0.6 * rating + 0.4 * (rating + 1 if rating < 9 else 8)


def test_single_grading_scores_per_turn_and_category_and_counts_unparsable(stub, registry, tiny, tmp_path):
    result = run_mt_bench(tiny.name, judge_model=JUDGE, base_url=stub.base_url, cache_dir=tmp_path, parallel=4,
                          suite="stub-single", registry=registry)
    # 20 answers, 20 verdicts, and the probe: refused with structured outputs, then without.
    assert (result.judgments, result.unparsable, result.errors, result.requests_sent) == (20, 2, 0, 42)
    assert (result.run.config["verdict_format"], result.run.config["verdict_probabilities"]) == ("parsed", True)
    scores = {s.metric: s for s in result.scores}
    questions = [q for q in load_questions() if q.question_id != 1]  # question 1's verdicts are unparsable
    ratings = [expected_rating(q.question_id, t) for q in questions for t in (1, 2)]
    assert scores["score"].value == pytest.approx(statistics.fmean(ratings)) and scores["score"].n == 18
    assert scores["score"].stderr == pytest.approx(statistics.stdev(ratings) / 18 ** 0.5)
    assert scores["score_turn2"].value == pytest.approx(statistics.fmean(expected_rating(q.question_id, 2) for q in questions))
    assert scores["score_math"].value == pytest.approx(statistics.fmean([5, 4, 6, 5]))  # questions 4 and 5
    assert "score_writing" not in scores  # question 1, the only writing one, got no parsable verdict
    weighted = [weighted_rating(q.question_id, t) for q in questions for t in (1, 2)]
    assert scores["expected_score"].value == pytest.approx(statistics.fmean(weighted)) and scores["expected_score"].n == 18
    assert scores["expected_score_turn1"].value == pytest.approx(statistics.fmean(weighted_rating(q.question_id, 1)
                                                                                  for q in questions))
    assert all(r["rating_probs"] is None for r in result.records if r["question_id"] == 1)
    assert {s.task for s in result.scores} == {"mt_bench"} and result.run.status == "done"
    assert result.run.config["unparsable"] == 2 and result.run.lineage == [tiny.name]

    # Grading against the reference: math/reasoning/coding use the -math- prompts.
    by_question = {(r["question_id"], r["turn"]): r for r in result.records}
    assert by_question[(4, 1)]["prompt"] == "single-math-v1" and by_question[(4, 2)]["prompt"] == "single-math-v1-multi-turn"
    assert by_question[(8, 1)]["prompt"] == "single-v1"
    judged = [r for r in stub.requests if r["model"] == JUDGE and "x = 5" in r["messages"][-1]["content"]]
    assert judged, "the reference answer was shown to the judge"
    # Turn 2 of the answer saw the model's own first answer.
    second = next(r for r in stub.requests if r["model"] == tiny.name and len(r["messages"]) == 3)
    assert second["messages"][1]["content"].startswith(f"Answer by {tiny.name}")
    assert registry.latest_scores(tiny.name) and any(s.task == "mt_bench" for s in registry.latest_scores(tiny.name))

    sent = len(stub.requests)
    again = run_mt_bench(tiny.name, judge_model=JUDGE, base_url=stub.base_url, cache_dir=tmp_path,
                         suite="stub-single", registry=registry)
    assert again.requests_sent == 0 and len(stub.requests) == sent  # everything came from the cache
    assert {s.metric: s.value for s in again.scores} == {s.metric: s.value for s in result.scores}


def test_pairwise_asks_both_orders_and_writes_each_verdict_once_as_a_battle(stub, registry, lora, tmp_path):
    def run():
        return run_mt_bench(lora.name, judge_model=JUDGE, base_url=stub.base_url, mode="pairwise", baseline="tiny-qwen3",
                            cache_dir=tmp_path, suite="stub-pair", registry=registry)

    result = run()
    assert (result.judgments, result.unparsable) == (20, 2)  # question 3, both turns
    counts = {k: result.run.config[k] for k in ("wins", "ties", "losses", "inconsistent")}
    assert counts == {"wins": 16, "ties": 2, "losses": 0, "inconsistent": 2}  # question 2: position bias
    scores = {s.metric: s for s in result.scores}
    assert scores["win_rate"].value == pytest.approx(17 / 18) and scores["win_rate"].n == 18
    # P(win) + P(tie) / 2 from both orders: 0.7 + 0.2 / 2 where PREFERRED's answer won, and
    # (0.7 + 0.1) / 2 + 0.2 / 2 on question 2, where both orders said A.
    assert scores["expected_win_rate"].value == pytest.approx((16 * 0.8 + 2 * 0.5) / 18)
    q2 = next(r for r in result.records if r["question_id"] == 2)
    assert q2["outcome_probs"] == pytest.approx({"a": 0.4, "b": 0.4, "tie": 0.2})
    assert {s.task for s in result.scores} == {"mt_bench_vs_tiny-qwen3"}
    battles = registry.store.all(Battle, Battle.source == f"judge:{JUDGE}")
    assert len(battles) == result.battles == 18 and result.run.config["battle_source"] == f"judge:{JUDGE}" and sorted({b.vote for b in battles}) == ["a", "tie"]
    assert {(b.model_a, b.model_b) for b in battles} == {(lora.name, "tiny-qwen3")}
    turn2 = next(b for b in battles if len(b.conversation_a) == 4)
    assert turn2.conversation_a[1]["content"].startswith(f"Answer by {lora.name}")
    assert turn2.conversation_b[1]["content"].startswith("Answer by tiny-qwen3")

    again = run()
    assert again.requests_sent == 0 and again.battles == 0
    assert len(registry.store.all(Battle, Battle.source == f"judge:{JUDGE}")) == 18  # not counted twice


def test_bad_input_fails_before_any_request(stub, registry, tiny, tmp_path):
    sent = len(stub.requests)
    with pytest.raises(PosttrainError, match="unknown model 'nope'"):
        run_mt_bench("nope", judge_model=JUDGE, base_url=stub.base_url, registry=registry)
    with pytest.raises(PosttrainError, match="does not serve gpt-5"):
        run_mt_bench(tiny.name, judge_model="gpt-5", base_url=stub.base_url, registry=registry)
    with pytest.raises(PosttrainError, match="needs a baseline"):
        run_mt_bench(tiny.name, judge_model=JUDGE, base_url=stub.base_url, mode="pairwise", registry=registry)
    with pytest.raises(PosttrainError, match=r"cannot reach http://127.0.0.1:9/v1"):
        run_mt_bench(tiny.name, judge_model=JUDGE, base_url="http://127.0.0.1:9/v1", registry=registry)
    assert len(stub.requests) == sent


def test_a_judge_gone_mid_run_is_a_one_line_error(stub, tiny, tmp_path):
    # The error is raised inside the run's task group; it used to surface as an ExceptionGroup
    # traceback with exit code 1.
    relay = HeldRelay(stub.base_url, let_through=2, hang_up=True)
    try:
        run = subprocess.run([sys.executable, "-m", "posttrain", "eval", "mt-bench", "--model", tiny.name, "--judge",
                              JUDGE, "--base-url", relay.base_url, "--limit", "2", "--cache-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
    finally:
        relay.stop()
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("posttrain: error: cannot reach ") and "Traceback" not in run.stderr, run.stderr
