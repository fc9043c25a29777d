"""lm-eval's chat backend (`local-chat-completions`) for a thinking model, in one mode.

- The mode goes to the server in `body`, the extra request fields `modes.request_body` gives
  (vLLM's `chat_template_kwargs: {"enable_thinking": bool}`).
- What is scored is the answer after the trace: the served model's reasoning parser returns the
  trace apart (`reasoning`), and a think block left in `content` (a server without a parser) is
  cut at `</think>` as lm-eval's own `think_end_token` does.
- A task's stop strings (gsm8k's "Question:", a few-shot "\\n\\n") are not sent while the model
  may think: vLLM matches them against the whole output, trace included, where they would end
  the thinking before any answer. They cut the answer afterwards instead, as lm-eval's vllm
  backend does with `think_end_token`.
- The tokens each request spent (`usage.completion_tokens` and its `reasoning_tokens`) are kept
  per prompt in `spent`, to be matched with lm-eval's per-sample log (`tokens_spent`).

Imported after `bench.go_offline()`: it imports lm_eval.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from typing import Any

from lm_eval.models.openai_completions import LocalChatCompletion
from lm_eval.models.utils import postprocess_generated_text

from posttrain.train.data import THINK_CLOSE

# The request being answered, for `parse_generations` (which lm-eval calls with the reply only):
# set in `_create_payload`, which runs in the same asyncio task (or thread) as the parse.
_REQUEST: ContextVar[tuple[str | None, list[str] | None]] = ContextVar("posttrain_chat_request",
                                                                       default=(None, None))


def prompt_key(messages: Any) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


class ThinkingChat(LocalChatCompletion):
    def __init__(self, thinking: bool | None = None, body: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(think_end_token=THINK_CLOSE, **kwargs)
        self.thinking = thinking
        self.body = body or {}
        self.spent: dict[str, tuple[int | None, int | None]] = {}

    def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kwargs) -> dict:
        payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos,
                                          **kwargs)
        payload |= self.body
        # Thinking off, the reply is the answer: the server may stop it as usual.
        stop = payload.pop("stop", None) if self.thinking is not False else None
        _REQUEST.set((prompt_key(messages), stop))
        return payload

    def parse_generations(self, outputs: dict | list[dict], **kwargs: Any) -> list[str]:
        key, stop = _REQUEST.get()
        answers = super().parse_generations(outputs, **kwargs)
        for out in outputs if isinstance(outputs, list) else [outputs]:
            usage = (out or {}).get("usage") or {}
            if key is not None and usage:
                details = usage.get("completion_tokens_details") or {}
                self.spent[key] = (usage.get("completion_tokens"), details.get("reasoning_tokens"))
        return [postprocess_generated_text(a, stop, None) if a is not None else None for a in answers]


def tokens_spent(samples: list[dict[str, Any]], spent: dict[str, tuple[int | None, int | None]]) -> list[tuple]:
    """(completion, reasoning) tokens of each logged sample's generation request, where known."""
    out = []
    for sample in samples:
        for context, *_ in sample.get("arguments") or []:
            if isinstance(context, (tuple, list)):  # logged samples hold the request's arguments as text
                context = context[0] if context else None
            prompt = getattr(context, "prompt", context)  # lm-eval's JsonChatStr: the messages as JSON
            if isinstance(prompt, str) and (key := prompt_key(json.loads(prompt))) in spent:
                out.append(spent[key])
    return out
