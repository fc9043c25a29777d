"""Sharded multi-GPU training saves one servable checkpoint: FSDP2 with SHARDED_STATE_DICT and
DeepSpeed ZeRO-3 (the shipped recipes/accelerate configs, on 2 GPUs) each write a folder that
transformers / peft load as a whole model, registered once.

Both need 2 CUDA GPUs. torch 2.13's FSDP2 itself runs on CPU over gloo, but accelerate 1.15
never selects FSDP or DeepSpeed on a CPU: AcceleratorState switches to DistributedType.FSDP /
DEEPSPEED only for GPU-type devices, and TrainingArguments(use_cpu=True) makes a run under
fsdp.yaml train as plain DDP over gloo. On CPUs, every rank's part in saving is covered by
test_train.py's 2-process DDP run, which goes through the same save path."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="FSDP and ZeRO-3 need 2 CUDA GPUs: accelerate runs them as DDP on a CPU "
                                          "(see tests/test_sharded_training.py)")]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed-zero3.yaml"])
def test_sharded_training_saves_a_whole_model_registered_once(session_home, tiny, config, method):
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed on the GPU machine)")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = f"tiny-{config.split('.')[0]}-{method}"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate" / config),
         "--num_processes", "2", "-m", "posttrain", "train", "sft", "--set", "model=tiny-qwen3", "--set",
         f"output={output}", "--set", f"method={method}", "--set", "training.max_steps=2", "--set",
         "training.batch_size=2"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"registered {output}") == 1  # only the main process registers
    folder = session_home / "models" / output
    assert not [p.name for p in folder.iterdir() if "fsdp" in p.name or p.name.startswith("global_step")]
    before = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    reference = {k: v.clone() for k, v in before.state_dict().items()}
    if method == "full":
        after = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    else:
        after = PeftModel.from_pretrained(before, folder).merge_and_unload().state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in reference.items()}
    assert any(not torch.equal(after[k].float(), reference[k]) for k in reference)  # trained, all shards gathered
