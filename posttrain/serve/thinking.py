"""Thinking models behind the front door: which mode a request runs a model in, and how long it
may think, said the ways clients say it and sent to the engine in vLLM's terms.

A request asks for a mode with vLLM's `chat_template_kwargs: {"enable_thinking": bool}`, with
Qwen3's soft switch ending its last user turn (`... /think`, `... /no_think`), or with OpenAI's
reasoning effort (`reasoning_effort`, in the Responses API `reasoning.effort`; "none" is off, as
vLLM reads it). Qwen3's precedence: enable_thinking false is final; otherwise the switch decides,
then enable_thinking true, then the effort, then the model's default set at `serve` time, then
its chat template's own. For a `qwen3` model the outcome reaches the template as
`enable_thinking`; the soft switch stays in the text, as the model was trained with it.

`max_thinking_tokens` (per request, or the model's default) becomes vLLM's
`thinking_token_budget`: the engine forces the think block closed when the trace reaches it
(chat and completions: vLLM's Responses API has no budget, and would silently ignore one).

A model that does not think answers a request for thinking with a 400 instead of ignoring it; a
request to switch thinking off is what it does anyway, and its `enable_thinking: false` is
dropped so that its template renders the prompt the model was trained on. A `deepseek_r1` model
always thinks: switching it off is a 400. A model that does not think on an engine with a
reasoning parser (beside a thinking adapter) gets posttrain's marker, so its reply stays content.

Bodies are copied and changed only when something changes, so other requests pass as bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from posttrain.errors import PosttrainError
from posttrain.serve.protocol import error
from posttrain.serve.vllm_plugin import NOT_THINKING, REASONING_PARSER

# Qwen3's soft switch, as posttrain's fusion data puts it: the last word of the user turn.
SWITCH = re.compile(r"(?<!\S)/(think|no_think)\s*$")
MODE_ENDPOINTS = ("chat", "responses", "tokenize")  # those that render a chat template
BUDGET_ENDPOINTS = ("chat", "completions")  # vLLM 0.32's Responses API has no thinking budget
PARSED_ENDPOINTS = ("chat", "responses")  # those whose replies vLLM's reasoning parser splits
BUDGET = "max_thinking_tokens"


@dataclass(frozen=True)
class Thinking:
    """How the front door serves one model: its format (None: it does not think), the mode when
    a request names none (None: its template's default), the default thinking budget, and
    whether it does not think but its engine parses traces (see `vllm_plugin`)."""

    format: str | None = None
    default: bool | None = None
    budget: int | None = None
    beside_thinkers: bool = False

    def apply(self, model: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any] | JSONResponse:
        """The body to send the engine (`body` itself when nothing changes), or the error."""
        budget = body.get(BUDGET)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            return error(400, f"`{BUDGET}` must be a whole number of tokens, 0 or more; got {budget!r}"[:200],
                         param=BUDGET)
        mode, asked_by = requested_mode(endpoint, body)
        if self.format is None and (mode or budget is not None):
            return error(400, f"{model} does not think: it has no reasoning mode to turn on (asked by "
                         f"{asked_by or BUDGET})", param=asked_by or BUDGET, code="thinking_not_supported")
        if self.format == "deepseek_r1" and mode is False:
            return error(400, f"{model} always thinks (deepseek_r1 format): it has no mode without thinking "
                         f"(asked by {asked_by})", param=asked_by, code="thinking_not_supported")
        if budget is not None and endpoint == "responses":
            return error(400, f"`{BUDGET}` works with /v1/chat/completions and /v1/completions; vLLM's Responses "
                         f"API has no thinking budget", param=BUDGET)
        changes = self._changes(endpoint, body, mode, self.budget if budget is None else budget)
        if not changes and BUDGET not in body:
            return body
        sent = {**body, **changes}
        sent.pop(BUDGET, None)  # posttrain's name; the engine knows its own
        return sent

    def off(self, endpoint: str, sent: dict[str, Any]) -> bool:
        """Whether `sent` (what `apply` returned) runs this thinking model with thinking off: its
        prompt then ends in the template's empty think block, which the harvest keeps with the answer."""
        kwargs = sent.get("chat_template_kwargs")
        return (self.format == "qwen3" and endpoint in PARSED_ENDPOINTS and isinstance(kwargs, dict)
                and kwargs.get("enable_thinking") is False)

    def _changes(self, endpoint: str, body: dict[str, Any], mode: bool | None, budget: int | None) -> dict[str, Any]:
        kwargs = body.get("chat_template_kwargs")
        kwargs = kwargs if isinstance(kwargs, dict) else {}
        if self.format is None:
            return self._not_thinking(endpoint, body, kwargs, mode)
        changes: dict[str, Any] = {}
        if endpoint in MODE_ENDPOINTS and self.format == "qwen3":
            mode = self.default if mode is None else mode
            if mode is not None and kwargs.get("enable_thinking") is not mode:
                changes["chat_template_kwargs"] = {**kwargs, "enable_thinking": mode}
        if endpoint in BUDGET_ENDPOINTS and mode is not False and budget is not None \
                and "thinking_token_budget" not in body:
            changes["thinking_token_budget"] = budget
        return changes

    def _not_thinking(self, endpoint: str, body: dict[str, Any], kwargs: dict[str, Any],
                      mode: bool | None) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        sent = kwargs
        if mode is False:
            # Off is what it does anyway: its template must not render a think block for it (vLLM
            # turns a reasoning effort of "none" into enable_thinking false too).
            changes = {key: None for key in ("reasoning", "reasoning_effort") if body.get(key)}
            sent = {k: v for k, v in kwargs.items() if k != "enable_thinking"}
        if self.beside_thinkers and endpoint in PARSED_ENDPOINTS:
            sent = {**sent, NOT_THINKING: True}
        if sent != kwargs:
            changes["chat_template_kwargs"] = sent
        return changes


def requested_mode(endpoint: str, body: dict[str, Any]) -> tuple[bool | None, str]:
    """The mode a request asks for (None: it does not say) and the field that asks."""
    if endpoint not in MODE_ENDPOINTS:
        return None, ""
    kwargs = body.get("chat_template_kwargs")
    explicit = kwargs.get("enable_thinking") if isinstance(kwargs, dict) else None
    if explicit is False:
        return False, "chat_template_kwargs.enable_thinking"
    if switch := SWITCH.search(last_user_text(endpoint, body)):
        return switch.group(1) == "think", "input" if endpoint == "responses" else "messages"
    if explicit is True:
        return True, "chat_template_kwargs.enable_thinking"
    effort = body.get("reasoning") if endpoint == "responses" else body.get("reasoning_effort")
    effort = effort.get("effort") if isinstance(effort, dict) else effort
    if isinstance(effort, str):
        return effort != "none", "reasoning.effort" if endpoint == "responses" else "reasoning_effort"
    return None, ""


def last_user_text(endpoint: str, body: dict[str, Any]) -> str:
    """The text of the last user turn: chat `messages`, or the Responses API's `input` (a string
    is one user turn)."""
    turns = body.get("input") if endpoint == "responses" else body.get("messages")
    if isinstance(turns, str):
        return turns
    user = next((t for t in reversed(turns) if isinstance(t, dict) and t.get("role") == "user"), None) \
        if isinstance(turns, list) else None
    content = user.get("content") if user else None
    if isinstance(content, list):  # text parts (chat: "text", Responses: "input_text")
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""



def reasoning_parser(tokenizer_folder: str, formats: list[str | None]) -> str | None:
    """The reasoning parser for an engine serving models with these thinking `formats` (None: a
    model that does not think): none if none think, posttrain's (`vllm_plugin`) if some do not.

    vLLM's deepseek_r1 parser finds the think block by token id, so it needs `<think>` and
    `</think>` to be single tokens: DeepSeek-R1's and Qwen3's vocabularies have them, SmolLM2's
    (posttrain's own models) does not, and the engine would die at start. vLLM's qwen3 parser
    reads them as text and, thinking on, splits as deepseek_r1 does (everything before `</think>`
    is the trace, a leading `<think>` dropped), so it serves every other case, mixed engines too."""
    thinking = set(formats) - {None}
    if not thinking:
        return None
    if None in formats:
        return REASONING_PARSER
    if thinking == {"deepseek_r1"} and _single_tokens(Path(tokenizer_folder), ("<think>", "</think>")):
        return "deepseek_r1"
    return "qwen3"


def _single_tokens(folder: Path, tokens: tuple[str, ...]) -> bool:
    try:
        saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    vocab = (saved.get("model") or {}).get("vocab") or {}
    known = {t.get("content") for t in saved.get("added_tokens") or []}
    known |= set(vocab) if isinstance(vocab, dict) else {entry[0] for entry in vocab}  # BPE, or Unigram's pairs
    return all(token in known for token in tokens)


def policies(formats: dict[str, str | None], parsers: dict[str, str | None], modes: dict[str, bool],
             budgets: dict[str, int]) -> dict[str, Thinking]:
    """Each served model's `Thinking` from its registry format, its engine's reasoning parser and
    the `serve` options (default mode and budget per name), checked: an option for a model that
    cannot take it is an error at start, not a setting silently ignored."""
    for option, values in (("--thinking", modes), ("--max-thinking-tokens", budgets)):
        if unknown := sorted(set(values) - set(formats)):
            raise PosttrainError(f"{option} names {', '.join(unknown)}, which is not a local model served here "
                                 f"(a remote model's thinking is its server's)")
        if cannot := sorted(name for name in values if formats[name] is None):
            raise PosttrainError(f"{option}: {', '.join(cannot)} does not think (no thinking format in the registry; "
                                 f"`posttrain models set-thinking NAME qwen3` if it does)")
    if always := sorted(name for name, on in modes.items() if not on and formats[name] == "deepseek_r1"):
        raise PosttrainError(f"--thinking: {', '.join(always)} always thinks (deepseek_r1 format); it cannot be off")
    return {name: Thinking(fmt, modes.get(name), budgets.get(name), fmt is None and parsers[name] == REASONING_PARSER)
            for name, fmt in formats.items()}
