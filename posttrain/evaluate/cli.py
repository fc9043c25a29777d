"""`posttrain eval` (bench, mt-bench, tasks) and `posttrain report nightly`: thin shells over
`run_bench`, `run_mt_bench` and `nightly`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

eval_app = typer.Typer(help="Evaluate registered checkpoints: lm-eval benchmarks and MT-Bench; scores go to "
                       "the registry (`posttrain models show NAME`).", no_args_is_help=True)
report_app = typer.Typer(help="Reports on the stored evaluation history.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 200)

BASE_URL_HELP = ("OpenAI-compatible API serving the model, e.g. http://127.0.0.1:8000/v1 (`posttrain serve`). "
                 "Default: POSTTRAIN_BASE_URL.")
API_KEY_HELP = "Key for that API (Authorization: Bearer). Default: the first key in POSTTRAIN_API_KEY."


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _first(key: str | None) -> str | None:
    return (_names(key) or [None])[0]


def _print_scores(scores, as_json: bool, header: str) -> None:
    if as_json:
        typer.echo(json.dumps([{"task": s.task, "metric": s.metric, "value": s.value, "stderr": s.stderr, "n": s.n}
                               for s in scores], indent=2))
        return
    table = Table("task", "metric", "value", "stderr", "n", title=header)
    for s in scores:
        table.add_row(s.task, s.metric, f"{s.value:.4f}", "-" if s.stderr is None else f"{s.stderr:.4f}", str(s.n or "-"))
    console.print(table)


@eval_app.command("bench")
def bench(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name (`posttrain models list`)."),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", "-t", help="Comma-separated lm-eval tasks or groups (e.g. mmlu,gsm8k,hellaswag). Default: "
        "our offline pack posttrain_offline (multiple choice, arithmetic, instruction following)."),
    base_url: Optional[str] = typer.Option(None, envvar="POSTTRAIN_BASE_URL", help=BASE_URL_HELP + " Without "
                                           "one, the model is loaded in-process (lm-eval's hf backend)."),
    api_key: Optional[str] = typer.Option(None, envvar="POSTTRAIN_API_KEY", help=API_KEY_HELP),
    backend: str = typer.Option("auto", help="auto (api with a base URL, else hf), api, hf (transformers "
                                "in-process, adapters via peft) or vllm (in-process)."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most this many samples per task (smoke runs)."),
    num_fewshot: Optional[int] = typer.Option(None, min=0, help="Override the tasks' few-shot count."),
    max_gen_toks: Optional[int] = typer.Option(None, min=1, help="Cap on generated tokens for generation tasks."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="In-process batch size (default 8)."),
    concurrency: int = typer.Option(8, min=1, help="Requests in flight through the API."),
    data_dir: Optional[Path] = typer.Option(
        None, help="Local copies of standard tasks' datasets: DIR/<task or dataset name>/ with <split>.jsonl "
        "(or parquet, csv) files or a dataset repo snapshot. Nothing downloads unless HF_HUB_OFFLINE=0 and "
        "HF_DATASETS_OFFLINE=0 are exported."),
    device: Optional[str] = typer.Option(None, help="In-process device (default cuda if available, else cpu)."),
    dtype: Optional[str] = typer.Option(None, help="In-process dtype (default float32 on CPU, auto on GPU)."),
    suite: str = typer.Option("bench", help="Label the nightly report compares runs by."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
):
    """Run lm-eval tasks on a registered model and store every score (with stderr and n)."""
    from posttrain.evaluate.bench import run_bench

    result = run_bench(model, _names(tasks) or None, base_url=base_url, api_key=_first(api_key), backend=backend,
                       limit=limit, num_fewshot=num_fewshot, max_gen_toks=max_gen_toks, batch_size=batch_size,
                       concurrency=concurrency, data_dir=data_dir, device=device, dtype=dtype, suite=suite)
    _print_scores(result.scores, as_json, f"{model}: eval run #{result.run.id} ({result.run.config['backend']})")
    typer.echo(f"per-sample logs: {result.samples_path}", err=True)


@eval_app.command("mt-bench")
def mt_bench(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name, served at --base-url."),
    judge: str = typer.Option(..., "--judge", "--judge-model", help="Judge model name at --judge-base-url "
                              "(e.g. gpt-4o, or one of our own served models)."),
    base_url: Optional[str] = typer.Option(None, envvar="POSTTRAIN_BASE_URL", help=BASE_URL_HELP),
    api_key: Optional[str] = typer.Option(None, envvar="POSTTRAIN_API_KEY", help=API_KEY_HELP),
    judge_base_url: Optional[str] = typer.Option(None, envvar="POSTTRAIN_JUDGE_BASE_URL",
                                                 help="OpenAI-compatible API of the judge (default: --base-url)."),
    judge_api_key: Optional[str] = typer.Option(
        None, envvar="POSTTRAIN_JUDGE_API_KEY", help="Judge's key. Default: --api-key when the judge is behind "
        "--base-url, else OPENAI_API_KEY."),
    mode: str = typer.Option("single", help="single (1-10 ratings) or pairwise (against --baseline, both orders)."),
    baseline: Optional[str] = typer.Option(None, help="Registered, served model to compare with (pairwise)."),
    question_file: Optional[Path] = typer.Option(
        None, help="MT-Bench question JSONL (question_id, category, turns, reference); default: ours, 10 "
        "questions. FastChat's official question.jsonl works as is."),
    judge_prompts: Optional[Path] = typer.Option(None, help="Judge prompts in FastChat's judge_prompts.jsonl "
                                                 "format; default: ours."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N questions."),
    max_tokens: int = typer.Option(1024, min=1, help="Longest answer per turn, in tokens."),
    judge_max_tokens: int = typer.Option(2048, min=1, help="Longest judgment, in tokens."),
    parallel: int = typer.Option(8, min=1, help="Requests in flight at once."),
    cache_dir: Optional[Path] = typer.Option(None, help="Answer/judgment cache (default "
                                             "$POSTTRAIN_HOME/evals/mt_bench_cache); re-runs resume from it."),
    suite: str = typer.Option("mt-bench", help="Label the nightly report compares runs by."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
):
    """MT-Bench on a served model, graded by an LLM judge; answers and verdicts are cached."""
    from posttrain.errors import PosttrainError
    from posttrain.evaluate.mt_bench import run_mt_bench

    if not base_url:
        raise PosttrainError("mt-bench asks the model through its API: pass --base-url (or set POSTTRAIN_BASE_URL), "
                             "e.g. after `posttrain serve --models NAME`")
    result = run_mt_bench(model, judge_model=judge, base_url=base_url, judge_base_url=judge_base_url, api_key=_first(api_key),
                          judge_api_key=judge_api_key, mode=mode, baseline=baseline, question_file=question_file,
                          judge_prompts=judge_prompts, limit=limit, max_tokens=max_tokens,
                          judge_max_tokens=judge_max_tokens, parallel=parallel, cache_dir=cache_dir, suite=suite)
    _print_scores(result.scores, as_json, f"{model}: MT-Bench ({mode}) run #{result.run.id}, judge {judge}")
    typer.echo(f"{result.judgments} verdicts: {result.unparsable} unparsable, {result.errors} errors; "
               f"{result.requests_sent} requests sent (the rest from the cache); records: {result.samples_path}",
               err=True)
    if mode == "pairwise":
        typer.echo(f"{result.battles} new verdicts in the battles table (source {result.run.config['battle_source']}; "
                   f"`posttrain arena leaderboard --source judge`)", err=True)


@eval_app.command("tasks")
def tasks(all_tasks: bool = typer.Option(False, "--all", help="Also list lm-eval's own tasks, groups and tags.")):
    """List the task names `posttrain eval bench --tasks` accepts."""
    from posttrain.evaluate.bench import known_tasks

    for name in known_tasks(standard=all_tasks):
        typer.echo(name)


@report_app.command("nightly")
def nightly(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Nightly recipe (YAML), e.g. "
                                          "recipes/nightly.yaml. Default: our offline pack, in-process."),
    models: Optional[str] = typer.Option(None, help="Comma-separated models to evaluate/report (overrides the "
                                         "config). Default: every registered model (with --no-run: every model "
                                         "with stored scores)."),
    baseline: Optional[str] = typer.Option(None, help="Pinned baseline model every score is also compared with."),
    threshold: Optional[float] = typer.Option(None, help="Flag drops beyond this many standard errors (default 2)."),
    base_url: Optional[str] = typer.Option(None, envvar="POSTTRAIN_BASE_URL", help="API serving the models: "
                                           "benchmarks go through it, MT-Bench needs it. Default: in-process."),
    out: Optional[Path] = typer.Option(None, help="HTML report path (default $POSTTRAIN_HOME/reports/"
                                       "nightly-DATE.html)."),
    markdown: Optional[Path] = typer.Option(None, help="Write the Markdown summary here instead of stdout."),
    no_run: bool = typer.Option(False, "--no-run", help="Evaluate nothing; report the stored runs."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key, e.g. --set "
                                             "absolute_threshold=0.05 (repeatable)."),
):
    """Run the nightly suites, compare with the previous run and the baseline, write HTML + Markdown.
    Exits 1 when a score regressed or an evaluation failed, so cron/CI can alert."""
    from posttrain.files import write_atomically
    from posttrain.evaluate.report import NightlyConfig
    from posttrain.evaluate.report import nightly as run_nightly

    overrides = list(set_ or [])
    if models is not None:
        overrides.append(f"models={json.dumps(_names(models))}")
    for key, value in (("baseline", baseline), ("threshold", threshold), ("base_url", base_url)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    report = run_nightly(NightlyConfig.load(config, overrides), run=not no_run, out=out)
    if markdown:
        write_atomically(markdown, report.markdown)
    else:
        typer.echo(report.markdown)
    typer.echo(f"wrote {report.html_path}", err=True)
    if not report.ok:
        problems = [f"regression: {r}" for r in report.regressions] + [f"failed: {f}" for f in report.failures]
        typer.echo("posttrain: " + "\n           ".join(problems), err=True)
        raise typer.Exit(code=1)
