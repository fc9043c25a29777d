"""Replicas and fail-over overhead on the default model (SmolLM2-135M-Instruct): the same chat
load through (a) the front door over 2 replicas, (b) the front door over 1 replica and (c) one
vLLM engine directly, in one run. Prints output tokens/s of each and the ratios a/c and b/c.

On a 2-core machine the point is the front door's cost and the replicas' routing, not a
speed-up: two CPU engines share the same cores. On a multi-GPU host each replica has its own GPU
and a/b approaches the replica count.

    python bench/serve_replicas.py [--requests 32] [--max-tokens 64] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_throughput import load, prompts  # noqa: E402  (the same load generator and prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    from posttrain.models import pull_default
    from posttrain.registry import Registry
    from posttrain.serve.app import start_front_door

    registry = Registry()
    model = pull_default(registry).name
    work = (prompts(args.requests), args.max_tokens, args.concurrency)
    rates: dict[str, float] = {}
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as client:
        for key, replicas in (("b", 1), ("a", 2)):
            with start_front_door([model], registry=registry, replicas=replicas) as door:
                client.submit(load, door.base_url, model, work[0][:8], 8, 8).result()  # warm-up
                tokens, seconds = client.submit(load, door.base_url, model, *work).result()
                rates[key] = tokens / seconds
                if replicas == 1:
                    engine = door.engine(model)
                    tokens, seconds = client.submit(load, engine.url + "/v1", model, *work, engine.secret).result()
                    rates["c"] = tokens / seconds
            print(f"{replicas} replica(s): front door {rates[key]:.1f} tokens/s", flush=True)
    print(f"\n{model}: {args.requests} requests x {args.max_tokens} output tokens, {args.concurrency} concurrent")
    print(f"(a) front door, 2 replicas  {rates['a']:8.1f} tokens/s")
    print(f"(b) front door, 1 replica   {rates['b']:8.1f} tokens/s")
    print(f"(c) vLLM directly           {rates['c']:8.1f} tokens/s")
    print(f"a/c = {rates['a'] / rates['c']:.3f}   b/c = {rates['b'] / rates['c']:.3f}   a/b = {rates['a'] / rates['b']:.2f}")


if __name__ == "__main__":
    main()
