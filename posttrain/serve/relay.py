"""Forwarding one OpenAI request to the engine that serves its model, and its answer back.

Bodies pass through as bytes (vLLM validates sampling parameters and answers its own 400s);
streams are relayed event by event as they arrive. What the relay adds: OpenAI-shaped errors
for bad bodies, unknown models and dead engines (503 while the supervisor restarts them), and
an `Exchange` per request for the metrics and the harvest.

A model may have several backends (replicas of a local engine, or several upstream URLs under
one name): each request goes to the ready one with the fewest requests in flight, and a request
that fails before its first byte (connection refused, the backend answering 503) is sent to the
next one, so a replica dying under load costs only the requests it was already answering.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from posttrain.serve.engine import Engine
from posttrain.serve.upstream import Upstream
from posttrain.serve.exchange import Exchange, Harvest, Metrics
from posttrain.serve.protocol import check_body, error
from posttrain.serve.thinking import Thinking


Backend = Engine | Upstream
# Streams whose usage chunk must be asked for (`stream_options`); a Responses stream ends with
# its usage in `response.completed` anyway.
USAGE_ON_REQUEST = ("chat", "completions")


class Relay:
    def __init__(self, backends: list[Backend], metrics: Metrics, harvest: Harvest | None,
                 thinking: dict[str, Thinking] | None = None):
        self.routes: dict[str, list[Backend]] = {}
        self.thinking = thinking or {}  # local models; an upstream's thinking is its server's business
        for backend in backends:
            for name in backend.models:
                self.routes.setdefault(name, []).append(backend)
        self.metrics = metrics
        self.harvest = harvest

    async def forward(self, request: Request, endpoint: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error(400, f"malformed JSON body: {exc}", code="invalid_json")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        served = ", ".join(self.routes)
        if not isinstance(model, str):
            return error(400, f"`model` is required: one of {served}", param="model")
        if model not in self.routes:
            return error(404, f"The model `{model}` does not exist; served models: {served}",
                         param="model", code="model_not_found")
        if (refusal := check_body(endpoint, body)) is not None:
            return refusal
        policy = self.thinking.get(model)
        sent = policy.apply(model, endpoint, body) if policy is not None else body
        if isinstance(sent, JSONResponse):
            return sent
        exchange = Exchange(model, endpoint, body, thinking_off=policy is not None and policy.off(endpoint, sent))
        return await self._send(request.app.state.client, request.url.path, exchange, raw, sent)

    def _pick(self, model: str, tried: list[Backend]) -> Backend | None:
        ready = [b for b in self.routes[model] if b.state == "ready" and b not in tried]
        return min(ready, key=lambda b: b.in_flight, default=None)

    def _upstream_body(self, backend: Backend, exchange: Exchange, raw: bytes, body: dict) -> tuple[bytes, bool]:
        """The bytes to send (`body`: the client's, or a copy the thinking rules changed) and
        whether the client wants the usage chunk of a stream."""
        options = body.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        changes: dict = {}
        if (exchange.endpoint in USAGE_ON_REQUEST and body.get("stream") is True
                and (options is None or isinstance(options, dict)) and not client_wants_usage):
            # Ask for the usage chunk (metrics and harvest need token counts) and drop it again
            # on the way out, so the client sees exactly the stream it asked for.
            changes["stream_options"] = {**(options or {}), "include_usage": True}
        if isinstance(backend, Upstream) and backend.model != exchange.model:
            changes["model"] = backend.model
        changed = changes or body is not exchange.body
        return (json.dumps({**body, **changes}).encode() if changed else raw), client_wants_usage

    async def _send(self, client: httpx.AsyncClient, path: str, exchange: Exchange, raw: bytes,
                    body: dict) -> Response:
        streaming = exchange.body.get("stream") is True
        tried: list[Backend] = []
        while (backend := self._pick(exchange.model, tried)) is not None:
            tried.append(backend)
            content, client_wants_usage = self._upstream_body(backend, exchange, raw, body)
            upstream_request = client.build_request(
                "POST", backend.url + path, content=content,
                headers={"content-type": "application/json", **backend.headers})
            backend.in_flight += 1
            try:
                upstream = await client.send(upstream_request, stream=True)
                if upstream.status_code == 503:  # overloaded or going down: another replica may answer
                    await upstream.aclose()
                    backend.in_flight -= 1
                    continue
                if not (streaming and upstream.status_code == 200):
                    content = await upstream.aread()
                    backend.in_flight -= 1
            except httpx.TransportError:  # dead before the first byte: the supervisor restarts it
                backend.in_flight -= 1
                continue
            return self._respond(backend, upstream, exchange, content, streaming, client_wants_usage)
        return self.unavailable(exchange.model, exchange.endpoint, tried)

    def _respond(self, backend: Backend, upstream: httpx.Response, exchange: Exchange, content: bytes,
                 streaming: bool, client_wants_usage: bool) -> Response:
        exchange.status = upstream.status_code
        background = BackgroundTask(self.harvest.keep, exchange) if self.harvest is not None else None
        if streaming and upstream.status_code == 200:
            return StreamingResponse(self._relay(backend, upstream, exchange, drop_usage=not client_wants_usage),
                                     media_type="text/event-stream", background=background)
        if upstream.status_code == 200:
            exchange.read(json.loads(content))
            exchange.complete = True
            self._expect(exchange)
        exchange.record(self.metrics)
        return Response(content, status_code=upstream.status_code, background=background,
                        media_type=upstream.headers.get("content-type", "application/json"))

    async def _relay(self, backend: Backend, upstream: httpx.Response, exchange: Exchange,
                     drop_usage: bool) -> AsyncIterator[bytes]:
        pending = b""
        try:
            async for chunk in upstream.aiter_raw():
                pending += chunk
                while b"\n\n" in pending:
                    event, pending = pending.split(b"\n\n", 1)
                    _, _, payload = event.partition(b"data: ")  # Responses events start with `event: TYPE`
                    if payload.startswith(b"{"):
                        data = json.loads(payload)
                        exchange.read(data)
                        self._expect(exchange)
                        if data.get("usage") and drop_usage and not data.get("choices"):
                            continue
                    elif payload.startswith(b"[DONE]"):
                        # Before the yield: a client may hang up as soon as it reads [DONE], and the
                        # disconnect cancels this generator before the upstream's end arrives.
                        exchange.complete = True
                    yield event + b"\n\n"
            if pending:
                yield pending
            exchange.complete = True
        except httpx.TransportError:
            # The engine died mid-stream: the status line is already sent, so say it in-band.
            exchange.status = 503
            body = error(503, f"the engine serving {exchange.model} stopped mid-stream; retry").body
            yield b"data: " + body + b"\n\n"
        finally:
            backend.in_flight -= 1
            await upstream.aclose()
            exchange.record(self.metrics)

    def _expect(self, exchange: Exchange) -> None:
        if self.harvest is not None:
            self.harvest.expect(exchange)

    def unavailable(self, model: str, endpoint: str, tried: list[Backend]) -> JSONResponse:
        self.metrics.requests.labels(model, endpoint, "503").inc()
        backend = (tried or self.routes[model])[0]
        state = "not responding" if backend.state == "ready" else backend.state
        restarted = not isinstance(backend, Upstream) and state != "starting"
        return error(503, f"{backend.label} is {state}; retry shortly" + (" (posttrain restarts it)" if restarted else ""),
                     code="engine_unavailable", headers={"Retry-After": "5"})
