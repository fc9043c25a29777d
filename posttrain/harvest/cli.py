"""`posttrain data export` and `posttrain data purge`: the API's harvested traffic as training
data, and its retention. (Registered under `posttrain data` beside `data generate`.)"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer

from posttrain.errors import PosttrainError
from posttrain.ui.cli import DATE_FORMATS, MODE_MISMATCH_HELP, SOURCE_HELP

app = typer.Typer()


@app.command("export")
def export(
    kind: str = typer.Option(..., "--kind", help="sft: conversations (what `posttrain train sft` reads); "
                             "dpo: preference pairs (what `posttrain train dpo` reads)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL (written atomically)."),
    model: Optional[List[str]] = typer.Option(None, help="Only answers from this model (repeatable)."),
    since: Optional[datetime] = typer.Option(None, formats=DATE_FORMATS, help="At or after (UTC): sft, when the "
                                             "request was harvested; dpo, when the feedback or vote was given."),
    until: Optional[datetime] = typer.Option(None, formats=DATE_FORMATS, help="Before (UTC), the same way."),
    min_length: int = typer.Option(1, help="Drop answers (either side of a pair) with fewer characters."),
    positive_only: bool = typer.Option(False, "--positive-only", help="sft: only answers rated up or corrected."),
    scrub_pii: bool = typer.Option(False, "--scrub-pii", help="Mask email addresses, phone numbers and key-like "
                                   "strings ([EMAIL], [PHONE], [KEY]) and say how many."),
    sources: Optional[str] = typer.Option(None, help="dpo: comma-separated, from choice (n>1, a choice rated up), "
                                          "correction, thumbs (up vs down, same prompt), arena. Default: all."),
    arena_source: str = typer.Option("human", help="dpo: which arena votes: " + SOURCE_HELP),
    drop_mode_mismatch: bool = typer.Option(False, "--drop-mode-mismatch", help="dpo: " + MODE_MISMATCH_HELP),
):
    """Harvested answers, feedback and arena votes as SFT or DPO data; says what it kept and dropped.
    A thinking model's trace is kept in the assistant message's `reasoning` field (what `posttrain
    train` renders as the <think> block)."""
    from posttrain.harvest.export import DPO_SOURCES, KINDS, export_dpo, export_sft
    from posttrain.harvest.logs import Filters
    from posttrain.registry import Registry

    if kind not in KINDS:
        raise PosttrainError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "sft" and sources is not None:
        raise PosttrainError("--sources picks preference pairs: it goes with --kind dpo")
    if kind == "dpo" and positive_only:
        raise PosttrainError("--positive-only filters SFT conversations: it goes with --kind sft")
    if kind == "sft" and drop_mode_mismatch:
        raise PosttrainError("--drop-mode-mismatch filters preference pairs: it goes with --kind dpo")
    filters = Filters(tuple(model or ()), since, until)
    store = Registry().store
    if kind == "sft":
        summary = export_sft(store, out, filters, min_length=min_length, positive_only=positive_only,
                             scrub_pii=scrub_pii)
    else:
        picked = [s.strip() for s in sources.split(",") if s.strip()] if sources else DPO_SOURCES
        summary = export_dpo(store, out, filters, sources=picked, min_length=min_length, scrub_pii=scrub_pii,
                             arena_source=arena_source, drop_mode_mismatch=drop_mode_mismatch)
    typer.echo(str(summary))


@app.command("purge")
def purge(
    before: datetime = typer.Option(..., formats=DATE_FORMATS, help="Delete what was harvested before this (UTC)."),
    model: Optional[List[str]] = typer.Option(None, help="Only this model's requests (repeatable)."),
):
    """Delete harvested request logs, and the feedback on them, for privacy and retention."""
    from posttrain.harvest.logs import purge as run
    from posttrain.registry import Registry

    logs, feedback = run(Registry().store, before, model or ())
    typer.echo(f"deleted {logs} request logs harvested before {before:%Y-%m-%d %H:%M:%S} UTC"
               f"{' from ' + ', '.join(model) if model else ''}, and {feedback} feedback on them")
