"""Evaluation through the real front door (`front_door`: one vLLM engine serving tiny-qwen3 and
its LoRA): lm-eval's local-completions / local-chat-completions backends against the in-process
`hf` backend, and MT-Bench judged by our own served model, interrupted and resumed."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import TINY_LORA

from posttrain.evaluate.bench import run_bench
from posttrain.evaluate.mt_bench import run_mt_bench
from posttrain.store import EvalRun, RequestLog

pytestmark = pytest.mark.slow


def loglikelihoods(samples_path: Path, task: str = "posttrain_mc") -> list[float]:
    """Every (sample, choice) log-likelihood lm-eval logged."""
    samples = [json.loads(line) for line in (samples_path / f"{task}.jsonl").open()]
    return [float(choice[0][0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for choice in s["resps"]]


def assert_same_loglikelihoods(served: Path, in_process: Path) -> None:
    a, b = loglikelihoods(served), loglikelihoods(in_process)
    assert len(a) == len(b) == 40  # 10 questions x 4 choices
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2  # fp32 on both sides


def requests_served(front_door) -> float:
    text = httpx.get(front_door.base_url.removesuffix("/v1") + "/metrics").text
    return sum(float(v) for v in re.findall(r'^posttrain_requests_total\{[^}]*endpoint="chat"[^}]*\} (\S+)$', text, re.M))


def test_bench_through_the_front_door_agrees_with_in_process(front_door, registry, tiny):
    served = run_bench(tiny.name, base_url=front_door.base_url, api_key=front_door.api_key, limit=10,
                       max_gen_toks=16, registry=registry)
    assert served.run.status == "done" and served.run.config["backend"] == "api"
    assert {(s.task, s.metric) for s in served.scores} >= {("posttrain_mc", "acc"), ("posttrain_ifeval", "prompt_level_acc")}
    in_process = run_bench(tiny.name, ["posttrain_mc"], limit=10, registry=registry)
    assert_same_loglikelihoods(served.samples_path, in_process.samples_path)
    acc = {r.run_id: r.value for r in served.scores + in_process.scores if (r.task, r.metric) == ("posttrain_mc", "acc")}
    assert len(set(acc.values())) == 1

    # Log-likelihoods went to /v1/completions with echo; the chat task to /v1/chat/completions.
    logs = registry.store.all(RequestLog, RequestLog.model == tiny.name, RequestLog.created_at >= served.run.started_at)
    assert any(r.endpoint == "completions" and r.request.get("echo") for r in logs)
    chat = [r for r in logs if r.endpoint == "chat"]
    assert len(chat) == 10 and chat[0].request["messages"][0]["role"] == "user"


def test_an_adapter_is_evaluated_through_the_front_door_and_with_peft_in_process(front_door, registry):
    served = run_bench(TINY_LORA, ["posttrain_mc"], base_url=front_door.base_url, api_key=front_door.api_key,
                       limit=10, registry=registry)
    in_process = run_bench(TINY_LORA, ["posttrain_mc"], limit=10, registry=registry)
    assert served.run.lineage == in_process.run.lineage == [TINY_LORA, "tiny-qwen3"]
    assert_same_loglikelihoods(served.samples_path, in_process.samples_path)


def test_mt_bench_judged_by_our_served_model_resumes_without_asking_twice(front_door, registry, tiny, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model", tiny.name, "--judge", tiny.name, "--base-url", front_door.base_url, "--api-key",
            front_door.api_key, "--limit", "3", "--max-tokens", "48", "--judge-max-tokens", "48", "--cache-dir",
            str(cache)]
    total = 3 * 2 * 2  # 3 questions x 2 turns, each answered and judged
    # Interrupt a CLI run (Ctrl-C) as soon as its first answer is cached.
    process = subprocess.Popen([sys.executable, "-m", "posttrain", "eval", "mt-bench", *args, "--parallel", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answers = cache / f"{tiny.name}.jsonl"
    deadline = time.monotonic() + 120
    while not (answers.exists() and answers.read_text().count("\n")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    cached = sum(path.read_text().count("\n") for path in cache.glob("*.jsonl"))
    assert 0 < cached < total
    interrupted = registry.store.all(EvalRun, EvalRun.suite == "mt-bench", order_by=EvalRun.id)[-1]
    assert interrupted.status == "failed" and "KeyboardInterrupt" in interrupted.config["error"]

    before = requests_served(front_door)
    result = run_mt_bench(tiny.name, judge_model=tiny.name, base_url=front_door.base_url, api_key=front_door.api_key,
                          limit=3, max_tokens=48, judge_max_tokens=48, cache_dir=cache, registry=registry)
    assert result.requests_sent == total - cached
    assert requests_served(front_door) - before == total - cached  # the server saw nothing twice
    assert result.run.status == "done" and result.judgments == 6 and result.errors == 0
    # A tiny random judge writes no verdict format: recorded and counted, never fatal.
    assert result.unparsable == result.run.config["unparsable"] == 6 - sum(s.n for s in result.scores
                                                                            if s.metric == "score")
    assert all(r["judgments"][0] is not None and r["prompt"] for r in result.records)
