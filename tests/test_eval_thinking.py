"""Evaluating thinking models in both modes, without an engine: which modes a model can be asked
for (one-line CLI errors), how lm-eval's chat requests carry the mode and score the answer after
the trace, MT-Bench in both modes against `eval_judge_stub` (a STAND-IN FOR A SERVED THINKING
MODEL AND A REMOTE JUDGE: it returns a trace in `reasoning` when asked to think), and the nightly
report's side-by-side table from stored rows. Through a real engine: test_thinking.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from eval_judge_stub import COMPLETION_TOKENS, JUDGE, THINKING_TOKENS, TRACE, JudgeStub

from posttrain.errors import PosttrainError
from posttrain.evaluate.modes import modes, request_body, side_by_side, split_task, task_name, token_scores

STUB_THINKER = "tiny-stub-thinker"


def test_the_modes_a_model_can_be_evaluated_in():
    assert modes(None, "m", None) == [None]  # no flag: the served default, plain task names
    assert modes("both", "m", "qwen3") == [True, False]
    assert modes("on", "m", "deepseek_r1") == [True]
    assert modes("off", "m", None) == [False]  # what a model that does not think does anyway
    with pytest.raises(PosttrainError, match=r"^--thinking on: m does not think \(no thinking format"):
        modes("on", "m", None)
    with pytest.raises(PosttrainError, match=r"^--thinking both: m always thinks"):
        modes("both", "m", "deepseek_r1")
    with pytest.raises(PosttrainError, match=r"^--thinking 'maybe': expected one of on, off, both"):
        modes("maybe", "m", "qwen3")
    assert request_body(True, "qwen3") == {"chat_template_kwargs": {"enable_thinking": True}}
    assert request_body(False, None) == {} and request_body(None, "qwen3") == {}
    assert request_body(False, "deepseek_r1") == {}  # a baseline that cannot switch keeps its mode
    assert [task_name("gsm8k", m) for m in (True, False, None)] == ["gsm8k@think", "gsm8k@no_think", "gsm8k"]
    assert split_task("mt_bench_vs_x@no_think") == ("mt_bench_vs_x", False) and split_task("a@local") == ("a@local", None)


def test_tokens_spent_are_scored_per_sample():
    [completion, reasoning] = token_scores("t@think", [(10, 6), (20, None), (None, None)])
    assert (completion.metric, completion.value, completion.n) == ("completion_tokens", 15.0, 2)
    assert (reasoning.metric, reasoning.value, reasoning.n) == ("reasoning_tokens", 3.0, 2)  # none reported: 0
    assert token_scores("t", []) == []


def test_lm_eval_chat_requests_carry_the_mode_and_score_the_answer_after_the_trace():
    from posttrain.evaluate.bench import _with_mode, go_offline

    go_offline()
    from lm_eval.models.api_models import JsonChatStr

    from posttrain.evaluate.thinking_chat import ThinkingChat, tokens_spent

    messages = [{"role": "user", "content": "Question: 5 + 6?\nAnswer:"}]
    on = ThinkingChat(thinking=True, body=request_body(True, "qwen3"), model="m", base_url="http://x/v1/chat/completions")
    payload = on._create_payload(messages, generate=True, gen_kwargs={"until": ["Question:"], "max_gen_toks": 32})
    # The task's stop string would end a trace that contains it: it cuts the answer instead.
    assert "stop" not in payload and payload["chat_template_kwargs"] == {"enable_thinking": True}
    reply = {"choices": [{"index": 0, "message": {"content": "11\n\nQuestion: next", "reasoning": "Question: 5 + 6"}}],
             "usage": {"completion_tokens": 12, "completion_tokens_details": {"reasoning_tokens": 7}}}
    assert on.parse_generations(reply) == ["11\n\n"]
    left_in = {"choices": [{"index": 0, "message": {"content": "<think>it is 12</think> 11"}}]}  # no reasoning parser
    assert on.parse_generations(left_in) == ["11"]
    sample = {"arguments": [(JsonChatStr(json.dumps(messages)), {"until": ["Question:"]})]}
    assert tokens_spent([sample], on.spent) == [(12, 7)]

    off = ThinkingChat(thinking=False, body=request_body(False, "qwen3"), model="m", base_url="http://x/v1/chat/completions")
    payload = off._create_payload(messages, generate=True, gen_kwargs={"until": ["Question:"]})
    assert payload["stop"] == ["Question:"] and payload["chat_template_kwargs"] == {"enable_thinking": False}

    out = {"results": {"g": {}, "t": {"acc,none": 1}}, "group_subtasks": {"g": ["t"]}, "config": {"model": "m"}}
    renamed = _with_mode(out, True)
    assert renamed["results"].keys() == {"g@think", "t@think"} and renamed["group_subtasks"] == {"g@think": ["t@think"]}
    assert renamed["config"] == {"model": "m"}  # not keyed by task


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_BASE_URL", "POSTTRAIN_API_KEY")}
    return subprocess.run([sys.executable, "-m", "posttrain", "eval", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def thinker(registry, tiny):
    """A registered thinking model (the tiny model's weights, the qwen3 format): the stub answers for it."""
    return registry.add(STUB_THINKER, tiny.path, stage="sft", parent=tiny.name, thinking="qwen3", replace=True)


def test_modes_a_model_cannot_run_in_are_one_line_cli_errors(tiny, thinker):
    for args, message in [
        (["bench", "--model", tiny.name, "--thinking", "on"], f"--thinking on: {tiny.name} does not think"),
        (["mt-bench", "--model", tiny.name, "--judge", "j", "--base-url", "http://127.0.0.1:9/v1", "--thinking", "both"],
         f"--thinking both: {tiny.name} does not think"),
        (["bench", "--model", thinker.name, "--thinking", "sometimes"], "--thinking 'sometimes': expected one of"),
        (["bench", "--model", thinker.name, "--thinking", "both"], "--thinking both evaluates through the served model"),
    ]:
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.startswith(f"posttrain: error: {message}"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_mt_bench_in_both_modes_judges_only_the_answer_and_stores_each_mode(registry, thinker, tmp_path):
    from posttrain.evaluate.mt_bench import run_mt_bench

    stub = JudgeStub(models=[thinker.name])
    try:
        result = run_mt_bench(thinker.name, judge_model=JUDGE, base_url=stub.base_url, cache_dir=tmp_path, limit=3,
                              thinking="both", suite="stub-thinking", registry=registry)
    finally:
        stub.stop()
    scores = {(s.task, s.metric): s for s in result.scores}
    assert {s.task for s in result.scores} == {"mt_bench@think", "mt_bench@no_think"}
    # The stub rates by question only, so both modes score alike; question 1's verdicts are unparsable.
    assert scores[("mt_bench@think", "score")].value == scores[("mt_bench@no_think", "score")].value
    assert scores[("mt_bench@think", "score")].n == 4 and result.judgments == 12
    spent = {(t, m): (scores[(t, m)].value, scores[(t, m)].n) for t in ("mt_bench@think", "mt_bench@no_think")
             for m in ("completion_tokens", "reasoning_tokens")}
    assert spent == {("mt_bench@think", "completion_tokens"): (COMPLETION_TOKENS, 6),
                     ("mt_bench@think", "reasoning_tokens"): (THINKING_TOKENS, 6),
                     ("mt_bench@no_think", "completion_tokens"): (1, 6), ("mt_bench@no_think", "reasoning_tokens"): (0, 6)}
    asked = [(r.get("chat_template_kwargs") or {}).get("enable_thinking") for r in stub.requests if r["model"] == thinker.name]
    assert sorted(asked) == [False] * 6 + [True] * 6
    judged = [json.dumps(r) for r in stub.requests if r["model"] == JUDGE and len(r["messages"]) == 2]
    assert len(judged) == 12 and all(f"Answer by {thinker.name}" in j for j in judged)
    assert not any(TRACE in j for j in judged), "a judge saw a trace"
    thought = [r for r in result.records if r["thinking"] is True]
    assert len(thought) == 6 and all(r["reasoning_tokens"] == [[THINKING_TOKENS, THINKING_TOKENS]] for r in thought)
    assert result.run.config["thinking"] == "both"
    # Side by side, as the CLI and the report show it.
    rows = [{"model": "m", "suite": "s", "task": s.task, "metric": s.metric, "value": s.value, "stderr": s.stderr}
            for s in result.scores]
    score = next(e for e in side_by_side(rows) if e["metric"] == "score")
    assert score["modes"].keys() == {True, False} and score["tokens"][True]["reasoning_tokens"]["value"] == THINKING_TOKENS


def store_run(registry, model: str, suite: str, values: dict[tuple[str, str], float]):
    from posttrain.evaluate.runs import Score, finish_run, recorded_run

    with recorded_run(registry, model, suite, {"thinking": "both"}, "test") as run:
        finish_run(registry.store, run, [Score(t, m, v, 0.01 if m == "exact_match" else None, 40)
                                         for (t, m), v in values.items()], None)


def test_the_nightly_report_shows_both_modes_side_by_side_with_the_tokens_spent(registry, tiny, tmp_path):
    from posttrain.evaluate.report import BenchSuite, NightlyConfig, nightly

    night = {("math@think", "exact_match"): 0.50, ("math@think", "completion_tokens"): 100.0,
             ("math@think", "reasoning_tokens"): 80.0, ("math@no_think", "exact_match"): 0.40,
             ("math@no_think", "completion_tokens"): 20.0, ("math@no_think", "reasoning_tokens"): 0.0}
    store_run(registry, tiny.name, "thinking-night", night)
    # The next night thinks three times as long for the same score: shown, never a regression.
    store_run(registry, tiny.name, "thinking-night", night | {("math@think", "completion_tokens"): 300.0,
                                                              ("math@think", "reasoning_tokens"): 250.0})
    config = NightlyConfig(models=[tiny.name], benchmarks=[BenchSuite(name="thinking-night")])
    report = nightly(config, run=False, registry=registry, out=tmp_path / "night.html")
    assert report.ok and not report.regressions
    assert "## Thinking vs not thinking" in report.markdown
    assert (f"| {tiny.name} | thinking-night | math | exact_match | 0.5000 ± 0.0100 | 0.4000 ± 0.0100 | +0.1000 | "
            f"300.0 (250.0 reasoning) | 20.0 (0.0 reasoning) |") in report.markdown
    assert f"| {tiny.name} | thinking-night | math@think | reasoning_tokens | tokens spent | 250.0000 |" in report.markdown
    html = report.html_path.read_text()
    assert "<h2>Thinking vs not thinking</h2>" in html and "300.0 (250.0 reasoning)" in html
