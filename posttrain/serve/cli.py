"""`posttrain serve`: registered checkpoints (and remote engines) behind one OpenAI-compatible
front door."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from posttrain.errors import PosttrainError

app = typer.Typer(help="Serve registered models behind one OpenAI-compatible API (vLLM engines).")


def _replicas(values: list[str]) -> int | dict[str, int] | None:
    """`--replicas 2` for every base model, or `--replicas NAME=2` (repeatable) per model."""
    if not values:
        return None
    if len(values) == 1 and values[0].strip().isdigit():
        return int(values[0])
    per_model = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or not count.strip().isdigit():
            raise PosttrainError(f"--replicas {value!r}: expected a number or NAME=NUMBER")
        per_model[name.strip()] = int(count)
    return per_model


def _engine_options(values: list[str]) -> dict[str, str]:
    options = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name.strip():
            raise PosttrainError(f"--engine-arg {value!r}: expected NAME=VALUE (e.g. tensor-parallel-size=2)")
        options[name.strip()] = {"true": True, "false": False}.get(setting.lower(), setting)
    return options


def _per_model(option: str, values: list[str], parse, expected: str) -> dict:
    """`NAME=VALUE` options (repeatable) as {NAME: parse(VALUE)}."""
    out = {}
    for value in values:
        name, sep, setting = value.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = parse(setting.strip().lower())
        except (ValueError, KeyError):
            raise PosttrainError(f"{option} {value!r}: expected NAME={expected}") from None
    return out


def _tokens(value: str) -> int:
    if not value.isdigit():
        raise ValueError
    return int(value)


@app.callback(invoke_without_command=True)
def serve(
    models: Optional[str] = typer.Option(
        None, "--models", "-m",
        help="Comma-separated registered names. Adapters share their base model's engine. "
        "Default: the default model (smollm2-135m-instruct), provisioned if needed."),
    recipe: Optional[Path] = typer.Option(
        None, "--recipe", help="A serve recipe (YAML, see recipes/serve.yaml); the flags below override it."),
    upstream: Optional[List[str]] = typer.Option(
        None, "--upstream", help="NAME=URL[,key=env:VAR][,model=REMOTE]: route NAME to an OpenAI-compatible "
        "server already running elsewhere (vLLM on another host, SGLang, ...); repeat a NAME for fail-over."),
    replicas: Optional[List[str]] = typer.Option(
        None, "--replicas", help="Engines per base model: N for all, or NAME=N per model (repeatable). Requests "
        "go to the replica with the fewest in flight; one that dies costs only its requests in flight."),
    engine_arg: Optional[List[str]] = typer.Option(
        None, "--engine-arg", help="Any vLLM engine argument as NAME=VALUE (tensor-parallel-size=2, "
        "gpu-memory-utilization=0.8, enable-prefix-caching=true), checked by vLLM's parser before start."),
    port: Optional[int] = typer.Option(None, help="Front door port (default 8000).", envvar="POSTTRAIN_PORT"),
    host: Optional[str] = typer.Option(
        None, help="Front door address (default 127.0.0.1); beyond loopback an API key is required.",
        envvar="POSTTRAIN_HOST"),
    api_key: Optional[List[str]] = typer.Option(
        None, "--api-key", help="Require this key (`Authorization: Bearer KEY`); repeat for several. "
        "Keys in POSTTRAIN_API_KEY (comma-separated) are accepted too."),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Listen beyond loopback without an API key (everyone who can reach it "
        "may use the models)."),
    log_requests: bool = typer.Option(
        False, "--log-requests", help="Harvest prompts, completions, latency and token counts into the "
        "store's request_logs table (never API keys)."),
    max_model_len: Optional[int] = typer.Option(None, help="Context length per engine (default 2048)."),
    dtype: Optional[str] = typer.Option(
        None, help="Engine dtype; default with the CPU build: bfloat16 where the CPU has it in hardware (AMX, "
             "AVX512-BF16) or the checkpoint is quantized, else float32 (exact answers); auto on GPUs."),
    thinking: Optional[List[str]] = typer.Option(
        None, "--thinking", help="NAME=on|off: a thinking model's mode when a request names none (repeatable); "
        "requests switch it with chat_template_kwargs.enable_thinking or /think, /no_think."),
    max_thinking_tokens: Optional[List[str]] = typer.Option(
        None, "--max-thinking-tokens", help="NAME=TOKENS: a thinking model's default thinking budget (repeatable); "
        "the trace is closed there and the model answers. Requests set their own with max_thinking_tokens."),
):
    """Start vLLM engines for the models (and connect the upstreams) behind the front door;
    Ctrl-C stops everything."""
    from posttrain.models import DEFAULT_MODEL, pull_default
    from posttrain.registry import Registry
    from posttrain.serve.app import api_keys_from_env, check_exposure
    from posttrain.serve.app import serve as run
    from posttrain.serve.engine import engine_args
    from posttrain.serve.recipe import ServeRecipe
    from posttrain.serve.upstream import parse_upstream

    given = {"models": [m.strip() for m in models.split(",") if m.strip()] if models is not None else None,
             "replicas": _replicas(replicas or []), "port": port, "host": host, "max_model_len": max_model_len,
             "dtype": dtype, "log_requests": log_requests or None, "insecure_no_auth": insecure_no_auth or None}
    config = ServeRecipe.load(recipe, values={k: v for k, v in given.items() if v is not None})
    if models is not None and not config.models:
        raise typer.BadParameter(f"no model names given (e.g. --models {DEFAULT_MODEL})", param_hint="--models")
    upstreams = [spec.upstream() for spec in config.upstreams] + [parse_upstream(u) for u in upstream or []]
    check_exposure(config.host, [*(api_key or []), *api_keys_from_env()], config.insecure_no_auth)
    registry = Registry()
    names = config.models or ([] if upstreams else [pull_default(registry).name])
    extra_args = config.vllm_args() + engine_args(_engine_options(engine_arg or []))
    modes = config.thinking | _per_model("--thinking", thinking or [], {"on": True, "off": False}.__getitem__,
                                        "on|off")
    budgets = config.max_thinking_tokens | _per_model("--max-thinking-tokens", max_thinking_tokens or [], _tokens,
                                                     "TOKENS")
    run(names, port=config.port, host=config.host, api_keys=api_key or [], log_requests=config.log_requests,
        registry=registry, max_model_len=config.max_model_len, dtype=config.dtype, replicas=config.replicas,
        engine_args=extra_args, upstreams=upstreams, insecure_no_auth=config.insecure_no_auth, thinking=modes,
        max_thinking_tokens=budgets)

