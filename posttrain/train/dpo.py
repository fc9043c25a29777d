"""Direct preference optimization: TRL's DPOTrainer on preference pairs (the arena's export).

With LoRA the reference policy is the start checkpoint itself (the adapter disabled), so no
second copy of the model is held in memory."""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from posttrain.registry import Registry
from posttrain.store import Checkpoint
from posttrain.train.base import Optimization, TrainRecipe, finish, prepare, trl_args
from posttrain.train.data import DataSource


class DPORecipe(TrainRecipe):
    data: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:preference")])
    training: Optimization = Field(default_factory=lambda: Optimization(learning_rate=5e-5))
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference policy.")
    loss_type: str = Field("sigmoid", description="TRL's DPO loss: sigmoid, ipo, hinge, robust, apo_zero, ...")
    precompute_ref_log_probs: bool = Field(
        False, description="Score the reference once before training (saves a forward pass per step).")


def dpo_trainer(recipe: DPORecipe, prepared, callbacks: Sequence = ()):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**trl_args(recipe, prepared), beta=recipe.beta, loss_type=[recipe.loss_type],
                     max_length=recipe.max_length, precompute_ref_log_probs=recipe.precompute_ref_log_probs)
    return DPOTrainer(model=prepared.model, ref_model=None, args=args, train_dataset=prepared.data.to_hf(),
                      processing_class=prepared.tokenizer, peft_config=prepared.peft_config, callbacks=list(callbacks))


def train_dpo(recipe: DPORecipe, registry: Registry | None = None, resume: bool = False,
              callbacks: Sequence = ()) -> Checkpoint | None:
    """Align `recipe.model` with the preference pairs in `recipe.data`."""
    prepared = prepare(recipe, "dpo", registry, resume)
    return finish(dpo_trainer(recipe, prepared, callbacks), prepared, recipe, stage="dpo")
