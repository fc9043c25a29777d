"""`posttrain arena` (the Gradio arena, its leaderboard, DPO export) and `posttrain votes`."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="The arena: people chat with two anonymous models and vote; votes become "
                  "ratings and DPO data. Without a verb, serves the arena.")
votes_app = typer.Typer(help="Arena and judge votes in the store.", no_args_is_help=True)

DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]
SOURCE_HELP = ("arena (anonymous battles), side-by-side, judge (any MT-Bench judge) or judge:MODEL, "
               "human (arena + side-by-side), all.")
MIN_BATTLES_HELP = ("Models with fewer battles are provisional on the leaderboard: not ranked, listed last "
                    "(their interval is too wide to place them).")
THINKING_HELP = ("Only battles whose two sides ran with thinking on or off (battles voted before the arena "
                 "recorded modes are in neither). Default: all.")
MODE_MISMATCH_HELP = ("Leave out pairs where one side thought (a reasoning trace) and the other did not. "
                      "By default they are kept, flagged (meta.mode_mismatch) and counted in the summary.")


@app.callback(invoke_without_command=True)
def arena(
    ctx: typer.Context,
    port: int = typer.Option(7860, help="Port of the web app."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for everyone)."),
    base_url: str = typer.Option("http://127.0.0.1:8000/v1", envvar="POSTTRAIN_BASE_URL",
                                 help="Any OpenAI-compatible API; default: `posttrain serve`'s front door."),
    api_key: Optional[str] = typer.Option(None, envvar="POSTTRAIN_ARENA_API_KEY",
                                          help="Key for that API (Authorization: Bearer)."),
    models: Optional[str] = typer.Option(None, help="Comma-separated served models to pit (default: all)."),
    max_tokens: int = typer.Option(512, min=1, help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.7, min=0, help="Sampling temperature of both models."),
    max_prompt_chars: int = typer.Option(4000, min=1, help="Longest prompt accepted."),
    prompts_per_minute: int = typer.Option(10, min=1, help="Rate limit per browser session (both tabs, "
                                           "regenerations included)."),
    moderation: Optional[str] = typer.Option(
        None, help="module:function called with each prompt; a returned string refuses it with that reason."),
    min_battles: int = typer.Option(10, min=0, help=MIN_BATTLES_HELP),
    thinking: str = typer.Option("off", help="The mode a battle starts in (the page's toggle): on, both models "
                                 "think (only models that think are paired), or off."),
    extra_body: Optional[str] = typer.Option(None, help="JSON object of fields added to every chat request "
                                             "(e.g. vLLM's top_k or structured_outputs)."),
):
    """Serve the arena (battle, side-by-side and leaderboard tabs) until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home
    from posttrain.ui.arena import ArenaConfig, serve_arena

    config = ArenaConfig(base_url=base_url, api_key=api_key, max_tokens=max_tokens, temperature=temperature,
                         models=[m.strip() for m in (models or "").split(",") if m.strip()],
                         max_prompt_chars=max_prompt_chars, prompts_per_minute=prompts_per_minute,
                         moderation=moderation, min_battles=min_battles, thinking=_mode(thinking) or False,
                         extra_body=_json_object("--extra-body", extra_body))
    serve_arena(config, host=host, port=port)


@app.command("leaderboard")
def leaderboard(
    source: str = typer.Option("arena", help="Which votes: " + SOURCE_HELP),
    k: float = typer.Option(4.0, help="Online Elo K factor."),
    rounds: int = typer.Option(100, help="Bootstrap rounds for the 95% interval."),
    bothbad: str = typer.Option("tie", help="'both are bad' votes: tie (half a win each) or drop."),
    min_battles: int = typer.Option(10, min=0, help=MIN_BATTLES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (rank is null for provisional "
                                 "models; bt_lo and bt_hi bound the 95% interval)."),
    plots: Optional[Path] = typer.Option(None, help="Also write win_rate.png and battles.png to this folder."),
    thinking: Optional[str] = typer.Option(None, help=THINKING_HELP + " on|off"),
):
    """Ratings: Bradley-Terry (Elo scale, mean 1000) with bootstrap 95% intervals, and online Elo.
    A model's rank is 1 + the number of models whose whole interval lies above its own, so models
    whose intervals overlap share a rank."""
    from rich.console import Console
    from rich.table import Column, Table

    from posttrain.registry import Registry
    from posttrain.ui.ratings import board_notes, plots as figures, readable, stored_leaderboard

    mode = _mode(thinking)
    table, counts = stored_leaderboard(Registry().store, source=source, k=k, rounds=rounds, bothbad=bothbad,
                                       min_battles=min_battles, thinking=mode)
    votes = f"{source} votes" + ("" if mode is None else f" with thinking {thinking}")
    if plots is not None and not table.empty:
        plots.mkdir(parents=True, exist_ok=True)
        for stem, figure in figures(counts, list(table["model"]), bothbad).items():
            figure.savefig(plots / f"{stem}.png", dpi=120)
    if as_json:
        typer.echo(table.to_json(orient="records", indent=2))
        return
    if table.empty:
        typer.echo(f"no {votes} yet")
        return
    shown = readable(table)
    columns = [Column(name, justify="left" if name == "Model" else "right") for name in shown.columns]
    out = Table(*columns, title=f"{counts['n'].sum()} {votes}",
                caption="\n".join(board_notes(table, min_battles)), caption_justify="left")
    for row in shown.itertuples(index=False):
        out.add_row(*map(str, row))
    Console(width=200).print(out)
    if plots is not None:
        typer.echo(f"plots: {plots / 'win_rate.png'}, {plots / 'battles.png'}")


def _mode(thinking: str | None) -> bool | None:
    """`--thinking on|off` as a mode (None: not given); another word is a usage error."""
    from posttrain.ui.votes import MODE_FILTERS

    if thinking is not None and thinking not in MODE_FILTERS:
        raise typer.BadParameter(f"{thinking!r}: expected on or off", param_hint="--thinking")
    return None if thinking is None else MODE_FILTERS[thinking]


def _json_object(flag: str, text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=flag) from None
    if not isinstance(value, dict):
        raise typer.BadParameter("expected a JSON object", param_hint=flag)
    return value


def export(
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL (written atomically)."),
    fmt: str = typer.Option("dpo", "--format", help="dpo: TRL preference pairs (what `posttrain train dpo` "
                            "reads); battles: every battle as stored."),
    source: str = typer.Option("human", help="Which votes: " + SOURCE_HELP),
    since: Optional[datetime] = typer.Option(None, formats=DATE_FORMATS, help="Votes cast at or after (UTC)."),
    until: Optional[datetime] = typer.Option(None, formats=DATE_FORMATS, help="Votes cast before (UTC)."),
    model: Optional[List[str]] = typer.Option(None, help="Only battles this model took part in (repeatable)."),
    min_length: int = typer.Option(1, help="Drop pairs where a reply has fewer characters."),
    ties_out: Optional[Path] = typer.Option(None, help="Write ties and both-bad votes here (default: excluded)."),
    drop_mode_mismatch: bool = typer.Option(False, "--drop-mode-mismatch", help=MODE_MISMATCH_HELP),
):
    """Export votes: winner's reply = chosen, loser's = rejected, the conversation so far = prompt.
    Ties, both-bad, empty replies and exact duplicates are left out; prints what was kept and dropped."""
    from posttrain.registry import Registry
    from posttrain.ui.export import export_votes

    summary = export_votes(Registry().store, out, fmt, source=source, since=since, until=until,
                           models=model or [], min_length=min_length, ties_out=ties_out,
                           drop_mode_mismatch=drop_mode_mismatch)
    typer.echo(str(summary))


@app.command("import")
def import_votes(
    file: Path = typer.Argument(..., help="JSON array, JSON lines or Parquet file of votes."),
    fmt: str = typer.Option("fastchat", "--format", help="fastchat: Chatbot Arena battles (clean_battle records: "
                            "model_a, model_b, winner, conversation_a/b, tstamp), stored as source fastchat, and "
                            "MT-Bench human judgments (question_id, turn, judge), stored as source mt-bench-human."),
):
    """Import public human votes as battles (idempotent: a battle already there is not added again).
    A malformed record stops the import before anything is written: `file:record: what is wrong`."""
    from posttrain.registry import Registry
    from posttrain.ui.imports import import_battles

    typer.echo(str(import_battles(Registry().store, file, fmt)))


app.command("export")(export)
votes_app.command("export")(export)
