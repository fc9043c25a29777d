"""GRPO with rule-based rewards (DeepSeek-R1 / Qwen3 reasoning RL): for each prompt the policy
samples `num_generations` completions, the rewards in rewards.py score them, and each one's
advantage is its reward relative to its group's. Generation runs in vLLM (TRL's colocate
mode) on CUDA machines with vLLM installed, in transformers otherwise."""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from posttrain.errors import PosttrainError
from posttrain.registry import Registry
from posttrain.store import Checkpoint
from posttrain.train import rewards
from posttrain.train.base import Optimization, TrainRecipe, finish, has_cuda, prepare, trl_args
from posttrain.train.data import DataSource

R1_SYSTEM_PROMPT = ("Think about the problem step by step inside <think> </think> tags, then give the final "
                    "answer after the closing tag, as \\boxed{NUMBER} for math problems.")


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description=f"One of: {', '.join(rewards.REWARDS)}.")
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict, description="e.g. max_chars for length_penalty.")


class GRPORecipe(TrainRecipe):
    data: list[DataSource] = Field(
        default_factory=lambda: [DataSource(path="builtin:gsm8k", system_prompt=R1_SYSTEM_PROMPT)])
    training: Optimization = Field(default_factory=lambda: Optimization(learning_rate=1e-5))
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="math_answer"), RewardSpec(name="think_format", weight=0.5)],
        min_length=1)
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    max_completion_length: int = Field(256, gt=0)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.04, ge=0, description="KL penalty towards the start policy (0: none, no reference pass).")
    use_vllm: bool | None = Field(None, description="Generate with vLLM; default: when CUDA and vLLM are present.")


def use_vllm(recipe: GRPORecipe) -> bool:
    available = has_cuda() and importlib.util.find_spec("vllm") is not None
    if recipe.use_vllm and not available:
        raise PosttrainError("use_vllm: TRL generates with vLLM on CUDA GPUs only; here it needs use_vllm: false")
    return available if recipe.use_vllm is None else recipe.use_vllm


def grpo_trainer(recipe: GRPORecipe, prepared, callbacks: Sequence = ()):
    from trl import GRPOConfig, GRPOTrainer

    funcs = [rewards.make(spec.name, **spec.params) for spec in recipe.rewards]
    common = trl_args(recipe, prepared)
    # Every optimizer step must see whole groups: one prompt's completions per device batch at least.
    batch = max(recipe.training.batch_size, recipe.num_generations)
    common["per_device_train_batch_size"] = batch - batch % recipe.num_generations
    vllm = use_vllm(recipe)
    args = GRPOConfig(**common, num_generations=recipe.num_generations,
                      max_completion_length=recipe.max_completion_length, temperature=recipe.temperature,
                      beta=recipe.beta, reward_weights=[spec.weight for spec in recipe.rewards], use_vllm=vllm,
                      **({"vllm_mode": "colocate", "vllm_max_model_length": recipe.max_length} if vllm else {}))
    return GRPOTrainer(model=prepared.model, reward_funcs=funcs, args=args, train_dataset=prepared.data.to_hf(),
                       processing_class=prepared.tokenizer, peft_config=prepared.peft_config, callbacks=list(callbacks))


def train_grpo(recipe: GRPORecipe, registry: Registry | None = None, resume: bool = False,
               callbacks: Sequence = ()) -> Checkpoint | None:
    """Reinforce `recipe.model` on `recipe.data`'s prompts with `recipe.rewards`."""
    for spec in recipe.rewards:
        rewards.make(spec.name, **spec.params)  # unknown names fail before the model loads
    prepared = prepare(recipe, "grpo", registry, resume)
    return finish(grpo_trainer(recipe, prepared, callbacks), prepared, recipe, stage="grpo")
