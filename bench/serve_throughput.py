"""Serving throughput on the default model (SmolLM2-135M-Instruct): the same chat prompts through
(a) posttrain's front door, (b) the vLLM engine behind it, directly, and (c) plain transformers
`generate` in-process. Prints output tokens/s of each and the ratios a/b (the front door's
overhead; goal >= 0.95) and b/c (what vLLM buys over a naive server). Then greedy agreement on
the 16 fixed prompts: the engine's tokens at its dtype against transformers' in float32, one
prompt at a time (what bf16 costs in exactness: how many replies are identical, and how many
tokens agree before the first difference).

The load generator runs in its own process, so (a) and (b) pay the same client cost and the
front door never shares a GIL with it; (a) and (b) alternate over several rounds (best of each)
because the machine is shared and noisy.

    python bench/serve_throughput.py [--requests 32] [--max-tokens 64] [--concurrency 8]
        [--dtype default|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["the sea", "a lighthouse", "bread", "a fox", "winter", "trains", "a library", "the moon",
          "rain", "a garden", "bicycles", "a volcano", "tea", "owls", "a market", "snow"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} ({i})."}]
            for i in range(n)]


def load(base_url: str, model: str, conversations: list, max_tokens: int, concurrency: int,
         api_key: str = "none") -> tuple[int, float]:
    """Run in a child process: all requests, `concurrency` at a time; (output tokens, seconds)."""
    import openai

    async def run() -> tuple[int, float]:
        gate = asyncio.Semaphore(concurrency)
        async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key) as client:

            async def one(messages) -> int:
                async with gate:
                    reply = await client.chat.completions.create(
                        model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                        extra_body={"ignore_eos": True},  # every request generates exactly max_tokens
                    )
                    return reply.usage.completion_tokens

            start = time.perf_counter()
            tokens = await asyncio.gather(*(one(m) for m in conversations))
            return sum(tokens), time.perf_counter() - start

    return asyncio.run(run())


def served_greedy(url: str, api_key: str, model: str, conversations: list, max_tokens: int) -> list[list[int]]:
    """Each reply's token ids (vLLM's `return_tokens_as_token_ids`: logprob tokens as "token_id:N")."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key)
    replies = [client.chat.completions.create(model=model, messages=m, max_tokens=max_tokens, temperature=0,
                                              logprobs=True, extra_body={"return_tokens_as_token_ids": True})
               for m in conversations]
    return [[int(t.token.rsplit(":", 1)[1]) for t in r.choices[0].logprobs.content] for r in replies]


def transformers_greedy(path: str, conversations: list, max_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    replies = []
    for messages in conversations:  # one at a time: no padding to disturb the reference
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        replies.append(out[0, ids["input_ids"].shape[1]:].tolist())
    return replies


def agreement(served: list[list[int]], reference: list[list[int]]) -> tuple[int, float]:
    """(identical replies, mean tokens agreeing before the first difference)."""
    prefixes = []
    for a, b in zip(served, reference):
        prefixes.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    return sum(a == b for a, b in zip(served, reference)), sum(prefixes) / len(prefixes)


def transformers_throughput(path: str, conversations: list, max_tokens: int, batch: int, dtype: str) -> tuple[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(conversations), batch):
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in conversations[i:i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        tokens += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating (b, a) rounds; best of each")
    parser.add_argument("--dtype", default="default", choices=["default", "float32", "bfloat16"],
                        help="for the engine and for transformers alike; default: the engine's own default "
                             "for this CPU (bfloat16 with native bf16, else float32) against transformers "
                             "in float32, its own default")
    args = parser.parse_args()

    from posttrain.models import pull_default
    from posttrain.registry import Registry
    from posttrain.serve.app import start_front_door

    registry = Registry()
    row = pull_default(registry)
    conversations = prompts(args.requests)
    work = (conversations, args.max_tokens, args.concurrency)
    best: dict[str, float] = {}
    engine_dtype = None if args.dtype == "default" else args.dtype
    baseline_dtype = "float32" if args.dtype == "default" else args.dtype
    with start_front_door([row.name], registry=registry, dtype=engine_dtype) as door, ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    ) as client:
        engine = door.engine(row.name)
        engine_dtype = engine.dtype
        # The engine answers only with the key the front door holds.
        targets = {"b": (engine.url + "/v1", engine.secret), "a": (door.base_url, "none")}
        client.submit(load, door.base_url, row.name, conversations[:8], 8, 8).result()  # warm-up
        fixed = prompts(len(TOPICS))
        served_ids = served_greedy(engine.url + "/v1", engine.secret, row.name, fixed, args.max_tokens)
        for r in range(args.rounds):
            for key in ("b", "a"):
                url, api_key = targets[key]
                tokens, seconds = client.submit(load, url, row.name, *work, api_key).result()
                best[key] = max(best.get(key, 0.0), tokens / seconds)
                print(f"round {r + 1} ({key}) {tokens} tokens in {seconds:.1f} s: {tokens / seconds:.1f} tokens/s",
                      flush=True)
    # (c) after the engine is gone, so transformers gets both cores as a plain server would.
    tokens, seconds = transformers_throughput(row.path, conversations, args.max_tokens, args.concurrency,
                                              baseline_dtype)
    best["c"] = tokens / seconds
    identical, agreed = agreement(served_ids, transformers_greedy(row.path, fixed, args.max_tokens))
    print(f"\n{row.name}: {args.requests} requests x {args.max_tokens} output tokens, "
          f"{args.concurrency} concurrent")
    print(f"(a) front door          {best['a']:8.1f} tokens/s  ({engine_dtype})")
    print(f"(b) vLLM directly       {best['b']:8.1f} tokens/s  ({engine_dtype})")
    print(f"(c) transformers        {best['c']:8.1f} tokens/s  (generate, batches of {args.concurrency}, "
          f"{baseline_dtype})")
    print(f"a/b = {best['a'] / best['b']:.3f}   (goal >= 0.95)")
    print(f"b/c = {best['b'] / best['c']:.1f}x")
    print(f"greedy, engine ({engine_dtype}) vs transformers (float32), {len(fixed)} fixed prompts x up to "
          f"{args.max_tokens} tokens: {identical}/{len(fixed)} replies identical, {agreed:.1f} tokens agree "
          f"before the first difference on average")


if __name__ == "__main__":
    main()
