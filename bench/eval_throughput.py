"""Evaluation throughput on the default model (SmolLM2-135M-Instruct): the same lm-eval tasks,
in one run, (a) through posttrain's front door (vLLM; lm-eval's local-completions backend with
`run_bench`'s defaults: several prompts per request, several requests in flight) and (b) with
lm-eval's in-process `hf` backend (transformers, batched). Per task it prints seconds, samples/s
and tokens/s of each path, the ratio a/b (goals: >= 1.5x on posttrain_mc, >= 2x on
posttrain_math), how many samples got the identical answer on both paths (posttrain_mc: the same
choice, and the largest log-likelihood difference; posttrain_math: the same generated text), and
tokens/s as a fraction of this CPU's roofline: every core at the best one-thread rate of a
1024^3 fp32 matmul, measured in the same run (before (a) and after (b); the mean counts), over
the model's forward FLOPs per token (bench/roofline.py).

    python bench/eval_throughput.py [--tasks posttrain_mc,posttrain_math] [--limit N]
        [--served default,1x8]   # (a) settings: prompts per request x requests in flight
        [--engine-arg block-size=32]

Log-likelihood tasks (posttrain_mc) score prompts only; generation tasks (posttrain_math) decode
up to 64 tokens a sample. Both paths use fp32 (the engine is asked for it), so that answers
can be compared. Each time is one whole `run_bench` call (tasks, tokenizer or model loading,
evaluation, storing the scores); the engine's start-up is not counted (a served model is
already up), the in-process model load is.
The in-process runs come after the engine has stopped, so transformers gets every core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from roofline import flops_text, forward_flops, matmul_flops  # noqa: E402


def timed(label: str, **kwargs):
    from posttrain.evaluate.bench import run_bench

    start = time.perf_counter()
    result = run_bench(**kwargs)
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds, result


def samples(result, task: str) -> list[dict]:
    rows = [json.loads(line) for line in (result.samples_path / f"{task}.jsonl").open()]
    return sorted(rows, key=lambda row: row["doc_id"])


def answer(row: dict):
    """A log-likelihood sample's choice (the most likely continuation), or the generated text."""
    responses = row["resps"]
    if isinstance(responses[0][0], list):  # [[log-likelihood, is_greedy]] per choice
        likelihoods = [choice[0][0] for choice in responses]
        return likelihoods.index(max(likelihoods))
    return responses[0][0]


def agreement(a: list[dict], b: list[dict]) -> str:
    same = sum(answer(x) == answer(y) for x, y in zip(a, b, strict=True))
    text = f"{same}/{len(a)} identical"
    if isinstance(a[0]["resps"][0][0], list):
        gap = max(abs(p[0][0] - q[0][0]) for x, y in zip(a, b) for p, q in zip(x["resps"], y["resps"]))
        text += f" (max |log-likelihood difference| {gap:.1e})"
    return text


def token_counts(rows: list[dict], tokenizer) -> tuple[int, float]:
    """(tokens the model processed, mean tokens per sequence): prompt and continuation of every
    scored choice, or prompt and generated text."""
    sequences = []
    for row in rows:
        for (context, second), response in zip(row["arguments"], row["resps"]):
            generated = response[0] if isinstance(second, dict) else second
            sequences.append(len(tokenizer(context).input_ids) + len(tokenizer(generated).input_ids))
    return sum(sequences), sum(sequences) / len(sequences)


def cpu_roofline() -> float:
    """Every core at the best one-thread matmul rate: torch's own threads measured together on a
    busy machine wait for each other and report far less than the cores can do."""
    import torch

    return os.cpu_count() * matmul_flops(1024, torch.float32, threads=1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="posttrain_mc,posttrain_math")
    parser.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
    parser.add_argument("--served", default="default",
                        help="(a) settings to time, BxC (prompts per request x requests in flight) or `default`")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size (in-process path)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra vLLM engine flag, e.g. block-size=32 (repeatable)")
    parser.add_argument("--ready-timeout", type=float, default=1800, help="seconds the engine may take to start")
    return parser.parse_args()


def served_settings(text: str) -> list[tuple[str, dict]]:
    import inspect

    from posttrain.evaluate.bench import API_BATCH, run_bench

    concurrency = inspect.signature(run_bench).parameters["concurrency"].default
    out = []
    for item in text.split(","):
        if item == "default":
            out.append((f"{API_BATCH}x{concurrency} (default)", {}))
        else:
            batch, concurrency = item.split("x")
            out.append((item, {"batch_size": int(batch), "concurrency": int(concurrency)}))
    return out


def main() -> None:
    args = parse_args()
    import lm_eval  # noqa: F401 - imported before timing, like a warm process would have it
    from transformers import AutoTokenizer

    from posttrain.models import pull_default
    from posttrain.registry import Registry
    from posttrain.serve.app import start_front_door
    from posttrain.serve.engine import engine_args

    registry = Registry()
    checkpoint = pull_default(registry)
    tasks, variants = args.tasks.split(","), served_settings(args.served)
    common = {"model": checkpoint.name, "limit": args.limit, "registry": registry, "suite": "bench-throughput"}
    peaks = [cpu_roofline()]
    served: dict[tuple[str, str], tuple] = {}
    extra = engine_args(dict(item.split("=", 1) for item in args.engine_arg))
    with start_front_door([checkpoint.name], registry=registry, dtype="float32", ready_timeout=args.ready_timeout,
                          engine_args=extra) as door:
        timed("warm-up (served)", **common | {"tasks": tasks, "limit": 2, "base_url": door.base_url})
        for task in tasks:
            for label, settings in variants:
                served[task, label] = timed(f"{task} (a) front door {label}",
                                            **common | settings | {"tasks": [task], "base_url": door.base_url})
    # (b) once the engine is gone, so transformers gets every core as it would alone.
    in_process = {task: timed(f"{task} (b) in-process hf", **common | {"tasks": [task], "backend": "hf",
                                                                        "batch_size": args.batch_size})
                  for task in tasks}
    peaks.append(cpu_roofline())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    config = json.loads((Path(checkpoint.path) / "config.json").read_text())
    report(tasks, variants, served, in_process, peaks, tokenizer, config, args, extra)


def report(tasks, variants, served, in_process, peaks, tokenizer, config, args, extra: list[str]) -> None:
    peak = sum(peaks) / len(peaks)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    measured = " -> ".join(flops_text(p) for p in peaks)
    print(f"\n{os.cpu_count()}-core CPU, load average {load} (other work on the machine skews both paths); roofline "
          f"{flops_text(peak)} (cores x best 1-thread 1024^3 fp32 matmul: {measured}); (a) engine flags "
          f"{' '.join(extra) or '(defaults)'}; (b) batch size {args.batch_size}")
    print(f"{'task':<16}{'path':<30}{'samples':>8}{'s':>8}{'samples/s':>11}{'tokens/s':>10}{'roofline':>10}"
          f"{'vs (b)':>8}  answers vs (b)")
    for task in tasks:
        b_seconds, b_result = in_process[task]
        b_rows = samples(b_result, task)
        rows = [(f"(a) front door {label}", *served[task, label]) for label, _ in variants]
        rows.append(("(b) in-process hf", b_seconds, b_result))
        for path, seconds, result in rows:
            these = samples(result, task)
            tokens, mean_len = token_counts(these, tokenizer)
            rate = tokens / seconds
            same = agreement(these, b_rows) if result is not b_result else ""
            print(f"{task:<16}{path:<30}{len(these):>8}{seconds:>8.1f}{len(these) / seconds:>11.2f}{rate:>10.0f}"
                  f"{rate * forward_flops(config, mean_len) / peak:>10.1%}{b_seconds / seconds:>7.2f}x  {same}")
        scores = {s.metric: round(s.value, 4) for s in b_result.scores}
        print(f"{'':<16}scores (b) {scores}")


if __name__ == "__main__":
    main()
