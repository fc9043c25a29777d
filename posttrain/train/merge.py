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
    saved_dtype = base_dtype(Path(served.base_path) / "config.json")
    base = AutoModelForCausalLM.from_pretrained(served.base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, served.adapter_path).merge_and_unload()
    tokenizer = load_tokenizer(served.tokenizer_path)
    with registry.staging(output) as tmp:
        model.to(getattr(torch, saved_dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return registry.add(output, registry.model_dir(output), stage="merge", parent=adapter,
                        recipe={"merged": adapter, "base": row.parent, "dtype": saved_dtype})


def base_dtype(config_file: Path) -> str:
    """The dtype a checkpoint is stored in: `dtype` (transformers 5), `torch_dtype` (4.x), else fp32."""
    import torch

    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise PosttrainError(f"{config_file}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    dtype = (config.get("dtype") or config.get("torch_dtype") or "float32") if isinstance(config, dict) else None
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        raise PosttrainError(f"{config_file}: dtype {dtype!r} is not a torch dtype")
    return dtype.removeprefix("torch.")
