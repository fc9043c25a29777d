"""The flywheel on the tiny Qwen3: the shipped pipelines stage by stage (real TRL, vLLM, lm-eval).
The pipeline machinery and the loop are in test_loop.py (a file of its own, so the two run on
different pytest-xdist workers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.pipeline import PipelineRecipe, run_pipeline
from posttrain.registry import file_sha256

ROOT = Path(__file__).parent.parent
PIPELINES = sorted((ROOT / "recipes/pipelines").glob("*.yaml"))


def tiny_overrides(path: Path) -> list[str]:
    """Smoke settings for every stage of a shipped pipeline on the tiny model. Its samples are
    gibberish, so rejection sampling accepts everything (threshold 0) to have data to pass on."""
    out = ["model=tiny-qwen3", "max_steps=1"]
    for i, stage in enumerate(PipelineRecipe.load(path).stages):
        if stage.type in ("sft", "dpo", "grpo"):
            out += [f"stages.{i}.recipe.training.batch_size=2", f"stages.{i}.recipe.max_length=256"]
        if stage.type == "grpo":
            out += [f"stages.{i}.recipe.max_completion_length=8", f"stages.{i}.recipe.num_generations=2"]
        if stage.type == "distill":
            out += [f"stages.{i}.recipe.threshold=0", f"stages.{i}.recipe.n=2", f"stages.{i}.recipe.max_tokens=8",
                    f"stages.{i}.recipe.prompts.0.limit=3"]
        if stage.type == "eval":
            out += [f"stages.{i}.limit=2", f"stages.{i}.max_gen_toks=8"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_each_shipped_pipeline_runs_end_to_end_on_the_tiny_model(registry, tiny, path, capsys):
    recipe = PipelineRecipe.load(path)
    state = run_pipeline(path, tiny_overrides(path), registry)
    assert list(state) == [s.name for s in recipe.stages]
    for stage in (s for s in recipe.stages if s.makes_checkpoint):
        chain = [c.name for c in registry.lineage(state[stage.name]["output"])]
        assert chain[-1] == "tiny-qwen3" and chain[0] == f"{recipe.name}-{stage.name}"
        start = state[stage.name]["start"]
        assert start in chain and registry.get(chain[0]).stage == stage.type
    served = state["serve"]["output"]
    assert served in registry.arena_roster()
    assert any(s.task.startswith("posttrain_") for s in registry.latest_scores(state["eval"]["output"]))
    if "samples" in state:  # r1-style: the cold-start SFT was trained on the teacher's samples
        samples = Path(state["samples"]["output"])
        meta = json.loads(Path(f"{samples}.meta.json").read_text())
        assert meta["teacher"] == f"{recipe.name}-r1-zero" and (meta["prompts"], meta["samples"]) == (3, 6)
        # Threshold 0 accepts every sample (the filter itself: test_rejection_sampling_...); what
        # is checked here is what gets passed on: one conversation per prompt, all of them trained on.
        assert meta["acceptance_rate"] == meta["accepted"] / meta["samples"] and meta["written"] == 3
        written = [json.loads(line) for line in samples.read_text().splitlines()]
        assert len(written) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in written)
        cold = registry.get(f"{recipe.name}-cold-start")
        assert cold.parent == "tiny-qwen3" and {"path": str(samples), "sha256": file_sha256(samples)} in cold.datasets
    # A re-run skips every finished stage.
    capsys.readouterr()
    run_pipeline(path, tiny_overrides(path), registry)
    assert capsys.readouterr().out.count("finished earlier") == len(recipe.stages)
