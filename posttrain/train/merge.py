"""Merge a LoRA adapter into its base: a plain full checkpoint (safetensors, tokenizer, chat
template) that serves without LoRA support and starts the next training stage."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.registry import Registry
from posttrain.store import Checkpoint

MERGED_SUFFIX = "-merged"


def merge(adapter: str, output: str | None = None, registry: Registry | None = None) -> Checkpoint:
    """Fold `adapter` into its base in fp32 and save in the base's own dtype; registered as stage
    `merge` with the adapter as parent."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.train.base import load_tokenizer

    registry = registry or Registry()
    row = registry.get(adapter)
    if row.kind != "adapter":
        raise PosttrainError(f"{adapter} is a full checkpoint, not an adapter: nothing to merge")
    output = output or adapter + MERGED_SUFFIX
    registry.model_dir(output)
    if registry.find(output) is not None:
        raise PosttrainError(f"a model named {output!r} is already registered")
    served = registry.served(adapter)
    saved_dtype = json.loads((Path(served.base_path) / "config.json").read_text()).get("dtype", "float32")
    base = AutoModelForCausalLM.from_pretrained(served.base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, served.adapter_path).merge_and_unload()
    tokenizer = load_tokenizer(served.adapter_path if (Path(served.adapter_path) / "tokenizer_config.json").exists()
                               else served.base_path)
    with registry.staging(output) as tmp:
        model.to(getattr(torch, saved_dtype or "float32")).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return registry.add(output, registry.model_dir(output), stage="merge", parent=adapter,
                        recipe={"merged": adapter, "base": row.parent, "dtype": saved_dtype})
