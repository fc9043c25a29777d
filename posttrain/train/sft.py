"""Supervised fine-tuning: TRL's SFTTrainer on chat data, the loss on assistant tokens only."""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from posttrain.registry import Registry
from posttrain.store import Checkpoint
from posttrain.train.base import TrainRecipe, finish, prepare, trl_args
from posttrain.train.data import DataSource


class SFTRecipe(TrainRecipe):
    data: list[DataSource] = Field(default_factory=lambda: [DataSource(path="builtin:chat")])
    assistant_only_loss: bool = Field(
        True, description="Learn only the assistant replies (system and user tokens are labelled -100).")
    packing: bool = Field(False, description="Pack several examples into each sequence (no padding).")


def sft_trainer(recipe: SFTRecipe, prepared, callbacks: Sequence = ()):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**trl_args(recipe, prepared), max_length=recipe.max_length, packing=recipe.packing,
                     assistant_only_loss=recipe.assistant_only_loss)
    return SFTTrainer(model=prepared.model, args=args, train_dataset=prepared.data.to_hf(),
                      processing_class=prepared.tokenizer, peft_config=prepared.peft_config, callbacks=list(callbacks))


def train_sft(recipe: SFTRecipe, registry: Registry | None = None, resume: bool = False,
              callbacks: Sequence = ()) -> Checkpoint | None:
    """Fine-tune `recipe.model` on `recipe.data`; the registered result (None on non-main ranks)."""
    prepared = prepare(recipe, "sft", registry, resume)
    return finish(sft_trainer(recipe, prepared, callbacks), prepared, recipe, stage="sft")
