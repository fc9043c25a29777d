"""Multi-stage post-training pipelines (DeepSeek-R1, Qwen3) as recipes.

A pipeline is an ordered list of stages; each stage's output feeds the next by registry name:

    name: sft-dpo
    model: smollm2-135m-instruct          # where the first stage starts
    stages:
      - {name: sft, type: sft, recipe: {training: {max_steps: 20}}}
      - {name: dpo, type: dpo}            # starts from the sft stage's output
      - {name: merged, type: merge}

Stage types: sft, dpo, grpo (`recipe:` is that method's recipe without model/output), merge,
quantize (`recipe:` a quantize recipe), distill (serve the stage's start as a teacher and
rejection-sample SFT data; later stages read it as `path: "@STAGE"`), eval (lm-eval on the
stage's start, scores stored) and serve (the start answers through the front door, then joins
the arena's roster). `from:` names an earlier stage, `base` (the pipeline's model) or any
registered model; by default a stage starts from the latest checkpoint before it.

Outputs are named PIPELINE-STAGE. Re-running a pipeline skips finished stages (recorded in
`$POSTTRAIN_HOME/runs/pipelines/NAME/state.json` and still present) and resumes an interrupted
training stage from its last checkpoint.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.config import Recipe, recipe_error
from posttrain.errors import PosttrainError
from posttrain.files import write_atomically
from posttrain.models import DEFAULT_MODEL
from posttrain.registry import Registry
from posttrain.train.distill import GenerateRecipe
from posttrain.train.dpo import DPORecipe, train_dpo
from posttrain.train.grpo import GRPORecipe, train_grpo
from posttrain.train.quantize import QuantizeRecipe
from posttrain.train.sft import SFTRecipe, train_sft

BASE = "base"
STAGE_DATA = "@"


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    start: str | None = Field(None, alias="from", description="An earlier stage, `base`, or a registered model.")

    @property
    def makes_checkpoint(self) -> bool:
        return self.type in ("sft", "dpo", "grpo", "merge", "quantize")


class _WithRecipe(Stage):
    @model_validator(mode="after")
    def _pipeline_sets_model_and_output(self):
        if fields := sorted({"model", "output"} & self.recipe.model_fields_set):
            raise recipe_error(("recipe", fields[0]), "a pipeline names each stage's model and output: use `from:` "
                               "instead of recipe.model")
        return self


class SFTStage(_WithRecipe):
    type: Literal["sft"]
    recipe: SFTRecipe = Field(default_factory=SFTRecipe)


class DPOStage(_WithRecipe):
    type: Literal["dpo"]
    recipe: DPORecipe = Field(default_factory=DPORecipe)


class GRPOStage(_WithRecipe):
    type: Literal["grpo"]
    recipe: GRPORecipe = Field(default_factory=GRPORecipe)


class QuantizeStage(_WithRecipe):
    type: Literal["quantize"]
    recipe: QuantizeRecipe = Field(default_factory=QuantizeRecipe)


class MergeStage(Stage):
    type: Literal["merge"]


class DistillStage(Stage):
    type: Literal["distill"]
    recipe: GenerateRecipe = Field(default_factory=lambda: GenerateRecipe(prompts=[{"path": "builtin:gsm8k"}]))


class EvalStage(Stage):
    type: Literal["eval"]
    tasks: list[str] | None = Field(None, description="lm-eval tasks (default: the offline pack).")
    limit: int | None = Field(None, gt=0, description="Samples per task (smoke runs).")
    max_gen_toks: int | None = Field(None, gt=0)


class ServeStage(Stage):
    type: Literal["serve"]


AnyStage = Annotated[Union[SFTStage, DPOStage, GRPOStage, QuantizeStage, MergeStage, DistillStage, EvalStage,
                           ServeStage], Field(discriminator="type")]
TRAINERS = {"sft": train_sft, "dpo": train_dpo, "grpo": train_grpo}


class PipelineRecipe(Recipe):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str = Field(DEFAULT_MODEL, description="The registered checkpoint the first stage starts from.")
    stages: list[AnyStage] = Field(min_length=1)
    max_steps: int | None = Field(None, gt=0, description="Cap every training stage at this many steps (smoke runs).")

    @model_validator(mode="after")
    def _references_point_backwards(self):
        seen: dict[str, Stage] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in seen or stage.name == BASE:
                raise recipe_error(("stages", i, "name"), f"stage name {stage.name!r} is used twice or reserved")
            if stage.start in seen and not seen[stage.start].makes_checkpoint:
                raise recipe_error(("stages", i, "from"),
                                   f"stage {stage.name} starts from {stage.start}, which makes no checkpoint")
            for j, source in enumerate(getattr(getattr(stage, "recipe", None), "data", None) or []):
                ref = source.path[len(STAGE_DATA):] if source.path.startswith(STAGE_DATA) else None
                if ref is not None and (ref not in seen or seen[ref].type != "distill"):
                    raise recipe_error(("stages", i, "recipe", "data", j, "path"),
                                       f"stage {stage.name} reads {source.path}: not an earlier distill stage")
            seen[stage.name] = stage
        return self


class Pipeline:
    """Runs a PipelineRecipe stage by stage, remembering what finished."""

    def __init__(self, recipe: PipelineRecipe, registry: Registry | None = None):
        self.recipe = recipe
        self.registry = registry or Registry()
        self.dir = self.registry.settings.runs_dir / "pipelines" / recipe.name
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def output_name(self, stage: Stage) -> str:
        return f"{self.recipe.name}-{stage.name}"

    def data_file(self, stage_name: str) -> Path:
        return self.dir / f"{stage_name}.jsonl"

    def start_of(self, index: int) -> str:
        """The registered model stage `index` starts from."""
        stage = self.recipe.stages[index]
        earlier = {s.name: s for s in self.recipe.stages[:index]}
        if stage.start == BASE:
            return self.recipe.model
        if stage.start in earlier:
            return self.output_name(earlier[stage.start])
        if stage.start is not None:
            return self.registry.get(stage.start).name
        made = [s for s in self.recipe.stages[:index] if s.makes_checkpoint]
        return self.output_name(made[-1]) if made else self.recipe.model

    def finished(self, stage: Stage) -> bool:
        done = self.state.get(stage.name)
        if done is None:
            return False
        if stage.makes_checkpoint:
            return self.registry.find(done["output"]) is not None
        return stage.type != "distill" or Path(done["output"]).exists()

    def run(self) -> dict[str, Any]:
        """Run every unfinished stage; returns {stage name: its record}."""
        from posttrain.models import pull_default

        if self.recipe.model == DEFAULT_MODEL and self.registry.find(DEFAULT_MODEL) is None:
            pull_default(self.registry)
        self.registry.get(self.recipe.model)
        self.dir.mkdir(parents=True, exist_ok=True)
        total = len(self.recipe.stages)
        for index, stage in enumerate(self.recipe.stages):
            where = f"[{index + 1}/{total}] {self.recipe.name}/{stage.name} ({stage.type})"
            if self.finished(stage):
                print(f"{where}: finished earlier -> {self.state[stage.name]['output']}", flush=True)
                continue
            start = self.start_of(index)
            print(f"{where}: from {start}", flush=True)
            run_stage = {"merge": self._merge, "quantize": self._quantize, "distill": self._distill,
                         "eval": self._eval, "serve": self._serve}.get(stage.type, self._train)
            output = run_stage(stage, start)
            self.state[stage.name] = {"output": output, "start": start,
                                      "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_atomically(self.state_path, json.dumps(self.state, indent=2))
            print(f"{where}: done -> {output}", flush=True)
        return self.state

    # --- what each stage type does; each returns what it produced ---------------------------

    def _train(self, stage: SFTStage | DPOStage | GRPOStage, start: str) -> str:
        from posttrain.train.base import last_checkpoint

        output = self.output_name(stage)
        data = [source.model_copy(update={"path": str(self.data_file(source.path[len(STAGE_DATA):]))})
                if source.path.startswith(STAGE_DATA) else source for source in stage.recipe.data]
        recipe = stage.recipe.model_copy(update={"model": start, "output": output, "data": data})
        if self.recipe.max_steps is not None:
            recipe.training = recipe.training.model_copy(update={"max_steps": self.recipe.max_steps})
        resume = last_checkpoint(self.registry.settings.runs_dir / output) is not None
        TRAINERS[stage.type](recipe, self.registry, resume=resume)
        return output

    def _merge(self, stage: MergeStage, start: str) -> str:
        from posttrain.train.merge import merge

        return merge(start, self.output_name(stage), self.registry).name

    def _quantize(self, stage: QuantizeStage, start: str) -> str:
        from posttrain.train.quantize import quantize

        recipe = stage.recipe.model_copy(update={"model": start, "output": self.output_name(stage)})
        return quantize(recipe, self.registry).name

    def _distill(self, stage: DistillStage, start: str) -> str:
        from posttrain.serve.app import start_front_door
        from posttrain.train.distill import generate

        out = self.data_file(stage.name)
        with start_front_door([start], registry=self.registry) as door:
            generate(stage.recipe.model_copy(update={"teacher": start, "base_url": door.base_url}), out)
        return str(out)

    def _eval(self, stage: EvalStage, start: str) -> str:
        from posttrain.evaluate.bench import run_bench

        result = run_bench(start, stage.tasks, limit=stage.limit, max_gen_toks=stage.max_gen_toks,
                           suite=f"pipeline:{self.recipe.name}", registry=self.registry)
        for score in result.scores:
            print(f"  {score.task} {score.metric} = {score.value:.4f}", flush=True)
        return start

    def _serve(self, stage: ServeStage, start: str) -> str:
        import openai

        from posttrain.serve.app import start_front_door

        with start_front_door([start], registry=self.registry) as door:
            reply = openai.OpenAI(base_url=door.base_url, api_key=door.api_key or "none").chat.completions.create(
                model=start, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0)
        print(f"  {start} answers: {reply.choices[0].message.content!r}", flush=True)
        self.registry.enter_arena(start)
        return start


def run_pipeline(path: str | Path, overrides: list[str] = (), registry: Registry | None = None) -> dict[str, Any]:
    """Load a pipeline recipe (YAML, with --set overrides) and run it."""
    return Pipeline(PipelineRecipe.load(path, overrides), registry).run()
