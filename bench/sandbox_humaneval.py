"""The code sandbox's cost and correctness: HumanEval's 164 canonical solutions must all pass and
their wrong variants (body `return None`; a misnamed entry point) must all fail, every one run
in its own bubblewrap sandbox. Prints the counts, the overhead of one sandboxed run (bubblewrap
alone, the interpreter alone, a whole one-assert job) and GRPO-shaped throughput: 64 completions
x 5 assert lines, one sandbox per core at a time.

    python bench/sandbox_humaneval.py [--data ../shared/data/humaneval/HumanEval.jsonl.gz] [--repeat 30]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from posttrain import sandbox
from posttrain.errors import PosttrainError
from posttrain.sandbox import Job

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"


def per_run_ms(action, repeat: int) -> tuple[float, float]:
    """Median and fastest wall-clock milliseconds of one run; on a shared machine the fastest
    is the one least disturbed by other load."""
    action()  # warm the page cache
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), min(times)


def overhead(repeat: int) -> None:
    python = [sandbox._interpreter(), "-I", "-S", "-B", "-c", "pass"]
    job = Job("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3")
    costs = {"bubblewrap start (bwrap ... true)": lambda: subprocess.run([*sandbox._bwrap(), "/usr/bin/true"]),
             "interpreter start (python -I -S -c pass)": lambda: subprocess.run(python),
             "both (bwrap ... python -c pass)": lambda: subprocess.run([*sandbox._bwrap(), *python]),
             "one sandboxed job, 1 assert": lambda: sandbox.run(job),
             "one unsandboxed job, 1 assert (unsafe_exec)": lambda: sandbox.run(job, unsafe=True)}
    for label, action in costs.items():
        median, fastest = per_run_ms(action, repeat)
        print(f"  {label:<46} median {median:6.1f} ms, fastest {fastest:6.1f} ms")


def grpo_batch() -> None:
    code = "def add(a, b):\n    return a + b\n"
    tests = "\n".join(f"assert add({i}, {i}) == {2 * i}" for i in range(5))
    started = time.perf_counter()
    verdicts = sandbox.run_many([Job(code, tests)] * 64)
    elapsed = time.perf_counter() - started
    assert all(v.score == 1.0 for v in verdicts), verdicts
    print(f"  64 completions x 5 asserts, {os.cpu_count()} at a time: {elapsed:.2f} s")


def humaneval(path: Path) -> None:
    problems = [json.loads(line) for line in gzip.open(path, "rt")]
    variants = {
        "canonical": [Job(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems],
        "body `return None`": [Job(p["prompt"] + "    return None\n", p["test"], p["entry_point"]) for p in problems],
        "misnamed entry point": [Job(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"] + "_x")
                                 for p in problems]}
    for label, jobs in variants.items():
        started = time.perf_counter()
        verdicts = sandbox.run_many(jobs, timeout_s=10.0)
        elapsed = time.perf_counter() - started
        passed = sum(v.score == 1.0 for v in verdicts)
        each = elapsed / len(jobs) * 1000
        print(f"  {label:<22} {passed:3d}/{len(jobs)} pass  {elapsed:5.1f} s ({each:.0f} ms each)")
        for problem, verdict in zip(problems, verdicts):
            if (verdict.score == 1.0) != (label == "canonical"):
                print(f"    {problem['task_id']}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    try:
        sandbox.require()
    except PosttrainError as exc:
        print(f"skipped: {exc}")
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"sandbox overhead ({'root: privileged bwrap' if os.geteuid() == 0 else 'user namespace'}, "
          f"python {sys.version.split()[0]}):")
    overhead(args.repeat)
    grpo_batch()
    if args.data.exists():
        print(f"HumanEval ({args.data}):")
        humaneval(args.data)
    else:
        print(f"HumanEval skipped: no {args.data}")


if __name__ == "__main__":
    main()
