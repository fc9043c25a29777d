"""The front door: one OpenAI-compatible FastAPI app in front of the vLLM engines, routing
each request by its `model` field (`relay.py`), with what one engine cannot give: one model
list across engines, API keys, OpenAI-shaped errors, Prometheus metrics, and opt-in harvesting
of conversations into the store (`exchange.py`) with feedback on them (`feedback.py`). This
module holds the routes and the lifecycle (start, serve, stop).

Backends are local vLLM engines (`engine.py`, one or more replicas per base model) and remote
OpenAI-compatible servers (`upstream.py`); the routes treat them alike.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import shlex
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.errors import PosttrainError
from posttrain.registry import Registry
from posttrain.serve.engine import Engine, check_engine_args, cpu_build, cpu_env, plan, start_engines, supervise
from posttrain.serve.exchange import Harvest, Metrics
from posttrain.serve.feedback import post_feedback
from posttrain.serve.protocol import ModelCard, ModelList, error
from posttrain.serve.relay import Backend, Relay
from posttrain.serve.thinking import Thinking, policies
from posttrain.serve.upstream import Upstream
from posttrain.store import Store

log = logging.getLogger("posttrain.serve")

# Relayed by their `model` field, each under its metrics label. vLLM serves /tokenize and
# /detokenize outside /v1; tools that count tokens call them there.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
             "/tokenize": "tokenize", "/detokenize": "detokenize"}


def api_keys_from_env() -> list[str]:
    """POSTTRAIN_API_KEY may hold several keys, comma-separated."""
    return [k.strip() for k in os.environ.get("POSTTRAIN_API_KEY", "").split(",") if k.strip()]


def create_app(engines: list[Engine], api_keys: list[str] | tuple[str, ...] = (), harvest: Store | None = None,
               ready_timeout: float = 900, upstreams: list[Upstream] = (),
               thinking: dict[str, Thinking] | None = None, warmup: Warmup | None = None) -> FastAPI:
    """`thinking`: how each local model thinks (see `serve.thinking`); by default as the
    engines' registry rows say, with no default mode or budget. `warmup`: the engines are not
    started yet, and start once the app runs."""
    metrics = Metrics()
    harvested = Harvest(harvest) if harvest is not None else None
    backends: list[Backend] = [*engines, *upstreams]
    relay = Relay(backends, metrics, harvested, _policies(engines) if thinking is None else thinking)
    keys = [k.encode() for k in api_keys]

    app = FastAPI(title="posttrain front door", lifespan=_lifespan(engines, upstreams, ready_timeout, warmup),
                  docs_url=None, redoc_url=None)
    _add_error_handlers(app)

    def denied(request: Request) -> JSONResponse | None:
        if not keys or any(hmac.compare_digest(bearer_token(request).encode(), k) for k in keys):
            return None
        return error(401, "invalid or missing API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        # 200 while every model can be answered (a replica down is "degraded"), 503 otherwise.
        up = [b for b in backends if b.state == "ready" and b.alive()]
        answerable = all(any(b in up for b in relay.routes[m]) for m in relay.routes)
        status = "ok" if len(up) == len(backends) else "degraded" if answerable else "down"
        return JSONResponse({"status": status, "engines": [e.status() for e in engines],
                             **({"upstreams": [u.status() for u in upstreams]} if upstreams else {})},
                            status_code=200 if answerable else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request):
        return denied(request) or _model_list(relay)

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str, request: Request):
        if (refusal := denied(request)) is not None:
            return refusal
        if model not in relay.routes:
            return error(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
        return _card(model, relay).model_dump()

    def relayed(endpoint: str):
        async def route(request: Request) -> Response:
            return denied(request) or await relay.forward(request, endpoint)
        return route

    for path, endpoint in ENDPOINTS.items():
        app.add_api_route(path, relayed(endpoint), methods=["POST"], include_in_schema=False)

    @app.post("/v1/feedback", include_in_schema=False)
    async def feedback(request: Request):
        return denied(request) or await post_feedback(await request.body(), harvested, bearer_token(request))

    return app


def _lifespan(engines: list[Engine], upstreams: list[Upstream], ready_timeout: float, warmup: Warmup | None):
    """While the app runs: one HTTP client to every backend, and watchers (local engines are
    started first if `warmup`, then restarted whenever they die; upstreams are only marked up or
    down)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        timeout = httpx.Timeout(None, connect=5.0)  # generations may legitimately take minutes
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            app.state.client = client

            async def keep_engines_alive() -> None:
                if warmup is not None:
                    await warmup.run()
                await asyncio.gather(*(supervise(e, client, ready_timeout) for e in engines))

            watchers = [asyncio.create_task(keep_engines_alive())]
            watchers += [asyncio.create_task(u.watch(client)) for u in upstreams]
            try:
                yield
            finally:
                for task in watchers:
                    task.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)

    return lifespan


def bearer_token(request: Request) -> str:
    """The API key a request sent (`Authorization: Bearer KEY`), "" without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _add_error_handlers(app: FastAPI) -> None:
    """Every error the front door itself answers is OpenAI-shaped, its own bugs included."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error(500, f"internal error in the front door ({type(exc).__name__}); see its log")


def _card(name: str, relay: Relay) -> ModelCard:
    thinking = relay.thinking.get(name)
    ready = any(b.state == "ready" and b.alive() for b in relay.routes[name])
    return ModelCard(id=name, created=int(time.time()), thinking=thinking and thinking.format, ready=ready,
                     **relay.routes[name][0].card(name))


def _model_list(relay: Relay) -> dict[str, Any]:
    return ModelList(data=[_card(name, relay) for name in relay.routes]).model_dump()


def _policies(engines: list[Engine], modes: dict[str, bool] | None = None,
              budgets: dict[str, int] | None = None) -> dict[str, Thinking]:
    """How each local model thinks: its registry row's format, its engine's parser, `serve`'s options."""
    served = {name: engine.spec for engine in engines for name in engine.models}
    return policies({name: spec.thinking.get(name) for name, spec in served.items()},
                    {name: spec.reasoning_parser for name, spec in served.items()}, modes or {}, budgets or {})


@dataclass
class Warmup:
    """Engines starting behind a front door that already answers (`start_front_door(wait=False)`):
    meanwhile their models' cards say `ready: false` and requests to them get the OpenAI-shaped
    503 of a restarting engine, so the arena and the model list need not wait a minute."""

    engines: list[Engine]
    timeout: float
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    async def run(self) -> None:
        try:
            await start_engines(self.engines, self.timeout)
        except PosttrainError as exc:
            self.error = str(exc)
            raise
        except asyncio.CancelledError:
            self.error = "the front door stopped before its engines were ready"
            raise
        finally:
            self.done.set()

    def wait(self) -> float:
        """Block until every engine answers; the seconds since they started. Raises
        PosttrainError if one did not start (the front door's engines are then stopped)."""
        self.done.wait()
        if self.error is not None:
            raise PosttrainError(self.error)
        return time.monotonic() - self.started


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
    upstreams: list[Upstream] = field(default_factory=list)
    warmup: Warmup | None = field(default=None, repr=False)

    def wait_ready(self) -> float:
        """Block until the engines answer (at once if they did when this was made); the seconds
        they took. Raises PosttrainError if one failed to start."""
        return self.warmup.wait() if self.warmup is not None else 0.0

    def engine(self, model: str, replica: int | None = None) -> Engine:
        return next(e for e in self.engines if model in e.models and e.replica in (replica, None))

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


def check_exposure(host: str, api_keys: list[str], insecure_no_auth: bool) -> None:
    """Beyond loopback, a front door without a key serves (and harvests) anyone who can reach it."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not (loopback or api_keys or insecure_no_auth):
        raise PosttrainError(f"refusing to listen on {host} without an API key: pass --api-key KEY or set "
                             f"POSTTRAIN_API_KEY (--insecure-no-auth serves everyone who can reach it)")


def _engines(registry: Registry, models: list[str], replicas: int | dict[str, int], engine_args: list[str],
             max_model_len: int, dtype: str | None) -> list[Engine]:
    """`replicas` engines for each base model (a number for all, or per served name).
    POSTTRAIN_ENGINE_ARGS adds vLLM arguments to every local engine, before `engine_args`
    (e.g. `--enforce-eager`: no torch.compile, an engine ready ~40 s sooner, slower decoding)."""
    try:
        engine_args = shlex.split(os.environ.get("POSTTRAIN_ENGINE_ARGS", "")) + engine_args
    except ValueError as exc:  # unbalanced quotes
        raise PosttrainError(f"POSTTRAIN_ENGINE_ARGS: {exc}") from None
    specs = plan(registry, list(dict.fromkeys(models))) if models else []
    per_model = replicas if isinstance(replicas, dict) else {}
    if unknown := set(per_model) - {name for spec in specs for name in [spec.base_name, *spec.exposed]}:
        raise PosttrainError(f"--replicas names {', '.join(sorted(unknown))}, which is not served here")
    engines = []
    for spec in specs:
        counts = [per_model[n] for n in [spec.base_name, *spec.exposed] if n in per_model]
        count = max(counts, default=replicas if isinstance(replicas, int) else 1)
        if count < 1:
            raise PosttrainError(f"--replicas for {spec.base_name} must be at least 1 (got {count})")
        engines += [Engine(spec, registry.settings.home / "logs", max_model_len=max_model_len, dtype=dtype,
                           replica=i if count > 1 else None, engine_args=engine_args) for i in range(count)]
    if engine_args and engines:
        check_engine_args(engines[0])
    if cpu_build():
        for index, engine in enumerate(engines):
            engine.cpu_env = cpu_env(engine, index, len(engines))
    return engines


async def _start_backends(engines: list[Engine], upstreams: list[Upstream], timeout: float, wait: bool) -> None:
    async with httpx.AsyncClient() as client:
        for upstream in upstreams:  # seconds, so a wrong upstream fails before the minute-long engine start
            await upstream.check(client)
    if wait:
        await start_engines(engines, timeout)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PosttrainError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _prepare(models: list[str], host: str, port: int, api_keys: list[str], log_requests: bool,
             registry: Registry | None, max_model_len: int, dtype: str | None, ready_timeout: float,
             replicas: int | dict[str, int] = 1, engine_args: list[str] = (), upstreams: list[Upstream] = (),
             insecure_no_auth: bool = False, thinking: dict[str, bool] | None = None,
             max_thinking_tokens: dict[str, int] | None = None, wait: bool = True) -> FrontDoor:
    """Check everything, start the backends (blocking until they answer, or, unless `wait`,
    once the server runs), bind the port, build the server; on any failure nothing is left running."""
    import uvicorn

    if not models and not upstreams:
        raise PosttrainError("no models to serve")
    check_exposure(host, api_keys, insecure_no_auth)
    registry = registry or Registry()
    engines = _engines(registry, models, replicas, list(engine_args), max_model_len, dtype)
    names = [m for e in engines for m in e.models if e.replica in (None, 0)]
    if clash := set(names) & {u.name for u in upstreams}:
        raise PosttrainError(f"{', '.join(sorted(clash))} is both a local model and an --upstream name")
    served_thinking = _policies(engines, thinking, max_thinking_tokens)
    sock = _bind(host, port)  # before the slow engine start, so a taken port fails in a second
    try:
        asyncio.run(_start_backends(engines, list(upstreams), ready_timeout, wait))
    except BaseException:
        sock.close()
        raise
    warmup = None if wait else Warmup(engines, ready_timeout)
    app = create_app(engines, api_keys, harvest=registry.store if log_requests else None,
                     ready_timeout=ready_timeout, upstreams=list(upstreams), thinking=served_thinking, warmup=warmup)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return FrontDoor(base_url=f"http://{shown}:{sock.getsockname()[1]}/v1", api_key=api_keys[0] if api_keys else None,
                     models=list(dict.fromkeys([*names, *(u.name for u in upstreams)])), engines=engines,
                     server=server, sock=sock, upstreams=list(upstreams), warmup=warmup)


def start_front_door(models: list[str], port: int = 0, host: str = "127.0.0.1", api_keys: list[str] = (),
                     log_requests: bool = False, registry: Registry | None = None, max_model_len: int = 2048,
                     dtype: str | None = None, ready_timeout: float = 900, wait: bool = True,
                     **backends: Any) -> FrontDoor:
    """Serve `models` from a background thread and return once requests can be answered, or,
    with `wait=False`, once the door is open while the engines start behind it (`.wait_ready()`).
    port=0 picks a free port (see `.base_url`). `backends`: `replicas`, `engine_args`,
    `upstreams`, `insecure_no_auth`, `thinking`, `max_thinking_tokens`, as for `serve`."""
    door = _prepare(models, host, port, list(api_keys), log_requests, registry, max_model_len, dtype, ready_timeout,
                    wait=wait, **backends)
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
          dtype: str | None = None, replicas: int | dict[str, int] = 1, engine_args: list[str] = (),
          upstreams: list[Upstream] = (), insecure_no_auth: bool = False, thinking: dict[str, bool] | None = None,
          max_thinking_tokens: dict[str, int] | None = None) -> None:
    """Serve `models` (local vLLM engines, `replicas` per base model, started with the extra
    vLLM `engine_args`) and `upstreams` (remote servers) until Ctrl-C or SIGTERM; the engines
    stop with the front door. API keys are `api_keys` plus those in POSTTRAIN_API_KEY; beyond
    loopback one is required unless `insecure_no_auth`. `thinking` sets a thinking model's mode
    when a request names none (True: on), `max_thinking_tokens` its default thinking budget."""
    keys = list(dict.fromkeys([*api_keys, *api_keys_from_env()]))
    stop_on_sigterm()
    door = _prepare(models, host, port, keys, log_requests, registry, max_model_len, dtype, 900, replicas=replicas,
                    engine_args=engine_args, upstreams=upstreams, insecure_no_auth=insecure_no_auth, thinking=thinking,
                    max_thinking_tokens=max_thinking_tokens)
    try:
        logs = f"; engine logs in {door.engines[0].log_path.parent}" if door.engines else ""
        print(f"posttrain: serving {', '.join(door.models)} at {door.base_url}"
              f" ({'API key required' if keys else 'no API key'}{logs}; Ctrl-C stops)", flush=True)
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
