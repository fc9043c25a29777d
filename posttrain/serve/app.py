"""The front door: one OpenAI-compatible FastAPI app routing each request by its `model` field
to the vLLM engine that serves it.

Bodies pass through as bytes (vLLM validates sampling parameters and answers its own 400s);
streams are relayed event by event as they arrive. The front door adds what one engine cannot:
one model list across engines, API keys, OpenAI-shaped errors for unknown models and dead
engines (503 while the supervisor restarts them), Prometheus metrics, and opt-in harvesting of
conversations into the store.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.errors import PosttrainError
from posttrain.registry import Registry
from posttrain.serve.engine import Engine, plan, start_engines, supervise
from posttrain.serve.protocol import ModelCard, ModelList, error
from posttrain.store import RequestLog, Store

log = logging.getLogger("posttrain.serve")

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


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


@dataclass
class Exchange:
    """One proxied request, as metrics and the harvest see it."""

    model: str
    endpoint: str
    body: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    texts: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    usage: dict[str, Any] | None = None
    status: int = 200
    complete: bool = False

    def read_choices(self, choices: list[dict[str, Any]]) -> None:
        for choice in choices:
            text = choice.get("text")
            if text is None:  # chat: a full message, or a streamed delta
                text = (choice.get("message") or choice.get("delta") or {}).get("content")
            if text:
                self.texts[choice.get("index", 0)].append(text)

    def record(self, metrics: Metrics) -> None:
        metrics.requests.labels(self.model, self.endpoint, str(self.status)).inc()
        metrics.latency.labels(self.model, self.endpoint).observe(time.perf_counter() - self.started)
        for kind in ("prompt", "completion"):
            if self.usage and self.usage.get(f"{kind}_tokens"):
                metrics.tokens.labels(self.model, kind).inc(self.usage[f"{kind}_tokens"])

    def log_rows(self) -> list[RequestLog]:
        """One row per choice: each is a (prompt, completion) pair preference data can use."""
        usage = self.usage or {}
        choices = sorted(self.texts.items()) or [(0, [])]
        latency_ms = (time.perf_counter() - self.started) * 1000
        return [
            RequestLog(
                model=self.model, endpoint=self.endpoint, request=self.body, completion="".join(parts),
                latency_ms=latency_ms, prompt_tokens=usage.get("prompt_tokens"),
                # vLLM reports one total for all n choices; it is per-row only when n == 1.
                completion_tokens=usage.get("completion_tokens") if len(choices) == 1 else None,
            )
            for _, parts in choices
        ]


def api_keys_from_env() -> list[str]:
    """POSTTRAIN_API_KEY may hold several keys, comma-separated."""
    return [k.strip() for k in os.environ.get("POSTTRAIN_API_KEY", "").split(",") if k.strip()]


def create_app(engines: list[Engine], api_keys: list[str] | tuple[str, ...] = (), harvest: Store | None = None,
               ready_timeout: float = 900) -> FastAPI:
    routes = {name: engine for engine in engines for name in engine.models}
    metrics = Metrics()
    keys = [k.encode() for k in api_keys]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        timeout = httpx.Timeout(None, connect=5.0)  # generations may legitimately take minutes
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            app.state.client = client
            watchers = [asyncio.create_task(supervise(e, client, ready_timeout)) for e in engines]
            try:
                yield
            finally:
                for task in watchers:
                    task.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)

    app = FastAPI(title="posttrain front door", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error(500, f"internal error in the front door ({type(exc).__name__}); see its log")

    def denied(request: Request) -> JSONResponse | None:
        if not keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), k) for k in keys):
            return None
        return error(401, "invalid or missing API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        states = [{"base": e.spec.base_name, "models": e.models, "state": e.state, "restarts": e.restarts}
                  for e in engines]
        ok = all(e.state == "ready" and e.alive() for e in engines)
        return JSONResponse({"status": "ok" if ok else "degraded", "engines": states}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request):
        if (refusal := denied(request)) is not None:
            return refusal
        cards = []
        for engine in engines:
            for name in engine.models:
                adapter = engine.spec.adapters.get(name)
                cards.append(ModelCard(
                    id=name, created=int(time.time()), root=adapter or engine.spec.base_path,
                    parent=engine.spec.base_name if adapter else None, max_model_len=engine.max_model_len,
                ))
        return ModelList(data=cards).model_dump()

    async def forward(request: Request) -> Response:
        if (refusal := denied(request)) is not None:
            return refusal
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error(400, f"malformed JSON body: {exc}", code="invalid_json")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        served = ", ".join(routes)
        if not isinstance(model, str):
            return error(400, f"`model` is required: one of {served}", param="model")
        engine = routes.get(model)
        if engine is None:
            return error(404, f"The model `{model}` does not exist; served models: {served}",
                         param="model", code="model_not_found")
        if engine.state != "ready":
            return unavailable(engine, model, ENDPOINTS[request.url.path])
        exchange = Exchange(model=model, endpoint=ENDPOINTS[request.url.path], body=body)
        client: httpx.AsyncClient = request.app.state.client
        streaming = body.get("stream") is True
        options = body.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if streaming and (options is None or isinstance(options, dict)) and not client_wants_usage:
            # Ask vLLM for the usage chunk (metrics and harvest need token counts) and drop it
            # again on the way out, so the client sees exactly the stream it asked for.
            raw = json.dumps({**body, "stream_options": {**(options or {}), "include_usage": True}}).encode()
        upstream_request = client.build_request(
            "POST", engine.url + request.url.path, content=raw, headers={"content-type": "application/json"}
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
            if not (streaming and upstream.status_code == 200):
                content = await upstream.aread()
        except httpx.TransportError:  # the engine died (the supervisor is restarting it)
            return unavailable(engine, model, exchange.endpoint)
        exchange.status = upstream.status_code
        background = BackgroundTask(keep, exchange) if harvest is not None else None
        if streaming and upstream.status_code == 200:
            return StreamingResponse(relay(upstream, exchange, drop_usage=not client_wants_usage),
                                     media_type="text/event-stream", background=background)
        if upstream.status_code == 200:
            reply = json.loads(content)
            exchange.usage = reply.get("usage")
            exchange.read_choices(reply.get("choices") or [])
            exchange.complete = True
        exchange.record(metrics)
        return Response(content, status_code=upstream.status_code, background=background,
                        media_type=upstream.headers.get("content-type", "application/json"))

    async def relay(upstream: httpx.Response, exchange: Exchange, drop_usage: bool) -> AsyncIterator[bytes]:
        pending = b""
        try:
            async for chunk in upstream.aiter_raw():
                pending += chunk
                while b"\n\n" in pending:
                    event, pending = pending.split(b"\n\n", 1)
                    if event.startswith(b"data: {"):
                        data = json.loads(event[6:])
                        exchange.read_choices(data.get("choices") or [])
                        if data.get("usage"):
                            exchange.usage = data["usage"]
                            if drop_usage and not data.get("choices"):
                                continue
                    elif event.startswith(b"data: [DONE]"):
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
            await upstream.aclose()
            exchange.record(metrics)

    async def keep(exchange: Exchange) -> None:
        # After the response is sent, so the harvest never delays a client.
        if exchange.complete:
            await asyncio.to_thread(_store_rows, harvest, exchange.log_rows())

    def unavailable(engine: Engine, model: str, endpoint: str) -> JSONResponse:
        metrics.requests.labels(model, endpoint, "503").inc()
        state = "not responding" if engine.state == "ready" else engine.state
        return error(503, f"the engine serving {model} is {state}; posttrain restarts it, retry shortly",
                     code="engine_unavailable", headers={"Retry-After": "5"})

    for path in ENDPOINTS:
        app.add_api_route(path, forward, methods=["POST"])
    return app


def _store_rows(store: Store, rows: list[RequestLog]) -> None:
    with store.session() as s:
        s.add_all(rows)


@dataclass
class FrontDoor:
    """A running front door (and its engines) in this process; `stop()` or `with` ends both."""

    base_url: str  # ends in /v1, ready for openai.OpenAI(base_url=...)
    api_key: str | None  # the first accepted key (None when keys are off)
    models: list[str]
    engines: list[Engine]
    server: Any = field(repr=False)  # uvicorn.Server
    sock: socket.socket = field(repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    def engine(self, model: str) -> Engine:
        return next(e for e in self.engines if model in e.models)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        for engine in self.engines:
            engine.stop()

    def __enter__(self) -> FrontDoor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _prepare(models: list[str], host: str, port: int, api_keys: list[str], log_requests: bool,
             registry: Registry | None, max_model_len: int, dtype: str | None, ready_timeout: float) -> FrontDoor:
    """Start the engines (blocking until they answer), bind the port, build the server."""
    import uvicorn

    if not models:
        raise PosttrainError("no models to serve")
    registry = registry or Registry()
    engines = [Engine(spec, registry.settings.home / "logs", max_model_len=max_model_len, dtype=dtype)
               for spec in plan(registry, list(dict.fromkeys(models)))]
    # Bind before the slow engine start, so a taken port fails in a second, not a minute.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PosttrainError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    try:
        asyncio.run(start_engines(engines, ready_timeout))
    except BaseException:
        sock.close()
        raise
    app = create_app(engines, api_keys, harvest=registry.store if log_requests else None,
                     ready_timeout=ready_timeout)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return FrontDoor(base_url=f"http://{shown}:{sock.getsockname()[1]}/v1",
                     api_key=api_keys[0] if api_keys else None,
                     models=[m for e in engines for m in e.models], engines=engines, server=server, sock=sock)


def start_front_door(models: list[str], port: int = 0, host: str = "127.0.0.1", api_keys: list[str] = (),
                     log_requests: bool = False, registry: Registry | None = None, max_model_len: int = 2048,
                     dtype: str | None = None, ready_timeout: float = 900) -> FrontDoor:
    """Serve `models` from a background thread and return once requests can be answered.
    port=0 picks a free port (see `.base_url`)."""
    door = _prepare(models, host, port, list(api_keys), log_requests, registry, max_model_len, dtype, ready_timeout)
    door.thread = threading.Thread(target=door.server.run, kwargs={"sockets": [door.sock]},
                                   name="posttrain-front-door", daemon=True)
    door.thread.start()
    while not door.server.started:
        if not door.thread.is_alive():
            door.stop()
            raise PosttrainError("the front door failed to start; see the log above")
        time.sleep(0.05)
    return door


def serve(models: list[str], port: int = 8000, host: str = "127.0.0.1", api_keys: list[str] = (),
          log_requests: bool = False, registry: Registry | None = None, max_model_len: int = 2048,
          dtype: str | None = None) -> None:
    """Serve `models` until Ctrl-C or SIGTERM; the engines stop with the front door. API keys
    are `api_keys` plus those in POSTTRAIN_API_KEY."""
    keys = list(dict.fromkeys([*api_keys, *api_keys_from_env()]))
    stop_on_sigterm()
    door = _prepare(models, host, port, keys, log_requests, registry, max_model_len, dtype, ready_timeout=900)
    try:
        print(f"posttrain: serving {', '.join(door.models)} at {door.base_url}"
              f" ({'API key required' if keys else 'no API key'}; engine logs in "
              f"{door.engines[0].log_path.parent}; Ctrl-C stops)", flush=True)
        door.server.run(sockets=[door.sock])  # handles SIGINT/SIGTERM itself
    finally:
        door.stop()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the engines. (uvicorn re-raises the
    SIGTERM it caught once it has stopped; without a handler of ours that would kill the process
    before its engines are stopped.)"""
    signal.signal(signal.SIGTERM, _exit_cleanly)


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)
