"""What the benches measure throughput against: the FLOP/s a plain matmul reaches on this
machine, in the same run (so it sees the same clocks, threads and neighbours), and the FLOPs a
decoder-only transformer (Llama / Qwen3 shapes) spends per token.

Per token, a forward pass costs 2 FLOPs per weight of every matmul (the LM head included, the
embedding lookup not) plus causal attention, 2 * layers * heads * head_dim * T for a sequence of
T tokens (QK^T and AV, each over T/2 earlier positions on average). Training adds the backward
pass: twice the forward for full fine-tuning; for LoRA the frozen weights need gradients for
their inputs only (one forward's worth of matmuls) while attention's backward is still twice
its forward. Gradient checkpointing's recomputation is not counted: this is model FLOPs (MFU),
not hardware FLOPs.
"""

from __future__ import annotations

import time
from typing import Any


def matmul_flops(n: int, dtype: Any, device: str = "cpu", seconds: float = 2.0, threads: int | None = None) -> float:
    """FLOP/s of an n x n x n matmul: the best of bursts of about 0.2 s over `seconds` after a
    warm-up (on a shared machine the best burst is the one that had the cores to itself);
    `threads`: torch's CPU threads for the measurement (default: as set)."""
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or saved)

    def burst() -> float:
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < 0.2:
            a @ b
            runs += 1
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return 2 * n**3 * runs / elapsed

    try:
        burst()
        return max(burst() for _ in range(max(1, round(seconds / 0.2))))
    finally:
        torch.set_num_threads(saved)


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def matmul_params(config: Any) -> int:
    """Weights a token meets in matmuls: attention and MLP projections of every layer, and the
    LM head (tied or not). `config`: a transformers config or its dict (config.json)."""
    d, layers = _get(config, "hidden_size"), _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim") or d // heads
    kv = _get(config, "num_key_value_heads") or heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * d * _get(config, "intermediate_size")  # gate, up, down
    return layers * (attention + mlp) + _get(config, "vocab_size") * d


def attention_flops(config: Any, seq_len: float) -> float:
    """Causal attention's forward FLOPs per token in a sequence of `seq_len` tokens."""
    heads = _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim") or _get(config, "hidden_size") // heads
    return 2 * _get(config, "num_hidden_layers") * heads * head_dim * seq_len


def forward_flops(config: Any, seq_len: float) -> float:
    return 2 * matmul_params(config) + attention_flops(config, seq_len)


def training_flops(config: Any, seq_len: float, lora: bool, extra_forwards: int = 0) -> float:
    """FLOPs per trained token: forward + backward, plus `extra_forwards` forward-only passes
    over the same tokens (DPO's reference; GRPO's reference and its own generation)."""
    matmuls, attention = 2 * matmul_params(config), attention_flops(config, seq_len)
    backward = matmuls + 2 * attention if lora else 2 * (matmuls + attention)
    return (1 + extra_forwards) * (matmuls + attention) + backward


def flops_text(flops_per_s: float) -> str:
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.1f} {unit}"
    return f"{flops_per_s / 1e6:.1f} MFLOP/s"
