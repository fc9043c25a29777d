"""Distillation by rejection sampling (DeepSeek-R1's second stage): ask a teacher served behind
any OpenAI-compatible API for `n` samples per prompt, keep those the rewards accept (the same
functions GRPO trains with), and write them as SFT data (`{"messages": prompt + reply}`).

Next to the JSONL goes `FILE.meta.json`: teacher, endpoint, rewards, threshold, counts and the
acceptance rate, and the sha256 of the prompt files; training on the JSONL then puts its own
sha256 in the student's lineage.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import Field
from tqdm.auto import tqdm

from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.files import write_jsonl
from posttrain.registry import file_sha256
from posttrain.train import rewards as reward_functions
from posttrain.train.data import THINK_CLOSE, THINK_OPEN, DataSource, load
from posttrain.train.grpo import RewardSpec


class GenerateRecipe(Recipe):
    teacher: str | None = Field(None, description="The model name the endpoint serves (a pipeline fills it in).")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible API of the teacher.")
    api_key: str | None = None
    prompts: list[DataSource] = Field(description="Prompt data (gsm8k, code, prompt or messages formats).")
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="math_answer")], min_length=1)
    threshold: float = Field(1.0, description="Keep a sample whose weighted reward sum reaches this.")
    n: int = Field(4, gt=0, description="Samples per prompt.")
    max_per_prompt: int = Field(1, gt=0, description="Keep at most this many accepted samples per prompt.")
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.8, ge=0)
    concurrency: int = Field(8, gt=0)


async def _sample(client, recipe: GenerateRecipe, rows: list[dict[str, Any]]) -> list[list[str]]:
    import openai

    gate = asyncio.Semaphore(recipe.concurrency)
    with tqdm(total=len(rows), desc=f"sampling {recipe.teacher}", unit="prompt") as bar:
        async def one(row: dict[str, Any]) -> list[str]:
            async with gate:
                try:
                    reply = await client.chat.completions.create(
                        model=recipe.teacher, messages=row["prompt"], n=recipe.n, max_tokens=recipe.max_tokens,
                        temperature=recipe.temperature)
                except openai.NotFoundError:
                    raise PosttrainError(f"{recipe.base_url} does not serve {recipe.teacher!r}") from None
                except openai.APIConnectionError:
                    raise PosttrainError(f"cannot reach the teacher at {recipe.base_url}") from None
            bar.update()
            return [as_written(choice.message) for choice in reply.choices]

        return await asyncio.gather(*(one(row) for row in rows))


def as_written(message) -> str:
    """A reply as the teacher wrote it: a thinking teacher's trace comes back apart from its
    answer (the engine's reasoning parser), and the student learns it inline, as the rewards read it."""
    extra = message.model_extra or {}
    trace = extra.get("reasoning") or extra.get("reasoning_content")
    return f"{THINK_OPEN}{trace}{THINK_CLOSE}{message.content or ''}" if trace else message.content or ""


def _scores(recipe: GenerateRecipe, row: dict[str, Any], samples: list[str]) -> list[float]:
    """Each sample's weighted reward sum (a reward that does not apply to the row counts 0)."""
    columns = {k: [v] * len(samples) for k, v in row.items() if k != "prompt"}
    total = [0.0] * len(samples)
    for spec in recipe.rewards:
        values = reward_functions.make(spec.name, **spec.params)(completions=samples, **columns)
        total = [t + spec.weight * (v or 0.0) for t, v in zip(total, values)]
    return total


def generate(recipe: GenerateRecipe, out: str | Path) -> dict[str, Any]:
    """Sample, filter and write `out` (JSONL, atomically) and `out.meta.json`; returns the meta."""
    import openai

    if not recipe.teacher:
        raise PosttrainError("no teacher: name the model the endpoint serves (--teacher)")
    for spec in recipe.rewards:
        reward_functions.make(spec.name, **spec.params)
    prompts = load(recipe.prompts, "grpo")
    client = openai.AsyncOpenAI(base_url=recipe.base_url, api_key=recipe.api_key or "none", max_retries=2)
    samples = asyncio.run(_sample(client, recipe, prompts.rows))
    scores = [_scores(recipe, row, replies) for row, replies in zip(prompts.rows, samples)]
    kept: list[dict[str, Any]] = []
    for row, replies, row_scores in zip(prompts.rows, samples, scores):
        accepted = [reply for reply, score in zip(replies, row_scores) if score >= recipe.threshold]
        kept += [{"messages": [*row["prompt"], {"role": "assistant", "content": reply}]}
                 for reply in list(dict.fromkeys(accepted))[: recipe.max_per_prompt]]
    out = Path(out)
    total = sum(len(replies) for replies in samples)
    meta = {"teacher": recipe.teacher, "base_url": recipe.base_url, "rewards": [s.model_dump() for s in recipe.rewards],
            "threshold": recipe.threshold, "n": recipe.n, "prompts": len(prompts.rows), "samples": total,
            "accepted": sum(score >= recipe.threshold for row_scores in scores for score in row_scores),
            "written": len(kept), "prompt_files": [{"path": str(f), "sha256": file_sha256(f)} for f in prompts.files],
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    meta["acceptance_rate"] = meta["accepted"] / max(total, 1)
    if not kept:
        print(f"warning: the rewards ({', '.join(s.name for s in recipe.rewards)}, threshold {recipe.threshold}) "
              f"rejected all {total} samples of {recipe.teacher}; {out} is empty", flush=True)
    write_jsonl(out, kept)
    Path(f"{out}.meta.json").write_text(json.dumps(meta, indent=2))
    print(f"kept {meta['accepted']} of {total} samples ({meta['acceptance_rate']:.0%}); wrote {len(kept)} "
          f"conversations -> {out}", flush=True)
    return meta
