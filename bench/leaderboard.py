"""`posttrain arena leaderboard` end to end over a large store: 1,000,000 arena battles over 50
models (plus 1% side-by-side and judge battles that the default `--source arena` leaves out)
written into a fresh SQLite store, then the CLI timed as a subprocess, start-up included.

The old path (load every battle into a DataFrame with load_battles, then ratings.leaderboard)
runs in the same bench as a subprocess with the same imports, once; it prints how its time
splits between reading rows and the rating math. Both print --json, which must be identical.

    python bench/leaderboard.py [--battles 1000000] [--models 50] [--repeat 3] [--db PATH]
    python bench/leaderboard.py --db-url postgresql://USER@HOST:PORT/DB   # an empty database to fill
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path

import numpy as np
from sqlalchemy import func, insert, select

from posttrain.store import Battle, Store
from ratings import synthetic  # bench/ratings.py: votes drawn from known strengths

CONVERSATION = [{"role": "user", "content": "Name a prime number."},
                {"role": "assistant", "content": "7 is a prime number."}]
OTHER_SOURCES = ("side-by-side", "judge:gpt-judge")

OLD_PATH = """
import sys, time
start = time.perf_counter()
import posttrain.cli  # the CLI's start-up imports, as `python -m posttrain` pays them
from posttrain.registry import Registry
from posttrain.ui.ratings import leaderboard
from posttrain.ui.votes import load_battles
read = time.perf_counter()
battles = load_battles(Registry().store, source="arena")
math = time.perf_counter()
table = leaderboard(battles)
done = time.perf_counter()
print(table.to_json(orient="records", indent=2))
print(f"{read - start:.2f} {math - read:.2f} {done - math:.2f}", file=sys.stderr)
"""


def generate(store: Store, battles: int, models: int, seed: int = 0) -> None:
    """Bulk insert through the schema's own INSERT and column types, in one transaction:
    the ORM (or one commit per vote, as record_vote does) would take minutes. SQLite: one
    executemany on the raw connection; other databases: SQLAlchemy Core in chunks."""
    extra = battles // 100
    frame, _ = synthetic(battles + extra, models, seed)
    rng = np.random.default_rng(seed + 1)
    source = np.full(len(frame), "arena", dtype=object)
    source[rng.choice(len(frame), extra, replace=False)] = rng.choice(OTHER_SOURCES, extra)
    # A vote every 0.1 s with up to 2 s of jitter: ids and vote times disagree on the order,
    # as they do when clocks and commits interleave, so the read must sort by voted_at.
    start = np.datetime64("2026-01-01T00:00:00", "us")
    offsets = np.arange(len(frame)) * 100_000 + rng.integers(0, 2_000_000, len(frame))
    stamps = (start + offsets.astype("timedelta64[us]")).astype(datetime)
    table = Battle.__table__
    columns = ["session_hash", "model_a", "model_b", "conversation_a", "conversation_b", "vote", "source",
               "created_at", "voted_at"]
    sessions = np.char.mod("s%06d", np.arange(len(frame)) % 100_000).tolist()
    if store.engine.dialect.name != "sqlite":  # the driver's own fast path (PostgreSQL: insertmanyvalues)
        rows = ({"session_hash": h, "model_a": a, "model_b": b, "conversation_a": CONVERSATION,
                 "conversation_b": CONVERSATION, "vote": v, "source": src, "created_at": t, "voted_at": t}
                for h, a, b, v, src, t in zip(sessions, frame["model_a"].tolist(), frame["model_b"].tolist(),
                                              frame["vote"].tolist(), source.tolist(), stamps))
        with store.engine.begin() as connection:
            while chunk := list(islice(rows, 20_000)):
                connection.execute(insert(table), chunk)
        return
    dialect = store.engine.dialect
    as_text = table.c.voted_at.type.dialect_impl(dialect).bind_processor(dialect)
    conversation = table.c.conversation_a.type.dialect_impl(dialect).bind_processor(dialect)(CONVERSATION)
    voted = [as_text(t) for t in stamps]
    rows = zip(sessions, frame["model_a"].tolist(), frame["model_b"].tolist(), [conversation] * len(frame),
               [conversation] * len(frame), frame["vote"].tolist(), source.tolist(), voted, voted)
    compiled = insert(table).values({c: None for c in columns}).compile(dialect=dialect)
    names = list(compiled.positiontup)
    order = [columns.index(n) for n in names]
    raw = store.engine.raw_connection()
    try:
        raw.cursor().executemany(str(compiled), ([row[i] for i in order] for row in rows))
        raw.commit()
    finally:
        raw.close()


@dataclass
class Timed:
    wall: float
    cpu: float  # user + system: what the wall time would be on an otherwise idle machine
    out: subprocess.CompletedProcess

    def __str__(self) -> str:
        return f"{self.wall:.2f} s (CPU {self.cpu:.2f} s)"


def run(argv: list[str], env: dict[str, str]) -> Timed:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Timed(wall, cpu, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--battles", type=int, default=1_000_000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3, help="Timed runs of the command (best counts).")
    parser.add_argument("--db", type=Path, help="SQLite file to reuse (generated if missing).")
    parser.add_argument("--db-url", help="Any store URL instead, e.g. PostgreSQL's (filled if it holds no battles).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as home:
        bench(args, Path(home), args.db_url or f"sqlite:///{args.db or Path(home) / 'store.db'}")


def bench(args: argparse.Namespace, home: Path, url: str) -> None:
    store = Store(url)
    with store.session() as s:
        stored = s.scalar(select(func.count()).select_from(Battle))
    if not stored:
        start = time.perf_counter()
        generate(store, args.battles, args.models)
        print(f"generated {store.engine.url.render_as_string()} in {time.perf_counter() - start:.1f} s")
    with store.session() as s:
        arena = s.scalar(select(func.count()).where(Battle.source == "arena"))
        stored = s.scalar(select(func.count()).select_from(Battle))
    print(f"{stored:,} stored battles, {arena:,} of them arena votes over {args.models} models")
    store.engine.dispose()

    env = {**os.environ, "POSTTRAIN_HOME": str(home), "POSTTRAIN_DB_URL": url}
    command = [sys.executable, "-m", "posttrain", "arena", "leaderboard"]
    # The machine is shared: the best of a few runs, with CPU time beside the wall time.
    new = min((run(command, env) for _ in range(args.repeat)), key=lambda t: t.wall)
    new_json = run(command + ["--json"], env)
    old = run([sys.executable, "-c", OLD_PATH], env)
    start_s, read_s, math_s = map(float, old.out.stderr.split())
    print(f"posttrain arena leaderboard: {new} (best of {args.repeat}); with --json: {new_json}")
    print(f"old path (load_battles + leaderboard, --json): {old}: start-up {start_s:.2f} s, "
          f"reading rows {read_s:.2f} s, rating math {math_s:.2f} s")
    print(f"end to end, old / new (--json): {old.wall / new_json.wall:.1f}x wall, {old.cpu / new_json.cpu:.1f}x CPU")
    if json.loads(new_json.out.stdout) != json.loads(old.out.stdout):
        raise SystemExit("the two paths disagree")
    print("both paths print the same leaderboard")
    if new.wall >= 5:
        print(f"over the 5 s goal ({new.wall:.2f} s; a busy machine shows in the CPU time)")


if __name__ == "__main__":
    main()
