"""MT-Bench judging on the default model (SmolLM2-135M-Instruct) as both answerer and judge,
served by posttrain's front door (vLLM), in one run:

  (1) answers to the questions (two turns each), then free-text verdicts parsed FastChat's way,
      `--parallel` requests in flight;
  (2) the same verdicts constrained to the prompts' format (vLLM structured outputs), `--parallel`
      requests in flight: the answers come from (1)'s cache, so only judgments are timed;
  (3) as (2), one request at a time: FastChat's gen_judgment.py default (`--parallel 1`).

Prints each phase's wall time, requests, requests/s and unparsable verdicts, and the speed-up
(2) vs (3). The questions are FastChat's 80 (../shared/data/mt_bench/question.jsonl, or
--question-file); `--limit N` takes the first N for a quick check.

    python bench/judge_throughput.py [--limit 10] [--parallel 8] [--max-tokens 256] [--judge-max-tokens 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mt_bench" / "question.jsonl"


def phase(label: str, cache: Path, answers_from: Path | None, **kwargs) -> dict:
    """One `run_mt_bench` call, timed; with `answers_from`, that cache's answers are reused."""
    from posttrain.evaluate.mt_bench import run_mt_bench

    cache.mkdir(parents=True)
    if answers_from is not None:
        for path in answers_from.glob("*.jsonl"):
            if not path.name.startswith("judge-"):
                shutil.copy(path, cache / path.name)
    start = time.perf_counter()
    result = run_mt_bench(cache_dir=cache, **kwargs)
    seconds = time.perf_counter() - start
    row = {"label": label, "seconds": seconds, "requests": result.requests_sent, "judgments": result.judgments,
           "unparsable": result.unparsable, "errors": result.errors, "format": result.run.config["verdict_format"]}
    print(f"{label}: {seconds:.1f} s, {row['requests']} requests, {row['unparsable']} unparsable of "
          f"{row['judgments']} ({row['format']})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question-file", type=Path, default=QUESTIONS)
    parser.add_argument("--limit", type=int, default=None, help="first N questions (default: all 80)")
    parser.add_argument("--parallel", type=int, default=8, help="requests in flight in (1) and (2)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer (FastChat: 1024)")
    parser.add_argument("--judge-max-tokens", type=int, default=512, help="longest judgment (FastChat: 2048)")
    args = parser.parse_args()

    from posttrain.models import pull_default
    from posttrain.registry import Registry
    from posttrain.serve.app import start_front_door

    registry = Registry()
    model = pull_default(registry).name
    work = Path(tempfile.mkdtemp(prefix="judge-bench-"))
    common = {"model": model, "judge_model": model, "question_file": args.question_file, "limit": args.limit,
              "max_tokens": args.max_tokens, "judge_max_tokens": args.judge_max_tokens, "registry": registry,
              "suite": "judge-throughput"}
    try:
        with start_front_door([model], registry=registry) as door:
            common["base_url"] = door.base_url
            rows = [
                phase(f"(1) answers + free-text verdicts, {args.parallel} in flight", work / "free", None,
                      parallel=args.parallel, constrain=False, **common),
                phase(f"(2) constrained verdicts, {args.parallel} in flight", work / "parallel", work / "free",
                      parallel=args.parallel, **common),
                phase("(3) constrained verdicts, one at a time (FastChat's default)", work / "serial", work / "free",
                      parallel=1, **common),
            ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{model} answering and judging {rows[0]['judgments'] // 2} questions x 2 turns "
          f"(answers <= {args.max_tokens} tokens, judgments <= {args.judge_max_tokens})")
    print(f"{'phase':<62} {'wall s':>8} {'requests':>9} {'req/s':>7} {'unparsable':>11}")
    for row in rows:
        print(f"{row['label']:<62} {row['seconds']:>8.1f} {row['requests']:>9} "
              f"{row['requests'] / row['seconds']:>7.2f} {row['unparsable']:>5} / {row['judgments']}")
    speedup = (rows[1]["requests"] / rows[1]["seconds"]) / (rows[2]["requests"] / rows[2]["seconds"])
    print(f"requests/s, {args.parallel} in flight vs one at a time: {speedup:.2f}x")


if __name__ == "__main__":
    main()
