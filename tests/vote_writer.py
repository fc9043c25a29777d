"""One arena's worth of vote writing, as a process of its own: `record_vote` (what the arena's
vote handler runs) from several threads at once, like the arena's concurrent sessions.

    python vote_writer.py URL TAG VOTES THREADS

Opens the store, prints "ready", waits for a line on stdin (so that two writers start
together), writes VOTES votes from each thread (session "TAG-<thread>") and prints one JSON
line: the battle ids it was given and the seconds it took.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from posttrain.store import Store
from posttrain.ui.votes import record_vote


def write(store: Store, session: str, votes: int) -> list[int]:
    turn = [{"role": "user", "content": f"{session} asks"}]
    return [record_vote(store, session_hash=session, model_a="p", model_b="q", vote="a",
                        conversation_a=[*turn, {"role": "assistant", "content": f"p answers {n}"}],
                        conversation_b=[*turn, {"role": "assistant", "content": f"q answers {n}"}]).id
            for n in range(votes)]


def main(url: str, tag: str, votes: int, threads: int) -> None:
    store = Store(url)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        ids = [i for done in pool.map(write, [store] * threads, [f"{tag}-{t}" for t in range(threads)],
                                      [votes] * threads) for i in done]
    print(json.dumps({"ids": ids, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
