"""Evaluation throughput on the default model (SmolLM2-135M-Instruct): the same lm-eval task,
in the same run, (a) through posttrain's front door (vLLM; lm-eval's local-completions backend,
concurrent requests) and (b) with lm-eval's in-process `hf` backend (transformers, batched).
Prints seconds and samples/s of each, the ratio a/b, and checks both got the same accuracy.

    python bench/eval_throughput.py [--tasks posttrain_mc,posttrain_math] [--limit N] [--concurrency 8]

Log-likelihood tasks (posttrain_mc) score prompts only; generation tasks (posttrain_math) decode
up to 64 tokens a sample, which is where a serving engine's batching should show. Both paths
use fp32 (as the CPU engine serves). Each time is one whole `run_bench` call (tasks, tokenizer or
model loading, evaluation, storing the scores); the engine's start-up is not counted (a served
model is already up), the in-process model load is.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(label: str, **kwargs) -> tuple[float, dict]:
    from posttrain.evaluate.bench import run_bench

    start = time.perf_counter()
    result = run_bench(**kwargs)
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", flush=True)
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="posttrain_mc,posttrain_math")
    parser.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (served path)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size (in-process path)")
    args = parser.parse_args()

    import lm_eval  # noqa: F401 - imported before timing, like a warm process would have it

    from posttrain.models import pull_default
    from posttrain.registry import Registry
    from posttrain.serve.app import start_front_door

    registry = Registry()
    model = pull_default(registry).name
    tasks = args.tasks.split(",")
    common = {"model": model, "limit": args.limit, "registry": registry, "suite": "bench-throughput"}
    served, in_process = {}, {}
    with start_front_door([model], registry=registry, dtype="float32") as door:
        timed("warm-up (served)", **common | {"tasks": tasks, "limit": 2, "base_url": door.base_url})
        for task in tasks:
            served[task] = timed(f"{task} (a) front door", **common | {"tasks": [task], "base_url": door.base_url,
                                                                        "concurrency": args.concurrency})
    # (b) once the engine is gone, so transformers gets both cores as it would alone.
    for task in tasks:
        in_process[task] = timed(f"{task} (b) in-process hf", **common | {"tasks": [task], "backend": "hf",
                                                                           "batch_size": args.batch_size})
    rows = []
    for task in tasks:
        (a, result_a), (b, result_b) = served[task], in_process[task]
        accuracy = {name: {s.metric: round(s.value, 4) for s in r.scores} for name, r in (("a", result_a), ("b", result_b))}
        rows.append((task, result_a.scores[0].n, a, b, accuracy))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{model}, fp32, this machine (load average {load}: other work on the machine skews both paths); "
          f"(a) concurrency {args.concurrency}, (b) batch size {args.batch_size}")
    print(f"{'task':<16}{'samples':>8}{'(a) s':>9}{'(a) samples/s':>15}{'(b) s':>9}{'(b) samples/s':>15}{'a/b speed':>11}")
    for task, samples, a, b, accuracy in rows:
        print(f"{task:<16}{samples:>8}{a:>9.1f}{samples / a:>15.2f}{b:>9.1f}{samples / b:>15.2f}{b / a:>10.2f}x")
        print(f"{'':<16}scores (a) {accuracy['a']}  (b) {accuracy['b']}")


if __name__ == "__main__":
    main()
