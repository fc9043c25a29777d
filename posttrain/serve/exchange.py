"""What the front door remembers of one proxied request: Prometheus metrics for every request,
and, when harvesting is on, the (prompt, completion) rows that preference data is made of. A
thinking model's trace, which the engine's reasoning parser returns apart from the answer (chat
`reasoning`, streamed deltas too; the Responses API's reasoning items), is kept beside it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from posttrain.store import RequestLog, Store


class Metrics:
    """Per-app registry, so two front doors in one process (tests, the loop) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("posttrain_requests", "Requests answered, by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.tokens = Counter("posttrain_tokens", "Tokens processed, by model and kind (prompt/completion)",
                              ["model", "kind"], registry=self.registry)
        self.latency = Histogram("posttrain_request_latency_seconds", "Request latency (until the last byte)",
                                 ["model", "endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))


# What the harvest keeps: generations (tokenize/detokenize are counted, never stored).
GENERATIONS = ("chat", "completions", "responses")


@dataclass
class Exchange:
    """One proxied request, as metrics and the harvest see it."""

    model: str
    endpoint: str
    body: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    texts: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    traces: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # reasoning, per choice
    thinking_off: bool = False  # a thinking model asked to answer directly (see `Thinking.off`)
    usage: dict[str, Any] | None = None
    status: int = 200
    complete: bool = False
    response_id: str | None = None  # the engine's `id`, what feedback names the answer by

    @property
    def harvestable(self) -> bool:
        """A finished generation. `echo` completions are scoring requests (lm-eval's
        log-likelihoods): their text is the benchmark's prompt, not something a model wrote,
        so they are counted in the metrics but never stored as training data."""
        return (self.complete and self.status == 200 and self.endpoint in GENERATIONS
                and self.body.get("echo") is not True)

    def read(self, data: dict[str, Any]) -> None:
        """A whole reply, or one streamed chunk (every chunk carries the id; the first is kept)."""
        if self.endpoint == "responses":
            return self._read_response(data)
        self.response_id = self.response_id or data.get("id")
        self.read_choices(data.get("choices") or [])
        if data.get("usage"):
            self.usage = data["usage"]

    def _read_response(self, data: dict[str, Any]) -> None:
        """The Responses API: a whole `response`, or one streamed event (text and reasoning deltas,
        and the response itself in `response.created` / `response.completed`)."""
        if data.get("type") in STREAMED_TEXT:
            getattr(self, STREAMED_TEXT[data["type"]])[0].append(data.get("delta") or "")
            return
        response = data.get("response") if "type" in data else data
        if not isinstance(response, dict):
            return
        self.response_id = self.response_id or response.get("id")
        if usage := response.get("usage"):  # named as in chat, for the metrics and the rows
            self.usage = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")}
        if "type" not in data:
            items = response.get("output") or []
            for kind, part_type, texts in (("message", "output_text", self.texts),
                                           ("reasoning", "reasoning_text", self.traces)):
                texts[0] += [part.get("text") or "" for item in items if item.get("type") == kind
                             for part in item.get("content") or [] if part.get("type") == part_type]
        if data.get("type") == "response.completed":
            # Like chat's [DONE]: a client may hang up right after it.
            self.complete = True

    def read_choices(self, choices: list[dict[str, Any]]) -> None:
        for choice in choices:
            index, text = choice.get("index", 0), choice.get("text")
            if text is None:  # chat: a full message, or a streamed delta
                message = choice.get("message") or choice.get("delta") or {}
                text = message.get("content")
                # vLLM 0.32 says `reasoning`, older servers `reasoning_content`: one of them, not both added.
                trace = message.get("reasoning")
                trace = message.get("reasoning_content") if trace is None else trace
                if trace:
                    self.traces[index].append(trace)
            if text:
                self.texts[index].append(text)

    def record(self, metrics: Metrics) -> None:
        metrics.requests.labels(self.model, self.endpoint, str(self.status)).inc()
        metrics.latency.labels(self.model, self.endpoint).observe(time.perf_counter() - self.started)
        for kind in ("prompt", "completion"):
            if self.usage and self.usage.get(f"{kind}_tokens"):
                metrics.tokens.labels(self.model, kind).inc(self.usage[f"{kind}_tokens"])

    def log_rows(self) -> list[RequestLog]:
        """One row per choice: each is a (prompt, completion) pair preference data can use."""
        usage = self.usage or {}
        # A choice cut off while still thinking has a trace and no text.
        choices = [(i, self.texts.get(i, [])) for i in sorted({*self.texts, *self.traces})] or [(0, [])]
        latency_ms = (time.perf_counter() - self.started) * 1000
        prompt = self.body.get("messages", self.body.get("prompt", self.body.get("input")))
        return [
            RequestLog(
                model=self.model, endpoint=self.endpoint, request=self.body, completion="".join(parts),
                latency_ms=latency_ms, prompt_tokens=usage.get("prompt_tokens"),
                # vLLM reports one total for all n choices; it is per-row only when n == 1.
                completion_tokens=usage.get("completion_tokens") if len(choices) == 1 else None,
                response_id=self.response_id, choice=index, prompt_hash=prompt_hash(prompt),
                reasoning="".join(self.traces.get(index, [])) or ("" if self.thinking_off else None),
            )
            for index, parts in choices
        ]


# Streamed Responses API events that carry text, and which of an Exchange's texts they add to.
STREAMED_TEXT = {"response.output_text.delta": "texts", "response.reasoning_text.delta": "traces"}


def prompt_hash(prompt: Any) -> str:
    """The same messages (or completion prompt) give the same hash, whatever their key order."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Harvest:
    """The store that harvested rows go to, written after each response is sent (so the harvest
    never delays a client), and the response ids still on their way there: feedback sent right
    after an answer waits for its row instead of calling the id unknown."""

    def __init__(self, store: Store):
        self.store = store
        self._pending: dict[str, asyncio.Event] = {}

    def expect(self, exchange: Exchange) -> None:
        if exchange.response_id is not None:
            self._pending.setdefault(exchange.response_id, asyncio.Event())

    async def keep(self, exchange: Exchange) -> None:
        try:
            if exchange.harvestable:
                await asyncio.to_thread(self._write, exchange.log_rows())
        finally:
            if (written := self._pending.pop(exchange.response_id, None)) is not None:
                written.set()

    def _write(self, rows: list[RequestLog]) -> None:
        with self.store.session() as s:
            s.add_all(rows)

    async def settled(self, response_id: str, timeout: float) -> bool:
        """False if the response is still being generated or written after `timeout` seconds."""
        pending = self._pending.get(response_id)
        if pending is None:
            return True
        try:
            await asyncio.wait_for(pending.wait(), timeout)
        except TimeoutError:
            return False
        return True
