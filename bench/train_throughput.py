"""Training throughput on the default model (SmolLM2-135M-Instruct): LoRA SFT on the built-in
chat sample through (a) `posttrain train sft` (its Python function: recipe, data checks,
metrics/TensorBoard callbacks, checkpointing, registration) and (b) a plain TRL script with the
same settings (fp32, no gradient checkpointing: TRL's config defaults differ), then (c) posttrain
with packing and (d) posttrain in bf16 mixed precision. Prints training tokens/s (TRL's token
count from the start of training to its last log, model loading excluded) and the ratios a/b
(posttrain's overhead; goal >= 0.95), c/a (what packing buys) and d/a (what bf16 autocast buys
on this CPU). bench/gpu.py runs the same two runners for every method on a GPU.

Each run is a fresh process (same imports, same threads); (a) and (b) alternate over rounds and
the best of each counts, because the machine is shared and noisy.

    python bench/train_throughput.py [--steps 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = dict(batch_size=4, learning_rate=2e-4, max_length=1024, lora_r=16, lora_alpha=32, lora_dropout=0.05)


def throughput_meter(skip_steps: int = 0):
    """A callback that times TRL's own token count (`num_tokens`, logged every step) from the
    end of step `skip_steps` (0: from the start of training) to the last log, so a GPU run can
    leave its first, warming-up steps out."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), 0.0)]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.marks.append((time.perf_counter(), float(logs["num_tokens"])))

        def rate(self) -> tuple[float, float]:
            """(tokens, seconds) after the skipped steps."""
            (t0, n0), (t1, n1) = self.marks[min(skip_steps, len(self.marks) - 2)], self.marks[-1]
            return n1 - n0, t1 - t0

    return Meter()


def posttrain_overrides(method: str, settings: dict) -> list[str]:
    """`settings` as recipe overrides (`--set`), method-specific keys included."""
    s = settings
    out = [f"training.batch_size={s['batch_size']}", f"training.learning_rate={s['learning_rate']}",
           f"max_length={s['max_length']}", f"lora.r={s['lora_r']}", f"lora.alpha={s['lora_alpha']}",
           f"lora.dropout={s['lora_dropout']}", f"method={s.get('method', 'lora')}"]
    if method == "grpo":
        out += [f"num_generations={s['num_generations']}", f"max_completion_length={s['max_completion_length']}",
                "use_vllm=false"]
    return out


def posttrain_run(home: str, steps: int, tag: str, *overrides: str, method: str = "sft",
                  settings: dict = SETTINGS, skip_steps: int = 0) -> tuple[float, float]:
    """`posttrain train METHOD` (its Python function); (tokens, seconds) as `throughput_meter` sees them."""
    os.environ["POSTTRAIN_HOME"] = home
    from posttrain.registry import Registry
    from posttrain.train import dpo, grpo, sft

    recipe_class, train = {"sft": (sft.SFTRecipe, sft.train_sft), "dpo": (dpo.DPORecipe, dpo.train_dpo),
                           "grpo": (grpo.GRPORecipe, grpo.train_grpo)}[method]
    recipe = recipe_class.load(None, [f"output=bench-{tag}", f"training.max_steps={steps}",
                                      *posttrain_overrides(method, settings), *overrides])
    meter = throughput_meter(skip_steps)
    train(recipe, Registry(), callbacks=[meter])
    return meter.rate()


def trl_model(model_path: str, settings: dict):
    """The model as a plain script loads it: bf16 weights on a GPU, fp32 on a CPU (as posttrain
    does), 4-bit NF4 for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if settings.get("method") != "qlora":
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    from peft import prepare_model_for_kbit_training

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, quantization_config=quantization,
                                                 device_map={"": 0})
    return prepare_model_for_kbit_training(model, False)


def trl_trainer(method: str, model, tokenizer, dataset, common: dict, settings: dict, callbacks: list):
    """TRL's trainer for `method` with posttrain's recipe defaults spelled out (a plain script
    would write them; TRL's own defaults differ)."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    s = settings
    peft = None if s.get("method") == "full" else LoraConfig(
        r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"], target_modules="all-linear",
        task_type="CAUSAL_LM")
    shared = dict(model=model, train_dataset=dataset, processing_class=tokenizer, peft_config=peft, callbacks=callbacks)
    if method == "sft":
        args = SFTConfig(**common, max_length=s["max_length"], assistant_only_loss=True)
        return SFTTrainer(args=args, **shared)
    if method == "dpo":
        args = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], max_length=s["max_length"])
        return DPOTrainer(ref_model=None, args=args, **shared)
    from posttrain.train.rewards import make  # the same reward code, so both sides score alike

    args = GRPOConfig(**common, num_generations=s["num_generations"], max_completion_length=s["max_completion_length"],
                      temperature=1.0, beta=0.04, reward_weights=[1.0, 0.5], use_vllm=False)
    return GRPOTrainer(reward_funcs=[make("math_answer"), make("think_format")], args=args, **shared)


def trl_run(model_path: str, data_path: str, steps: int, method: str = "sft", settings: dict = SETTINGS,
            skip_steps: int = 0) -> tuple[float, float]:
    """The plain TRL script: what a user would write by hand with the same settings."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer

    s = settings
    gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset = load_dataset("json", data_files=data_path, split="train")
    meter = throughput_meter(skip_steps)
    with tempfile.TemporaryDirectory() as out:
        common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=s["batch_size"],
                      learning_rate=s["learning_rate"], lr_scheduler_type="cosine", warmup_steps=0.03,
                      logging_steps=1, save_steps=50, report_to="none", use_cpu=not gpu, seed=42, data_seed=42,
                      # TRL's defaults turn checkpointing on (and bf16 on CPUs too); posttrain's
                      # recipes leave checkpointing off and use bf16 on GPUs only.
                      gradient_checkpointing=False, bf16=gpu)
        trainer = trl_trainer(method, trl_model(model_path, s), tokenizer, dataset, common, s, [meter])
        trainer.train()
    return meter.rate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="alternating (b, a) rounds; best of each")
    args = parser.parse_args()

    from posttrain.models import pull_default
    from posttrain.registry import Registry
    from posttrain.train.data import builtin_dir

    home = tempfile.mkdtemp(prefix="posttrain-bench-")
    os.environ["POSTTRAIN_HOME"] = home
    model = pull_default(Registry())
    best: dict[str, float] = {}
    spawn = multiprocessing.get_context("spawn")

    def measure(key: str, fn, *fn_args) -> None:
        with ProcessPoolExecutor(1, mp_context=spawn) as child:
            tokens, seconds = child.submit(fn, *fn_args).result()
        best[key] = max(best.get(key, 0.0), tokens / seconds)
        print(f"({key}) {tokens:.0f} tokens in {seconds:.1f} s: {tokens / seconds:.1f} tokens/s", flush=True)

    for r in range(args.rounds):
        measure("b", trl_run, model.path, str(builtin_dir() / "chat.jsonl"), args.steps)
        measure("a", posttrain_run, home, args.steps, f"a{r}")
    measure("c", posttrain_run, home, args.steps, "c", "packing=true")
    measure("d", posttrain_run, home, args.steps, "d", "training.precision=bf16")
    print(f"\n{model.name}: LoRA r={SETTINGS['lora_r']} all-linear SFT, {args.steps} steps x batch "
          f"{SETTINGS['batch_size']}, fp32, built-in chat sample")
    print(f"(a) posttrain train sft       {best['a']:8.1f} tokens/s")
    print(f"(b) plain TRL script          {best['b']:8.1f} tokens/s")
    print(f"(c) posttrain, packing on     {best['c']:8.1f} tokens/s")
    print(f"(d) posttrain, bf16 autocast  {best['d']:8.1f} tokens/s")
    print(f"a/b = {best['a'] / best['b']:.3f}   (goal >= 0.95)")
    print(f"c/a = {best['c'] / best['a']:.2f}x  (packing)")
    print(f"d/a = {best['d'] / best['a']:.2f}x  (bf16 mixed precision)")


if __name__ == "__main__":
    main()
