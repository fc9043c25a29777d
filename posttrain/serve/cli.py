"""`posttrain serve`: registered checkpoints behind one OpenAI-compatible front door."""

from __future__ import annotations

from typing import List, Optional

import typer

app = typer.Typer(help="Serve registered models behind one OpenAI-compatible API (vLLM engines).")


@app.callback(invoke_without_command=True)
def serve(
    models: Optional[str] = typer.Option(
        None, "--models", "-m",
        help="Comma-separated registered names. Adapters share their base model's engine. "
        "Default: the default model (smollm2-135m-instruct), provisioned if needed."),
    port: int = typer.Option(8000, help="Front door port.", envvar="POSTTRAIN_PORT"),
    host: str = typer.Option("127.0.0.1", help="Front door address (0.0.0.0 to listen on all).",
                             envvar="POSTTRAIN_HOST"),
    api_key: Optional[List[str]] = typer.Option(
        None, "--api-key", help="Require this key (`Authorization: Bearer KEY`); repeat for several. "
        "Keys in POSTTRAIN_API_KEY (comma-separated) are accepted too."),
    log_requests: bool = typer.Option(
        False, "--log-requests", help="Harvest prompts, completions, latency and token counts into the "
        "store's request_logs table (never API keys)."),
    max_model_len: int = typer.Option(2048, help="Context length per engine (prompt + completion)."),
    dtype: Optional[str] = typer.Option(
        None, help="Engine dtype; default float32 with the CPU build (exact answers; bfloat16 for quantized "
             "checkpoints), auto on GPUs."),
):
    """Start one vLLM engine per base model and the front door; Ctrl-C stops everything."""
    from posttrain.models import DEFAULT_MODEL, pull_default
    from posttrain.registry import Registry
    from posttrain.serve.app import serve as run

    registry = Registry()
    if models is None:
        names = [pull_default(registry).name]
    else:
        names = [m.strip() for m in models.split(",") if m.strip()]
        if not names:
            raise typer.BadParameter(f"no model names given (e.g. --models {DEFAULT_MODEL})", param_hint="--models")
    run(names, port=port, host=host, api_keys=api_key or [], log_requests=log_requests, registry=registry,
        max_model_len=max_model_len, dtype=dtype)
