"""Post-training quantization with llm-compressor, to compressed-tensors checkpoints vLLM loads.

    w8a8-int8    int8 weights (GPTQ) + dynamic per-token int8 activations: runs on vLLM's CPU
                 build and on GPUs
    w8a16        int8 weights, round-to-nearest
    w4a16-gptq   4-bit GPTQ weights: GPU serving (Marlin kernels)
    fp8-dynamic  FP8 weights and activations: GPUs with FP8 (Hopper, Ada)

llm-compressor runs in its own environment (`make quant-env`: `.venv-quant` beside `.venv`, or
POSTTRAIN_QUANT_PYTHON): it pins compressed-tensors and transformers versions that vLLM's pins
exclude. posttrain hands it a job file and reads back the perplexities; the checkpoint it
writes is registered here like every other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.models import DEFAULT_MODEL
from posttrain.registry import Registry
from posttrain.store import Checkpoint
from posttrain.train.data import DataSource, load

SCHEMES = ("w8a8-int8", "w8a16", "w4a16-gptq", "fp8-dynamic")
WORKER = Path(__file__).with_name("quantize_worker.py")
HELDOUT = 16


class QuantizeRecipe(Recipe):
    model: str = Field(DEFAULT_MODEL, description="Registered checkpoint (an adapter is merged first).")
    scheme: Literal["w8a8-int8", "w8a16", "w4a16-gptq", "fp8-dynamic"] = "w8a8-int8"
    output: str | None = Field(None, description="Registry name (default: MODEL-SCHEME).")
    data: DataSource = Field(DataSource(path="builtin:chat"),
                             description="Chat data: calibration samples, and the last 16 held out for perplexity.")
    calibration_samples: int = Field(48, gt=0)
    max_length: int = Field(512, gt=0)


def quant_python() -> Path:
    configured = os.environ.get("POSTTRAIN_QUANT_PYTHON")
    python = Path(configured) if configured else Path(sys.prefix).parent / ".venv-quant" / "bin" / "python"
    if not python.exists():
        raise PosttrainError(f"quantization runs llm-compressor in its own environment, and {python} does not exist: "
                             "run `make quant-env` (or point POSTTRAIN_QUANT_PYTHON at a Python with llmcompressor)")
    return python


def weights_size(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def quantize(recipe: QuantizeRecipe, registry: Registry | None = None) -> Checkpoint:
    """Quantize `recipe.model`; the result is registered as stage `quantize` with its size and
    the perplexity before and after on held-out chat data in its recipe."""
    from posttrain.train.base import load_tokenizer, start_checkpoint

    registry = registry or Registry()
    output = recipe.output or f"{recipe.model}-{recipe.scheme}"
    registry.model_dir(output)
    if registry.find(output) is not None:
        raise PosttrainError(f"a model named {output!r} is already registered")
    python = quant_python()
    data = load([recipe.data], "sft")
    if len(data.rows) <= HELDOUT:
        raise PosttrainError(f"{recipe.data.path}: quantization needs more than {HELDOUT} conversations "
                             f"(calibration + {HELDOUT} held out), it has {len(data.rows)}")
    start = start_checkpoint(registry, recipe.model)
    tokenizer = load_tokenizer(start.path)
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in data.rows]
    with registry.staging(output) as tmp, tempfile.TemporaryDirectory() as work:
        job = {"model": start.path, "out": str(tmp), "scheme": recipe.scheme, "max_length": recipe.max_length,
               "calibration": texts[:-HELDOUT][: recipe.calibration_samples], "heldout": texts[-HELDOUT:],
               "report": str(Path(work) / "report.json")}
        (Path(work) / "job.json").write_text(json.dumps(job))
        print(f"quantizing {start.name} to {recipe.scheme} with llm-compressor ({python})", flush=True)
        result = subprocess.run([str(python), str(WORKER), str(Path(work) / "job.json")])
        if result.returncode != 0:
            raise PosttrainError(f"llm-compressor failed (exit {result.returncode}); its output is above")
        report = json.loads((Path(work) / "report.json").read_text())
    report |= {"scheme": recipe.scheme, "bytes_before": weights_size(start.path),
               "bytes_after": weights_size(registry.model_dir(output))}
    print(f"size {report['bytes_before'] / 2**20:.0f} MiB -> {report['bytes_after'] / 2**20:.0f} MiB "
          f"({report['bytes_after'] / report['bytes_before']:.0%}); held-out perplexity "
          f"{report['ppl_before']:.3f} -> {report['ppl_after']:.3f} "
          f"({report['ppl_after'] / report['ppl_before'] - 1:+.2%})", flush=True)
    return registry.add(output, registry.model_dir(output), stage="quantize", parent=start.name,
                        recipe=recipe.to_dict() | {"report": report}, datasets=data.sources)
