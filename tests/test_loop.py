"""Pipelines and the loop on the tiny Qwen3: a pipeline killed mid-stage and resumed, recipes
checked before anything runs, rejection sampling from a served teacher, and one turn of
`posttrain loop` from seeded arena votes to a served, evaluated, reported candidate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.pipeline import PipelineRecipe
from posttrain.registry import file_sha256


def test_a_pipeline_killed_mid_stage_resumes_from_its_last_checkpoint(session_home, tiny, tmp_path):
    pipeline = tmp_path / "killed.yaml"
    pipeline.write_text(
        "name: killed\nmodel: tiny-qwen3\nstages:\n"
        "  - {name: sft, type: sft, recipe: {training: {max_steps: 2, batch_size: 2}, max_length: 256}}\n"
        "  - {name: dpo, type: dpo, recipe: {training: {max_steps: 16, batch_size: 2, save_steps: 1,"
        " save_total_limit: 16}, max_length: 256}}\n")
    command = [sys.executable, "-m", "posttrain", "pipeline", "run", str(pipeline)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "first.log"
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    runs = session_home / "runs" / "killed-dpo"
    deadline = time.monotonic() + 300
    while not (runs / "checkpoint-3" / "trainer_state.json").exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the DPO stage never reached step 3"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = max(int(p.name.split("-")[1]) for p in runs.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert saved < 16

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/2] killed/sft (sft): finished earlier -> killed-sft" in again.stdout
    assert f"resuming killed-dpo from {runs}/checkpoint-{saved}" in again.stdout
    steps = [json.loads(line)["step"] for line in (runs / "metrics.jsonl").open() if "loss" in json.loads(line)]
    assert steps[-(16 - saved):] == list(range(saved + 1, 17))  # picked up right after the saved step
    assert "killed-dpo" in subprocess.run([sys.executable, "-m", "posttrain", "models", "show", "killed-dpo"],
                                          env=env, capture_output=True, text=True).stdout


def test_pipeline_recipes_are_checked_before_anything_runs(tmp_path):
    from posttrain.errors import PosttrainError

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  - {name: a, type: sft}\n  - name: b\n    type: sft\n"
                   "    recipe:\n      data: [{path: '@a'}]\n")
    with pytest.raises(PosttrainError, match=r"bad.yaml:\d+: .*reads @a: not an earlier distill stage"):
        PipelineRecipe.load(bad)
    bad.write_text("name: bad\nstages:\n  - name: a\n    type: sft\n    recipe:\n      lora: {r: x}\n")
    with pytest.raises(PosttrainError, match=r"bad.yaml:6: stages.0.sft.recipe.lora.r: Input should be a valid integer"):
        PipelineRecipe.load(bad)
    bad.write_text("name: bad\nstages:\n  - {name: a, type: sft, recipe: {model: x}}\n")
    with pytest.raises(PosttrainError, match="use `from:` instead of recipe.model"):
        PipelineRecipe.load(bad)
    bad.write_text("name: bad\nstages:\n  - {name: a, type: bake}\n")
    with pytest.raises(PosttrainError, match=r"bad.yaml:3: .*does not match any of the expected tags"):
        PipelineRecipe.load(bad)


@pytest.mark.slow
def test_rejection_sampling_keeps_what_the_reward_accepts(front_door, tmp_path):
    from posttrain.train.distill import GenerateRecipe, generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n" for i in range(3)))
    recipe = GenerateRecipe.load(None, ["teacher=tiny-qwen3", f"base_url={front_door.base_url}",
                                        f"api_key={front_door.api_key}", f"prompts.0.path={prompts}", "n=3",
                                        "max_tokens=8", "rewards.0.name=length_penalty", "rewards.0.params.max_chars=1",
                                        "threshold=-0.999"])
    meta = generate(recipe, tmp_path / "out.jsonl")
    assert (meta["prompts"], meta["samples"]) == (3, 9) and meta["accepted"] < 9  # only the shortest survive
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").open()]
    assert len(rows) == meta["written"] <= 3 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert meta["prompt_files"][0]["sha256"] == file_sha256(prompts)


@pytest.mark.slow
def test_one_loop_turn_turns_seeded_votes_into_a_served_evaluated_reported_candidate(registry, tiny, capsys):
    from posttrain.loop import LoopRecipe, loop
    from posttrain.store import EvalRun
    from posttrain.ui.votes import record_vote

    conversation = [{"role": "user", "content": "Name a fruit."}]
    for i in range(4):
        record_vote(registry.store, session_hash="seed", model_a="tiny-qwen3", model_b="tiny-qwen3-lora",
                    conversation_a=conversation + [{"role": "assistant", "content": f"An apple ({i})."}],
                    conversation_b=conversation + [{"role": "assistant", "content": f"Rock {i}!"}], vote="a")
    recipe = LoopRecipe.load(None, ["base=tiny-qwen3", "dpo.training.max_steps=2", "dpo.training.batch_size=2",
                                    "dpo.max_length=256", "benchmarks.0.limit=2", "benchmarks.0.max_gen_toks=8",
                                    "mt_bench.0.judge_model=tiny-qwen3", "mt_bench.0.limit=1",
                                    "mt_bench.0.max_tokens=8", "mt_bench.0.judge_max_tokens=8"])
    result = loop(recipe, registry)
    candidate = registry.get("tiny-qwen3-loop1")
    prefs = Path(result["export"]["file"])
    assert (candidate.stage, candidate.kind, candidate.parent) == ("dpo", "adapter", "tiny-qwen3")
    assert candidate.datasets == [{"path": str(prefs), "sha256": file_sha256(prefs)}]
    assert result["export"]["pairs"] == 4 and len(prefs.read_text().splitlines()) == 4
    assert any(s.task.startswith("posttrain_") for s in registry.latest_scores(candidate.name))
    # MT-Bench ran with the tiny model judging (8-token verdicts) and recorded both judgments.
    mt_bench = registry.store.all(EvalRun, EvalRun.model == candidate.name, EvalRun.suite == "mt-bench")[-1]
    assert mt_bench.status == "done" and mt_bench.config["judgments"] == 2
    report = Path(result["evaluate"]["report"]).read_text()
    assert candidate.name in report and "tiny-qwen3" in report
    merged = result["promote"]["model"]
    assert registry.get(merged).parent == candidate.name
    # Two DPO steps barely move the tiny model: no score drops beyond 2 standard errors, and
    # MT-Bench, scored or not by so small a judge, does not fail the turn. So it is promoted.
    assert result["evaluate"]["regressions"] == [] and result["evaluate"]["failures"] == []
    assert result["promote"]["promoted"] is True and merged in registry.arena_roster()
    out = capsys.readouterr().out
    assert all(f"turn 1 [{step}]" in out for step in ("export", "dpo", "merge", "serve", "evaluate", "report", "promote"))
    # The votes are used up: the next turn has nothing to do.
    assert loop(recipe, registry)["skipped"] == "not enough new votes"
