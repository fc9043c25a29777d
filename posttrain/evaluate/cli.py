"""`posttrain eval` (bench, mt-bench, judge-agreement, tasks) and `posttrain report nightly`: thin
shells over `run_bench`, `run_mt_bench`, `run_judge_agreement` and `nightly`."""

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
JUDGE_KEY_HELP = ("Judge's key. Default: --api-key when the judge is behind --base-url, else OPENAI_API_KEY.")
THINKING_HELP = ("A thinking model's modes: on, off or both (each stored as TASK@think / TASK@no_think, with the "
                 "tokens spent per sample). Default: the model's served default, under the plain task names.")
CONSTRAIN_HELP = ("Force verdicts into the prompts' format where the judge's endpoint supports it (vLLM's "
                  "structured outputs); --free-verdicts parses free text everywhere.")


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
    _print_modes(scores)


def _print_modes(scores) -> None:
    """Headline scores measured in thinking modes, thinking and not side by side with the tokens
    spent (MT-Bench's per-turn and per-category breakdowns stay in the table above)."""
    from posttrain.evaluate.modes import SIDE_BY_SIDE_HEADER, side_by_side, side_by_side_cells
    from posttrain.evaluate.render import BREAKDOWN

    entries = [e for e in side_by_side({"model": "", "suite": "", "task": s.task, "metric": s.metric, "value": s.value,
                                        "stderr": s.stderr} for s in scores) if not BREAKDOWN.match(e["metric"])]
    if not entries:
        return
    table = Table(*SIDE_BY_SIDE_HEADER, title="thinking vs not (tokens: mean per sample)")
    for entry in entries:
        table.add_row(*side_by_side_cells(entry))
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
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch size in-process; through the API, prompts "
                                             "per request (default 8)."),
    concurrency: int = typer.Option(8, min=1, help="Requests in flight through the API."),
    data_dir: Optional[Path] = typer.Option(
        None, help="Local copies of standard tasks' datasets: DIR/<task or dataset name>/ with <split>.jsonl "
        "(or parquet, csv) files or a dataset repo snapshot. Nothing downloads unless HF_HUB_OFFLINE=0 and "
        "HF_DATASETS_OFFLINE=0 are exported."),
    device: Optional[str] = typer.Option(None, help="In-process device (default cuda if available, else cpu)."),
    dtype: Optional[str] = typer.Option(None, help="In-process dtype (default float32 on CPU, auto on GPU)."),
    suite: str = typer.Option("bench", help="Label the nightly report compares runs by."),
    thinking: Optional[str] = typer.Option(None, help=THINKING_HELP + " Through --base-url only; generation "
                                           "tasks then go through the chat template, scored on the answer after "
                                           "the trace."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
):
    """Run lm-eval tasks on a registered model and store every score (with stderr and n)."""
    from posttrain.evaluate.bench import run_bench

    result = run_bench(model, _names(tasks) or None, base_url=base_url, api_key=_first(api_key), backend=backend,
                       limit=limit, num_fewshot=num_fewshot, max_gen_toks=max_gen_toks, batch_size=batch_size,
                       concurrency=concurrency, data_dir=data_dir, device=device, dtype=dtype, suite=suite,
                       thinking=thinking)
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
    judge_api_key: Optional[str] = typer.Option(None, envvar="POSTTRAIN_JUDGE_API_KEY", help=JUDGE_KEY_HELP),
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
    constrain: bool = typer.Option(True, "--constrain-verdicts/--free-verdicts", help=CONSTRAIN_HELP),
    thinking: Optional[str] = typer.Option(None, help=THINKING_HELP + " The judge sees only the answer."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON."),
):
    """MT-Bench on a served model, graded by an LLM judge; answers and verdicts are cached. Scores
    named expected_* weigh each verdict by the judge's probabilities (where it returns them)."""
    from posttrain.errors import PosttrainError
    from posttrain.evaluate.mt_bench import run_mt_bench

    if not base_url:
        raise PosttrainError("mt-bench asks the model through its API: pass --base-url (or set POSTTRAIN_BASE_URL), "
                             "e.g. after `posttrain serve --models NAME`")
    result = run_mt_bench(model, judge_model=judge, base_url=base_url, judge_base_url=judge_base_url, api_key=_first(api_key),
                          judge_api_key=judge_api_key, mode=mode, baseline=baseline, question_file=question_file,
                          judge_prompts=judge_prompts, limit=limit, max_tokens=max_tokens,
                          judge_max_tokens=judge_max_tokens, parallel=parallel, cache_dir=cache_dir, suite=suite,
                          constrain=constrain, thinking=thinking)
    _print_scores(result.scores, as_json, f"{model}: MT-Bench ({mode}) run #{result.run.id}, judge {judge}")
    typer.echo(f"{result.judgments} verdicts ({result.run.config['verdict_format']}"
               f"{', with probabilities' if result.run.config['verdict_probabilities'] else ''}): "
               f"{result.unparsable} unparsable, {result.errors} errors; "
               f"{result.requests_sent} requests sent (the rest from the cache); records: {result.samples_path}",
               err=True)
    if mode == "pairwise":
        typer.echo(f"{result.battles} new verdicts in the battles table (source {result.run.config['battle_source']}; "
                   f"`posttrain arena leaderboard --source judge`)", err=True)


@eval_app.command("judge-agreement")
def judge_agreement(
    judge: str = typer.Option(..., "--judge", "--judge-model", help="Judge model name at --judge-base-url."),
    judge_base_url: Optional[str] = typer.Option(None, envvar="POSTTRAIN_JUDGE_BASE_URL", help="OpenAI-compatible "
                                                 "API of the judge (default: --base-url)."),
    judge_api_key: Optional[str] = typer.Option(None, envvar="POSTTRAIN_JUDGE_API_KEY", help=JUDGE_KEY_HELP),
    base_url: Optional[str] = typer.Option(None, envvar="POSTTRAIN_BASE_URL", help="Our own API (`posttrain serve`)."),
    api_key: Optional[str] = typer.Option(None, envvar="POSTTRAIN_API_KEY", help=API_KEY_HELP),
    source: str = typer.Option("human", help="Which votes: human (arena + side-by-side), arena, side-by-side, or "
                               "an imported source (fastchat, mt-bench-human)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N battles (in voting order)."),
    judge_prompts: Optional[Path] = typer.Option(None, help="Judge prompts in FastChat's format (pair-v2 and "
                                                 "pair-v2-multi-turn are used); default: ours."),
    judge_max_tokens: int = typer.Option(2048, min=16, help="Longest judgment, in tokens."),
    parallel: int = typer.Option(8, min=1, help="Requests in flight at once."),
    cache_dir: Optional[Path] = typer.Option(None, help="Judgment cache (default "
                                             "$POSTTRAIN_HOME/evals/judge_agreement_cache)."),
    rounds: int = typer.Option(1000, min=10, help="Bootstrap rounds for the 95% intervals."),
    constrain: bool = typer.Option(True, "--constrain-verdicts/--free-verdicts", help=CONSTRAIN_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
):
    """How often a judge agrees with stored human votes (the same battles, both orders): agreement
    with and without ties, Cohen's kappa, position bias, bootstrap 95% intervals. Stored per judge;
    the nightly report shows it next to the judge's scores."""
    from posttrain.errors import PosttrainError
    from posttrain.evaluate.judge_agreement import ANCHORS, run_judge_agreement

    if not (judge_base_url or base_url):
        raise PosttrainError("where is the judge? pass --judge-base-url (or --base-url for one of our served models)")
    result = run_judge_agreement(judge, judge_base_url=judge_base_url or base_url, judge_api_key=judge_api_key,
                                 base_url=base_url, api_key=_first(api_key), source=source, limit=limit,
                                 judge_prompts=judge_prompts, judge_max_tokens=judge_max_tokens, parallel=parallel,
                                 cache_dir=cache_dir, rounds=rounds, constrain=constrain)
    values = result.agreement.values
    if as_json:
        typer.echo(json.dumps({m: {"value": v[0], "low": v[1], "high": v[2], "n": v[3]} for m, v in values.items()},
                              indent=2))
    else:
        table = Table("metric", "value", "95% interval", "n",
                      title=f"judge {judge} vs {source} votes: run #{result.run.id}")
        for metric, (value, low, high, n) in values.items():
            table.add_row(metric, f"{value:.3f}", f"{low:.3f} - {high:.3f}", str(n))
        console.print(table)
        typer.echo(ANCHORS)
    skipped = "".join(f"; skipped {n} {reason}" for reason, n in result.skipped.items())
    typer.echo(f"{result.agreement.battles} battles decided ({result.run.config['verdict_format']} verdicts), "
               f"{result.unparsable} unparsable, {result.errors} errors{skipped}; {result.requests_sent} requests sent; "
               f"records: {result.samples_path}", err=True)
    if result.agreement.near_chance:
        typer.echo("posttrain: warning: this judge's agreement is indistinguishable from chance (a 95% interval "
                   "reaches it); its scores say little", err=True)


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
