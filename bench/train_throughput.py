"""Training throughput on the default model (SmolLM2-135M-Instruct): LoRA SFT on the built-in
chat sample through (a) `posttrain train sft` (its Python function: recipe, data checks,
metrics/TensorBoard callbacks, checkpointing, registration) and (b) a plain TRL script with the
same settings (fp32, no gradient checkpointing: TRL's config defaults differ), then (c) posttrain
with packing and (d) posttrain in bf16 mixed precision. Prints training tokens/s (TRL's token
count over the trainer's own runtime, model loading excluded) and the ratios a/b (posttrain's
overhead; goal >= 0.95), c/a (what packing buys) and d/a (what bf16 autocast buys on this CPU).

Each run is a fresh process (same imports, same threads); (a) and (b) alternate over rounds and
the best of each counts, because the machine is shared and noisy.

    python bench/train_throughput.py [--steps 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = dict(batch_size=4, learning_rate=2e-4, max_length=1024, lora_r=16, lora_alpha=32, lora_dropout=0.05)


def posttrain_run(home: str, steps: int, tag: str, *overrides: str) -> tuple[float, float]:
    os.environ["POSTTRAIN_HOME"] = home
    from posttrain.registry import Registry
    from posttrain.train.sft import SFTRecipe, train_sft

    s = SETTINGS
    recipe = SFTRecipe.load(None, [
        f"output=bench-{tag}", f"training.max_steps={steps}", f"training.batch_size={s['batch_size']}",
        f"training.learning_rate={s['learning_rate']}", f"max_length={s['max_length']}", f"lora.r={s['lora_r']}",
        f"lora.alpha={s['lora_alpha']}", f"lora.dropout={s['lora_dropout']}", *overrides])
    registry = Registry()
    row = train_sft(recipe, registry)
    logged = [json.loads(line) for line in (registry.settings.runs_dir / row.name / "metrics.jsonl").open()]
    tokens = max(entry["num_tokens"] for entry in logged if "num_tokens" in entry)
    return tokens, logged[-1]["train_runtime"]


def trl_run(model_path: str, data_path: str, steps: int) -> tuple[float, float]:
    """The plain TRL script: what a user would write by hand with the same settings."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    s = SETTINGS
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    dataset = load_dataset("json", data_files=data_path, split="train")
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=s["batch_size"],
                         learning_rate=s["learning_rate"], lr_scheduler_type="cosine", warmup_steps=0.03,
                         max_length=s["max_length"], assistant_only_loss=True, logging_steps=1, save_steps=50,
                         report_to="none", use_cpu=True, seed=42, data_seed=42,
                         # TRL's defaults turn both on; posttrain's recipes leave them off on a CPU.
                         gradient_checkpointing=False, bf16=False)
        peft = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft)
        runtime = trainer.train().metrics["train_runtime"]
        tokens = max(entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry)
    return tokens, runtime


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
