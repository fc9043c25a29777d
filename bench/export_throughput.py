"""Exporting harvested traffic: request-log rows generated straight into SQLite (chat requests,
a fifth of them with n=2, a quarter of the prompts asked four times; 10% of answers rated, 2%
corrected; 5% of answers the same "I do not know."), then `posttrain data export` to SFT and to
DPO at two sizes. Prints rows/s and peak
memory, and the 100k/10k ratios: time should grow ~10x, memory should not (rows are streamed a
batch at a time and duplicates tracked on disk). For contrast, the peak of loading the same rows
whole as ORM objects.

Every measurement runs in a fresh process: peak RSS is a high-water mark, and the timed run is
separate from the tracemalloc run (tracing slows Python down).

    python bench/export_throughput.py [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta
from pathlib import Path

WORDS = "the model answers a question about cooking travel code math history with some detail".split()


def generate(db: Path, rows: int, seed: int = 0) -> None:
    from sqlalchemy import insert

    from posttrain.serve.exchange import prompt_hash
    from posttrain.store import Feedback, RequestLog, Store

    rng = random.Random(seed)
    store = Store(f"sqlite:///{db}")
    start = datetime(2026, 11, 1)
    logs, feedback, i = [], [], 0
    while i < rows:
        topic = rng.randrange(rows // 4)
        messages = [{"role": "user", "content": f"Question {topic}: tell me about "
                     + " ".join(random.Random(topic).choices(WORDS, k=12))}]
        response_id = f"chatcmpl-{i:012x}"
        for choice in range(min(rows - i, 2 if rng.random() < 0.2 else 1)):
            i += 1
            answer = "I do not know." if rng.random() < 0.05 else " ".join(rng.choices(WORDS, k=40))
            logs.append({"id": i, "model": "bench-model", "endpoint": "chat", "request": {"model": "bench-model",
                         "messages": messages, "max_tokens": 128}, "completion": answer,
                         "latency_ms": 100.0, "prompt_tokens": 20, "completion_tokens": 40,
                         "created_at": start + timedelta(seconds=i), "response_id": response_id, "choice": choice,
                         "prompt_hash": prompt_hash(messages)})
            if rng.random() < 0.1:
                feedback.append({"request_log_id": i, "rating": rng.choice((1, -1)), "key_hash": "0" * 64,
                                 "correction": "A better answer: " + " ".join(rng.choices(WORDS, k=20))
                                 if rng.random() < 0.2 else None, "created_at": start + timedelta(seconds=i + 1)})
        if len(logs) >= 5000 or i >= rows:
            with store.engine.begin() as conn:
                conn.execute(insert(RequestLog), logs)
                if feedback:
                    conn.execute(insert(Feedback), feedback)
            logs, feedback = [], []


def measure(db: Path, kind: str, traced: bool) -> dict:
    """One export (or, kind "load-whole", all rows as ORM objects) in this process."""
    from posttrain.harvest.export import export_dpo, export_sft
    from posttrain.store import RequestLog, Store

    store = Store(f"sqlite:///{db}")
    out = db.with_suffix(f".{kind}.jsonl")
    run = {"sft": lambda: export_sft(store, out), "dpo": lambda: export_dpo(store, out, sources=["choice",
           "correction", "thumbs"]), "load-whole": lambda: len(store.all(RequestLog, order_by=RequestLog.id))}[kind]
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    # The whole process's high-water mark, imports included (~the same in every run).
    facts = {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "kept": getattr(result, "kept", result)}
    if traced:
        facts["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    return facts


def child(db: Path, kind: str, traced: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(db), kind, "traced" if traced else "timed"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        db, kind, mode = args.child
        print(json.dumps(measure(Path(db), kind, mode == "traced")))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            db = Path(tmp) / f"logs-{size}.db"
            started = time.perf_counter()
            generate(db, size)
            print(f"generated {size} request-log rows in {time.perf_counter() - started:.1f} s", flush=True)
            for kind in ("sft", "dpo", "load-whole"):
                timed, traced = child(db, kind, False), child(db, kind, True)
                results[kind, size] = timed | {"traced_peak_mb": traced["traced_peak_mb"]}
                print(f"  {kind}: {timed}", flush=True)
    report(results, sizes)


def report(results: dict, sizes: list[int]) -> None:
    print("\n| export | rows | kept | rows/s | peak traced MB | peak RSS MB |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for (kind, size), r in results.items():
        print(f"| {kind} | {size} | {r['kept']} | {size / r['seconds']:,.0f} | {r['traced_peak_mb']:.1f} | "
              f"{r['peak_rss_mb']:.0f} |")
    small, large = sizes[0], sizes[-1]
    print(f"\n{large // small}x the rows:")
    for kind in ("sft", "dpo", "load-whole"):
        a, b = results[kind, small], results[kind, large]
        print(f"  {kind}: time x{b['seconds'] / a['seconds']:.1f}, peak traced memory "
              f"x{b['traced_peak_mb'] / a['traced_peak_mb']:.2f}, peak RSS x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
