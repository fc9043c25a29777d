"""What every training method shares: the recipe's common part, loading the start checkpoint,
TRL's common arguments, metrics, and turning the trained model into a registered checkpoint.

A method module (sft.py, dpo.py, grpo.py) is then one recipe class and one function:
`prepare()` -> build its TRL trainer -> `finish()`.

A run writes its TRL checkpoints, metrics.jsonl and TensorBoard logs to
`$POSTTRAIN_HOME/runs/OUTPUT/`; the finished model is written to a temporary folder in the model
store and moved into place only when complete, then registered with its lineage. An interrupted
run leaves its checkpoints behind, and `resume=True` (`--resume`) continues from the last one.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.models import DEFAULT_MODEL, pull_default
from posttrain.registry import Registry
from posttrain.store import Checkpoint
from posttrain.train.data import DataSource, Dataset, Method, load


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names, or all-linear: every projection incl. the MLP, not the LM head.")


class Optimization(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1: run `epochs`.")
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, gt=0, description="Per device.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    lr_scheduler: str = "cosine"
    warmup: float = Field(0.03, ge=0, description="Warm-up steps, or a fraction (< 1) of all steps.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU. bf16 on a CPU is mixed precision "
        "(fp32 weights, bf16 autocast): faster on CPUs with bf16 instructions, much slower on others.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (what --resume continues from).")
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(1, gt=0)
    seed: int = 42


class TrainRecipe(Recipe):
    """The part of a recipe every method has."""

    model: str = Field(DEFAULT_MODEL, description="Registered checkpoint to start from (an adapter is merged first).")
    output: str | None = Field(None, description="Registry name of the result (default: MODEL-METHOD).")
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora; qlora (4-bit base, needs CUDA + bitsandbytes); full fine-tuning.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: list[DataSource]
    training: Optimization = Field(default_factory=Optimization)
    max_length: int = Field(1024, gt=0, description="Tokens per training sequence (longer ones are truncated).")

    def output_name(self, method: str) -> str:
        return self.output or f"{self.model}-{method}"


@dataclass
class Prepared:
    """Everything a method needs to build its TRL trainer."""

    registry: Registry
    start: Checkpoint  # a full checkpoint
    output: str
    run_dir: Path
    data: Dataset
    tokenizer: Any
    model: Any
    peft_config: Any  # None for full fine-tuning
    resume_from: str | None


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def precision(opt: Optimization) -> str:
    if opt.precision != "auto":
        if opt.precision == "fp16" and not has_cuda():
            raise PosttrainError("training.precision fp16 needs a GPU here; use bf16, fp32 or auto")
        return opt.precision
    import torch

    return "bf16" if has_cuda() and torch.cuda.is_bf16_supported() else "fp32"


def start_checkpoint(registry: Registry, name: str) -> Checkpoint:
    """The full checkpoint a run starts from: the default model is provisioned on first use, and
    an adapter is merged into its base first (once; the merge is registered), so the new
    adapter's parent is a full model that vLLM can load it on, and the reference of DPO/GRPO is
    exactly the starting policy."""
    if name == DEFAULT_MODEL and registry.find(name) is None:
        pull_default(registry)
    row = registry.get(name)
    if row.kind == "full":
        return row
    from posttrain.train.merge import MERGED_SUFFIX, merge

    return registry.find(name + MERGED_SUFFIX) or merge(name, registry=registry)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run. The Trainer writes trainer_state.json last, so a
    checkpoint without a readable one was cut off mid-save (the process was killed) and is skipped."""
    def complete(folder: Path) -> bool:
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return True
        except (OSError, ValueError):
            return False

    found = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit() and complete(p)]
    return max(found, key=lambda p: int(p.name.split("-", 1)[1]), default=None)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise PosttrainError(f"{path}: the tokenizer has no chat template (posttrain trains chat models)")
    return tokenizer


def load_model(path: str, recipe: TrainRecipe):
    import torch
    from transformers import AutoModelForCausalLM

    # On a CPU, bf16 means autocast over fp32 weights: a model stored in bf16 trained slower here,
    # and its optimizer updates round away.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(recipe.training))
    kwargs: dict[str, Any] = {"dtype": dtype if dtype and has_cuda() else torch.float32}
    if recipe.method == "qlora":
        if not has_cuda() or importlib.util.find_spec("bitsandbytes") is None:
            raise PosttrainError("method qlora quantizes the base to 4 bits with bitsandbytes, which needs a CUDA GPU "
                                 "and `make install ENGINE=cuda`; on this machine use method: lora or full")
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if recipe.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, recipe.training.gradient_checkpointing)
    return model


def peft_config(recipe: TrainRecipe):
    if recipe.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=recipe.lora.target_modules, task_type="CAUSAL_LM")


def prepare(recipe: TrainRecipe, method: Method, registry: Registry | None = None,
            resume: bool = False) -> Prepared:
    """Check everything that can be wrong (names, data, leftovers of an earlier run) before the
    model is loaded, so a bad recipe fails in a second and leaves nothing behind."""
    registry = registry or Registry()
    output = recipe.output_name(method)
    registry.model_dir(output)  # validates the name
    if registry.find(output) is not None:
        raise PosttrainError(f"a model named {output!r} is already registered: set another `output` "
                             f"(--set output=NAME) or remove it (posttrain models rm {output})")
    data = load(recipe.data, method, seed=recipe.training.seed)
    run_dir = registry.settings.runs_dir / output
    previous = last_checkpoint(run_dir)
    if previous is not None and not resume:
        raise PosttrainError(f"{run_dir} holds checkpoints of an interrupted run (last: {previous.name}): pass "
                             f"--resume to continue it, or delete that folder to start over")
    if previous is not None:
        print(f"resuming {output} from {previous}", flush=True)
    from accelerate import PartialState

    # Under `accelerate launch` the main process provisions or merges the start; the others then find it.
    with PartialState().main_process_first():
        start = start_checkpoint(registry, recipe.model)
    tokenizer = load_tokenizer(start.path)
    return Prepared(registry=registry, start=start, output=output, run_dir=run_dir, data=data, tokenizer=tokenizer,
                    model=load_model(start.path, recipe), peft_config=peft_config(recipe),
                    resume_from=str(previous) if previous else None)


def trl_args(recipe: TrainRecipe, prepared: Prepared) -> dict[str, Any]:
    """The TrainingArguments every TRL config shares, from the recipe."""
    opt = recipe.training
    dtype = precision(opt)
    return dict(
        output_dir=str(prepared.run_dir), max_steps=opt.max_steps, num_train_epochs=opt.epochs,
        learning_rate=opt.learning_rate, per_device_train_batch_size=opt.batch_size,
        gradient_accumulation_steps=opt.gradient_accumulation_steps, lr_scheduler_type=opt.lr_scheduler,
        warmup_steps=opt.warmup, weight_decay=opt.weight_decay, max_grad_norm=opt.max_grad_norm,
        gradient_checkpointing=opt.gradient_checkpointing, bf16=dtype == "bf16", fp16=dtype == "fp16",
        use_cpu=not has_cuda(), save_strategy="steps", save_steps=opt.save_steps,
        save_total_limit=opt.save_total_limit, logging_steps=opt.logging_steps, seed=opt.seed,
        data_seed=opt.seed, report_to="none", run_name=prepared.output,
    )


def metrics_callback(run_dir: Path):
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        """metrics.jsonl in the run folder, and tokens/s between two logs (TRL counts `num_tokens`)."""

        def __init__(self) -> None:
            self.path = run_dir / "metrics.jsonl"
            self.last: tuple[float, float] | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None:
                return
            now = time.perf_counter()
            if "num_tokens" in logs:
                if self.last is not None and now > self.last[0]:
                    logs["tokens_per_second"] = round((logs["num_tokens"] - self.last[1]) / (now - self.last[0]), 1)
                self.last = (now, logs["num_tokens"])
            if state.is_world_process_zero:
                with self.path.open("a") as fh:
                    fh.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")

    return MetricsLog()


def attach_logging(trainer, run_dir: Path) -> None:
    """metrics.jsonl + TensorBoard under the run folder. The metrics callback goes first so the
    tokens/s it adds reaches TensorBoard and the console too."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    run_dir.mkdir(parents=True, exist_ok=True)
    trainer.callback_handler.callbacks.insert(0, metrics_callback(run_dir))
    if trainer.is_world_process_zero():
        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))


def save_model(trainer, folder: Path | None) -> None:
    """Write the trained weights into `folder`, the main process's (None on the other ranks).
    Under FSDP and ZeRO-3 each rank holds a shard and gathering them is collective, so every rank
    calls this; only the main process writes."""
    from accelerate.utils import broadcast_object_list

    [path] = broadcast_object_list([str(folder) if folder else None])
    if trainer.is_fsdp_enabled:
        # Checkpoints for --resume stay sharded (each rank its own part); the model is one servable
        # folder. Under SHARDED_STATE_DICT, Trainer.save_model would write no weights at all.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(path)


def finish(trainer, prepared: Prepared, recipe: TrainRecipe, stage: str) -> Checkpoint | None:
    """Train (or resume), then save the adapter or full model with the tokenizer and its chat
    template, publish the folder atomically and register it. Returns None on non-main ranks."""
    attach_logging(trainer, prepared.run_dir)
    (prepared.run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    trainer.train(resume_from_checkpoint=prepared.resume_from)
    if not trainer.is_world_process_zero():
        save_model(trainer, None)
        return None
    registry = prepared.registry
    with registry.staging(prepared.output) as tmp:
        save_model(trainer, tmp)
        prepared.tokenizer.save_pretrained(str(tmp))
    adapter = prepared.peft_config is not None
    row = registry.add(prepared.output, registry.model_dir(prepared.output), stage=stage, parent=prepared.start.name,
                       kind="adapter" if adapter else "full", recipe=recipe.to_dict(), datasets=prepared.data.sources)
    # The model is safe in the store: the resume points are no longer needed (metrics and
    # TensorBoard logs stay).
    for checkpoint in prepared.run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return row
