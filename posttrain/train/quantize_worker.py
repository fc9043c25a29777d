"""Quantize one checkpoint with llm-compressor; run by `posttrain train quantize` in the
quantization environment (llm-compressor pins compressed-tensors and transformers versions
that vLLM's pins exclude, so it cannot share vLLM's environment).

Standalone on purpose: it imports torch, transformers, datasets and llmcompressor only.
    python quantize_worker.py JOB.json
JOB: {"model", "out", "scheme", "calibration": [texts], "heldout": [texts], "max_length", "report"}
It writes the compressed-tensors checkpoint to `out` and {"ppl_before", "ppl_after"} to `report`.
"""

from __future__ import annotations

import json
import math
import sys


def group_size(model) -> int | None:
    """The largest group size vLLM's kernels take (128, 64, 32) that divides every quantized
    layer's input width; None for one scale per output channel."""
    import torch

    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), None)


def weight_only(bits: int, group: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                               strategy="group" if group else "channel", group_size=group)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def recipe(scheme: str, model):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head"]
    if scheme == "w8a8-int8":
        # int8 weights, dynamic per-token int8 activations: vLLM runs these on CPUs (oneDNN) and GPUs.
        return [GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    if scheme == "w8a16":
        return [QuantizationModifier(config_groups=weight_only(8, group_size(model)), ignore=ignore)]
    if scheme == "w4a16-gptq":
        return [GPTQModifier(config_groups=weight_only(4, group_size(model)), ignore=ignore)]
    return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]


def perplexity(model, tokenizer, texts: list[str], max_length: int) -> float:
    import torch

    nll, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
            if ids.size(1) < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            nll += loss.item() * (ids.size(1) - 1)
            tokens += ids.size(1) - 1
    return math.exp(nll / max(tokens, 1))


def main(job_path: str) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.loads(open(job_path).read())
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
    before = perplexity(model, tokenizer, job["heldout"], job["max_length"])
    calibration = Dataset.from_dict({"text": job["calibration"]})
    oneshot(model=model, processor=tokenizer, recipe=recipe(job["scheme"], model), dataset=calibration,
            num_calibration_samples=len(job["calibration"]), max_seq_length=job["max_length"])
    after = perplexity(model, tokenizer, job["heldout"], job["max_length"])
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    with open(job["report"], "w") as fh:
        json.dump({"ppl_before": before, "ppl_after": after}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
