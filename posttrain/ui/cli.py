"""`posttrain arena` (the Gradio arena, its leaderboard, DPO export) and `posttrain votes`."""

from __future__ import annotations

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
):
    """Serve the arena (battle, side-by-side and leaderboard tabs) until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home
    from posttrain.ui.arena import ArenaConfig, serve_arena

    config = ArenaConfig(base_url=base_url, api_key=api_key, max_tokens=max_tokens, temperature=temperature,
                         models=[m.strip() for m in (models or "").split(",") if m.strip()],
                         max_prompt_chars=max_prompt_chars, prompts_per_minute=prompts_per_minute,
                         moderation=moderation)
    serve_arena(config, host=host, port=port)


@app.command("leaderboard")
def leaderboard(
    source: str = typer.Option("arena", help="Which votes: " + SOURCE_HELP),
    k: float = typer.Option(4.0, help="Online Elo K factor."),
    rounds: int = typer.Option(100, help="Bootstrap rounds for the 95% interval."),
    bothbad: str = typer.Option("tie", help="'both are bad' votes: tie (half a win each) or drop."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    plots: Optional[Path] = typer.Option(None, help="Also write win_rate.png and battles.png to this folder."),
):
    """Ratings: online Elo and Bradley-Terry (Elo scale, mean 1000) with bootstrap 95% intervals."""
    from rich.console import Console
    from rich.table import Table

    from posttrain.registry import Registry
    from posttrain.ui.ratings import leaderboard as rate, plots as figures
    from posttrain.ui.votes import load_battles

    battles = load_battles(Registry().store, source=source)
    table = rate(battles, k=k, rounds=rounds, bothbad=bothbad)
    if plots is not None and not table.empty:
        plots.mkdir(parents=True, exist_ok=True)
        for stem, figure in figures(battles, list(table["model"]), bothbad).items():
            figure.savefig(plots / f"{stem}.png", dpi=120)
    if as_json:
        typer.echo(table.to_json(orient="records", indent=2))
        return
    if table.empty:
        typer.echo(f"no {source} votes yet")
        return
    out = Table("#", "model", "BT", "95% CI", "Elo", "battles", title=f"{len(battles)} {source} votes")
    for rank, row in enumerate(table.itertuples(), 1):
        out.add_row(str(rank), row.model, f"{row.bt:.0f}", f"{row.bt_lo:.0f} - {row.bt_hi:.0f}",
                    f"{row.elo:.0f}", str(row.battles))
    Console(width=200).print(out)
    if plots is not None:
        typer.echo(f"plots: {plots / 'win_rate.png'}, {plots / 'battles.png'}")


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
):
    """Export votes: winner's reply = chosen, loser's = rejected, the conversation so far = prompt.
    Ties, both-bad, empty replies and exact duplicates are left out; prints what was kept and dropped."""
    from posttrain.registry import Registry
    from posttrain.ui.export import export_votes

    summary = export_votes(Registry().store, out, fmt, source=source, since=since, until=until,
                           models=model or [], min_length=min_length, ties_out=ties_out)
    typer.echo(str(summary))


app.command("export")(export)
votes_app.command("export")(export)
