"""`posttrain train sft|dpo|grpo|merge|quantize`: each a thin shell over the function of the same name."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

import typer

from posttrain.config import SET_VALUES
from posttrain.train.base import TrainRecipe
from posttrain.train.dpo import DPORecipe, train_dpo
from posttrain.train.grpo import GRPORecipe, train_grpo
from posttrain.train.sft import SFTRecipe, train_sft

app = typer.Typer(help="Post-train registered checkpoints (TRL + PEFT); every result is registered with its lineage.",
                  no_args_is_help=True)

RECIPE_HELP = "YAML recipe (see recipes/); without one, the built-in defaults (the default model, built-in sample data)."
SET_HELP = f"Override a recipe key, e.g. --set training.max_steps=10 --set lora.r=8 (repeatable). {SET_VALUES}"
RESUME_HELP = "Continue an interrupted run from its last checkpoint."


def _trainer_command(recipe_class: type[TrainRecipe], train: Callable) -> Callable:
    def command(recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP),
                overrides: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
                resume: bool = typer.Option(False, "--resume", help=RESUME_HELP)):
        row = train(recipe_class.load(recipe, overrides or []), resume=resume)
        if row is not None:  # None on the other ranks of a multi-process run
            typer.echo(f"registered {row.name} ({row.stage}, {row.kind}, parent {row.parent}): {row.path}")
    return command


app.command("sft", help="Supervised fine-tuning on chat data: LoRA, QLoRA or full; assistant-only loss; "
            "packing; thinking-mode fusion (recipes/sft.yaml, recipes/sft-thinking-fusion.yaml).")(
    _trainer_command(SFTRecipe, train_sft))
app.command("dpo", help="Direct preference optimization on preference pairs, e.g. `posttrain arena export` "
            "output (recipes/dpo.yaml).")(_trainer_command(DPORecipe, train_dpo))
app.command("grpo", help="GRPO with rule-based rewards: math answer, think format, length, code tests "
            "(recipes/grpo-gsm8k.yaml).")(_trainer_command(GRPORecipe, train_grpo))


@app.command("merge")
def merge(adapter: str = typer.Argument(..., help="A registered LoRA adapter."),
          output: Optional[str] = typer.Option(None, "--output", "-o", help="Registry name (default: ADAPTER-merged).")):
    """Merge a LoRA adapter into its base: a full checkpoint, registered as stage `merge`."""
    from posttrain.train.merge import merge as run

    row = run(adapter, output)
    typer.echo(f"registered {row.name} (merge of {adapter}): {row.path}")


@app.command("quantize")
def quantize(model: str = typer.Argument(..., help="A registered checkpoint (an adapter is merged first)."),
             scheme: str = typer.Option("w8a8-int8", help="w8a8-int8 (CPU and GPU), w8a16, w4a16-gptq, fp8-dynamic "
                                        "(GPU schemes: calibrated here, served on GPUs)."),
             output: Optional[str] = typer.Option(None, "--output", "-o", help="Registry name (default: MODEL-SCHEME)."),
             samples: int = typer.Option(48, help="Calibration conversations."),
             data: str = typer.Option("builtin:chat", help="Chat data for calibration and held-out perplexity.")):
    """Quantize with llm-compressor to a compressed-tensors checkpoint vLLM serves; prints size and
    perplexity before and after."""
    from posttrain.train.quantize import QuantizeRecipe, quantize as run

    options = {"model": model, "scheme": scheme, "output": output, "calibration_samples": samples, "data.path": data}
    row = run(QuantizeRecipe.load(None, values={k: v for k, v in options.items() if v is not None}))
    typer.echo(f"registered {row.name} ({scheme} of {model}): {row.path}")


data_app = typer.Typer(help="Training data: generate it from a served teacher.", no_args_is_help=True)


@data_app.command("generate")
def generate(
    teacher: str = typer.Option(..., help="The teacher model's name at the endpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="SFT JSONL to write (atomically), with OUT.meta.json beside it."),
    prompts: Optional[List[str]] = typer.Option(None, help="Prompt data (file, builtin:NAME, dataset); repeatable. "
                                                "Default: builtin:gsm8k."),
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", envvar="POSTTRAIN_BASE_URL",
                                 help="OpenAI-compatible API serving the teacher (default: `posttrain serve`)."),
    api_key: Optional[str] = typer.Option(None, envvar="POSTTRAIN_TEACHER_API_KEY", help="Key for that API."),
    reward: Optional[List[str]] = typer.Option(None, help="Reward that accepts a sample (repeatable; summed): "
                                               "math_answer (default), think_format, length_penalty, code_tests."),
    threshold: float = typer.Option(1.0, help="Keep samples whose reward sum reaches this."),
    n: int = typer.Option(4, "-n", help="Samples per prompt."),
    max_per_prompt: int = typer.Option(1, help="Accepted samples kept per prompt."),
    max_tokens: int = typer.Option(512, help="Longest sample."),
    temperature: float = typer.Option(0.8, help="Sampling temperature."),
    unsafe_exec: bool = typer.Option(False, "--unsafe-exec", help="Run code_tests samples without the bubblewrap "
                                     "sandbox (logged; only for code you trust)."),
):
    """Rejection sampling / distillation: sample a teacher, keep what the rewards accept, write SFT data."""
    from posttrain.train.distill import GenerateRecipe, generate as run

    # Flags go in as typer typed them: a teacher called `yes` or a numeric API key stays a string.
    values = {"teacher": teacher, "base_url": base_url, "api_key": api_key, "threshold": threshold, "n": n,
              "max_per_prompt": max_per_prompt, "max_tokens": max_tokens, "temperature": temperature,
              "prompts": [{"path": p} for p in prompts or ["builtin:gsm8k"]],
              "rewards": [{"name": r, "params": {"unsafe_exec": True} if unsafe_exec and r == "code_tests" else {}}
                          for r in reward or ["math_answer"]]}
    run(GenerateRecipe.load(None, values={k: v for k, v in values.items() if v is not None}), out)
