"""The nightly report as one self-contained HTML file (inline CSS, plots embedded as base64 PNG,
no scripts, no external requests: it can be mailed or archived as is) and as Markdown for CI logs.

Each score says what kind it is (a benchmark's, a judge's verdicts, a judge's probability-weighted
verdicts, a judge's agreement with people) and, where a judge produced it, how far that judge
agrees with human votes."""

from __future__ import annotations

import base64
import io
import math
import re
from html import escape
from typing import TYPE_CHECKING, Any, Iterator

from posttrain.evaluate.modes import COST_METRICS, LABEL, SIDE_BY_SIDE_HEADER, side_by_side, side_by_side_cells, \
    split_task

if TYPE_CHECKING:
    from posttrain.evaluate.report import NightlyReport

MT_BENCH_CATEGORY = re.compile(r"^score_(?!turn\d)(.+)$")
BREAKDOWN = re.compile(r"^(expected_)?(score|win_rate)_")
MAX_TREND_PLOTS = 12  # score-over-time panels; the table still lists every score
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; } td.name { text-align: left; }
.bad { color: #b00020; font-weight: bold; } .muted { color: #888; }
.banner { padding: 0.8em 1em; border-radius: 6px; margin: 1em 0; }
.banner.bad { background: #fde7ea; } .banner.good { background: #e6f4ea; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _delta(row: dict[str, Any], kind: str) -> tuple[str, bool]:
    """(the signed difference to the previous run / baseline, whether it was flagged)."""
    ref = row.get(kind)
    if ref is None:
        return "-", False
    return f"{row['value'] - ref['value']:+.4f}", kind in row.get("regressed", [])


def _kind(row: dict[str, Any]) -> str:
    from posttrain.evaluate.judge_agreement import TASK

    if row["task"] == TASK:
        return "judge vs humans"
    if row["metric"] in COST_METRICS:
        return "tokens spent"
    if not row.get("judge"):
        return "benchmark"
    return "judge, probability-weighted" if row["metric"].startswith("expected_") else "judge verdicts"


def _agreement_note(report: NightlyReport, judge: str | None) -> tuple[str, bool]:
    """(what a judge's score says about the judge's agreement with people, whether to warn)."""
    if not judge:
        return "", False
    agreement = report.agreements.get(judge)
    if agreement is None:
        return f"{judge}: not measured", True
    return agreement.short(), agreement.near_chance


def _summary_lines(report: NightlyReport) -> list[str]:
    cfg = report.config
    lines = [f"{len(report.regressions)} regression(s) beyond {cfg.threshold:g} x stderr "
             f"(no stderr known: binomial for proportions, else absolute {cfg.absolute_threshold:g})"]
    lines += [f"REGRESSION {r}" for r in report.regressions]
    lines += [f"FAILED {f}" for f in report.failures]
    lines += [f"NO SCORE {u}" for u in report.unscored]
    for judge in report.judges:
        if (agreement := report.agreements.get(judge)) is None:
            lines.append(f"JUDGE {judge}: agreement with human votes never measured "
                         f"(`posttrain eval judge-agreement --judge {judge}`)")
        elif agreement.near_chance:
            lines.append(f"JUDGE WARNING {agreement.summary()}")
    return lines


def _agreement_rows(report: NightlyReport) -> list[list[str]]:
    """One row per judge in the report: source, battles and each metric with its interval."""
    from posttrain.evaluate.judge_agreement import METRICS

    rows = []
    for judge in report.judges:
        if (a := report.agreements.get(judge)) is None:
            rows.append([judge, "-", "-", *["-"] * len(METRICS), "never measured"])
        else:
            rows.append([judge, a.source, str(a.battles), *[a.text(m) for m in METRICS],
                         "indistinguishable from chance" if a.near_chance else ""])
    return rows


AGREEMENT_HEADER = ["judge", "votes", "battles", "with ties", "without ties", "Cohen's kappa", "position bias", "note"]


def render_markdown(report: NightlyReport) -> str:
    out = [f"# posttrain nightly report, {report.created_at:%Y-%m-%d %H:%M} UTC", ""]
    out += [f"- {line}" for line in _summary_lines(report)]
    if report.config.baseline:
        out.append(f"- baseline: {report.config.baseline}")
    out += ["", "| model | suite | task | metric | kind | value | stderr | n | vs previous | vs baseline | judge vs humans |",
            "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in report.rows:
        cells = []
        for kind in ("previous", "baseline"):
            text, bad = _delta(row, kind)
            cells.append(f"**{text} REGRESSION**" if bad else text)
        note, warn = _agreement_note(report, row.get("judge"))
        out.append(f"| {row['model']} | {row['suite']} | {row['task']} | {row['metric']} | {_kind(row)} | "
                   f"{_fmt(row['value'])} | {_fmt(row['stderr'])} | {row['n'] or '-'} | {cells[0]} | {cells[1]} | "
                   f"{f'**{note}**' if warn else note} |")
    if not report.rows:
        out.append("| (no stored scores for these models and suites) | | | | | | | | | | |")
    if thinking := _thinking_rows(report):
        out += ["", "## Thinking vs not thinking", "", THINKING_NOTE, "",
                "| " + " | ".join(["model", "suite", *SIDE_BY_SIDE_HEADER]) + " |",
                "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        out += ["| " + " | ".join(cells) + " |" for cells in thinking]
    if report.judges:
        out += ["", "## Judge agreement with human votes", "", _anchors(),
                "", "| " + " | ".join(AGREEMENT_HEADER) + " |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        out += ["| " + " | ".join(cells) + " |" for cells in _agreement_rows(report)]
    for label, table, notes in _arena_boards(report):
        out += ["", f"## {label}", "", "| " + " | ".join(table.columns) + " |",
                "| " + " | ".join("---" if c == "Model" else "---:" for c in table.columns) + " |"]
        out += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
        out += [f"\n{line}" for line in [*notes, *_board_judges(report, label)]]
    return "\n".join(out) + "\n"


THINKING_NOTE = ("Scores measured in thinking modes (`--thinking`; the latest run's) side by side, with the tokens "
                 "spent per sample: the whole reply, and of it the trace. Judges saw only the answers.")


def _thinking_rows(report: NightlyReport) -> list[list[str]]:
    """Cells of the thinking-vs-not table: headline metrics only (MT-Bench's per-turn and
    per-category breakdowns stay in the scores table)."""
    return [[e["model"], e["suite"], *side_by_side_cells(e)] for e in side_by_side(report.rows)
            if not BREAKDOWN.match(e["metric"])]


def _arena_boards(report: NightlyReport) -> Iterator[tuple[str, Any, list[str]]]:
    """(label, the leaderboard as people read it, how to read it) of each set of ratings."""
    from posttrain.ui.ratings import board_notes, readable

    for label, board in report.arena.items():
        yield label, readable(board), board_notes(board, report.config.min_battles)


def _anchors() -> str:
    from posttrain.evaluate.judge_agreement import ANCHORS

    return f"Agreement with the human vote on the same battles, 95% bootstrap intervals. {ANCHORS}."


def _board_judges(report: NightlyReport, label: str) -> list[str]:
    """Under the judge-verdict ratings: how far each judge behind them agrees with people."""
    from posttrain.evaluate.report import JUDGE_BOARD

    if label != JUDGE_BOARD:
        return []
    return [f"Judge {note}" for note, _ in (_agreement_note(report, j) for j in report.battle_judges)]


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="{escape(fig.get_label())}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _mt_bench_chart(report: NightlyReport) -> str:
    """Per-category MT-Bench scores of each model's latest run: a radar with three or more
    categories, bars otherwise."""
    import matplotlib.pyplot as plt
    import numpy as np

    scores: dict[str, dict[str, float]] = {}
    for row in report.rows:
        task, mode = split_task(row["task"])
        if task == "mt_bench" and (m := MT_BENCH_CATEGORY.match(row["metric"])):
            label = row["model"] if mode is None else f"{row['model']} ({LABEL[mode]})"  # one line per mode
            scores.setdefault(label, {})[m.group(1)] = row["value"]
    baseline = report.config.baseline
    if baseline:
        latest = {}
        for h in report.history:
            if h["model"] == baseline and h["task"] == "mt_bench" and (m := MT_BENCH_CATEGORY.match(h["metric"])):
                latest[m.group(1)] = h["value"]
        if latest:
            scores.setdefault(baseline, latest)
    if not scores:
        return ""
    categories = sorted({c for per_model in scores.values() for c in per_model})
    if len(categories) >= 3:
        fig = plt.figure(figsize=(6, 6), label="MT-Bench scores per category (radar)")
        ax = fig.add_subplot(projection="polar")
        angles = np.linspace(0, 2 * np.pi, len(categories), endpoint=False).tolist()
        for model, per_model in scores.items():
            values = [per_model.get(c, 0.0) for c in categories]
            style = "--" if model == report.config.baseline else "-"
            ax.plot(angles + angles[:1], values + values[:1], style, marker="o", label=model)
            ax.fill(angles + angles[:1], values + values[:1], alpha=0.1)
        ax.set_xticks(angles, categories)
        ax.set_ylim(0, 10)
        ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1))
    else:
        fig, ax = plt.subplots(figsize=(7, 4), label="MT-Bench scores per category (bars)")
        width = 0.8 / len(scores)
        for i, (model, per_model) in enumerate(scores.items()):
            ax.bar([x + i * width for x in range(len(categories))], [per_model.get(c, 0.0) for c in categories],
                   width=width, label=model)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(categories))], categories)
        ax.set_ylim(0, 10)
        ax.legend()
    ax.set_title("MT-Bench score per category (1-10)")
    return _png(fig)


def _trend_charts(report: NightlyReport) -> str:
    """Score over time per (suite, task, metric), one line per model with stderr bars."""
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}
    for h in report.history:
        series.setdefault((h["suite"], h["task"], h["metric"]), {}).setdefault(h["model"], []).append(h)
    # Headline metrics first, then MT-Bench's per-turn / per-category breakdowns and tokens spent.
    shown = sorted(series, key=lambda k: (BREAKDOWN.match(k[2]) is not None or k[2] in COST_METRICS,
                                          -max(len(v) for v in series[k].values())))[:MAX_TREND_PLOTS]
    if not shown:
        return ""
    columns = min(3, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False,
                             label="Scores over time")
    for ax, key in zip(axes.flat, shown):
        for model, points in series[key].items():
            style = "--" if model == report.config.baseline else "-"
            ax.errorbar([p["finished_at"] for p in points], [p["value"] for p in points],
                        yerr=[p["stderr"] or 0.0 for p in points], fmt=style + "o", capsize=3, label=model)
        ax.set_title(f"{key[1]} / {key[2]}\n[{key[0]}]", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.legend(fontsize=7)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png(fig)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _score_rows(report: NightlyReport) -> list[str]:
    html_rows = []
    for row in report.rows:
        cells = [f'<td class="name">{escape(str(row[k]))}</td>' for k in ("model", "suite", "task", "metric")]
        cells += [f'<td class="name">{escape(_kind(row))}</td>', f"<td>{_fmt(row['value'])}</td>",
                  f"<td>{_fmt(row['stderr'])}</td>", f"<td>{row['n'] or '-'}</td>"]
        for kind in ("previous", "baseline"):
            text, bad = _delta(row, kind)
            ref = row.get(kind)
            title = f' title="{escape(kind)}: {_fmt(ref["value"])} (run #{ref["run_id"]})"' if ref else ""
            css = "bad" if bad else ("muted" if text in ("-", "+0.0000", "-0.0000") else "")
            cells.append(f'<td class="{css}"{title}>{escape(text)}{" REGRESSION" if bad else ""}</td>')
        note, warn = _agreement_note(report, row.get("judge"))
        cells.append(f'<td class="name{" bad" if warn else ""}">{escape(note)}</td>')
        html_rows.append(f"<tr>{''.join(cells)}</tr>")
    return html_rows


def render_html(report: NightlyReport) -> str:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in cron
    cfg = report.config
    banner_class = "good" if report.ok else "bad"
    summary = "".join(f"<div>{escape(line)}</div>" for line in _summary_lines(report))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>posttrain nightly {report.created_at:%Y-%m-%d}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>posttrain nightly report <span class='muted'>{report.created_at:%Y-%m-%d %H:%M} UTC</span></h1>",
        f"<div class='banner {banner_class}' id='summary'>{summary}</div>",
        f"<p>Models: {escape(', '.join(dict.fromkeys(r['model'] for r in report.rows)) or 'none')}; "
        f"baseline: {escape(cfg.baseline or 'none')}. Deltas compare each model's latest run of a suite with its "
        f"previous run and with the baseline's latest run of the same suite.</p>",
        "<h2>Scores</h2>",
        _table(["model", "suite", "task", "metric", "kind", "value", "stderr", "n", "vs previous", "vs baseline",
                "judge vs humans"], _score_rows(report)) if report.rows else
        "<p>No stored scores for these models and suites.</p>",
    ]
    if thinking := _thinking_rows(report):
        rows = [f"<tr>{''.join(f'<td class=name>{escape(c)}</td>' for c in cells[:4])}"
                f"{''.join(f'<td>{escape(c)}</td>' for c in cells[4:])}</tr>" for cells in thinking]
        parts += ["<h2>Thinking vs not thinking</h2>", f"<p>{escape(THINKING_NOTE)}</p>",
                  _table(["model", "suite", *SIDE_BY_SIDE_HEADER], rows)]
    if report.judges:
        rows = [f"<tr>{''.join(f'<td class=name>{escape(c)}</td>' for c in cells[:2])}"
                f"{''.join(f'<td>{escape(c)}</td>' for c in cells[2:-1])}<td class='name bad'>{escape(cells[-1])}</td></tr>"
                for cells in _agreement_rows(report)]
        parts += ["<h2>Judge agreement with human votes</h2>", f"<p>{escape(_anchors())}</p>",
                  _table(AGREEMENT_HEADER, rows)]
    if chart := _mt_bench_chart(report):
        parts += ["<h2>MT-Bench</h2>", chart]
    for label, table, notes in _arena_boards(report):
        rows = ["<tr>" + "".join(f"<td{' class=name' if c == 'Model' else ''}>{escape(str(v))}</td>"
                                 for c, v in zip(table.columns, row)) + "</tr>" for row in table.itertuples(index=False)]
        parts += [f"<h2>Ratings: {escape(label)}</h2>", _table(list(table.columns), rows)]
        parts += [f"<p>{escape(line)}</p>" for line in [*notes, *_board_judges(report, label)]]
    if trends := _trend_charts(report):
        parts += ["<h2>Scores over time</h2>", trends]
    parts.append("</body></html>")
    return "\n".join(parts)
