"""The nightly report as one self-contained HTML file (inline CSS, plots embedded as base64 PNG,
no scripts, no external requests: it can be mailed or archived as is) and as Markdown for CI logs."""

from __future__ import annotations

import base64
import io
import math
import re
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posttrain.evaluate.report import NightlyReport

MT_BENCH_CATEGORY = re.compile(r"^score_(?!turn\d)(.+)$")
BREAKDOWN = re.compile(r"^(score|win_rate)_")
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


def _summary_lines(report: NightlyReport) -> list[str]:
    cfg = report.config
    lines = [f"{len(report.regressions)} regression(s) beyond {cfg.threshold:g} x stderr "
             f"(no stderr known: binomial for proportions, else absolute {cfg.absolute_threshold:g})"]
    lines += [f"REGRESSION {r}" for r in report.regressions]
    lines += [f"FAILED {f}" for f in report.failures]
    lines += [f"NO SCORE {u}" for u in report.unscored]
    return lines


def render_markdown(report: NightlyReport) -> str:
    out = [f"# posttrain nightly report, {report.created_at:%Y-%m-%d %H:%M} UTC", ""]
    out += [f"- {line}" for line in _summary_lines(report)]
    if report.config.baseline:
        out.append(f"- baseline: {report.config.baseline}")
    out += ["", "| model | suite | task | metric | value | stderr | n | vs previous | vs baseline |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report.rows:
        cells = []
        for kind in ("previous", "baseline"):
            text, bad = _delta(row, kind)
            cells.append(f"**{text} REGRESSION**" if bad else text)
        out.append(f"| {row['model']} | {row['suite']} | {row['task']} | {row['metric']} | {_fmt(row['value'])} | "
                   f"{_fmt(row['stderr'])} | {row['n'] or '-'} | {cells[0]} | {cells[1]} |")
    if not report.rows:
        out.append("| (no stored scores for these models and suites) | | | | | | | | |")
    for label, board in report.arena.items():
        out += ["", f"## {label}", "", "| model | elo | BT (95% interval) | battles |", "| --- | ---: | ---: | ---: |"]
        out += [f"| {b.model} | {b.elo:.0f} | {b.bt:.0f} ({b.bt_lo:.0f}-{b.bt_hi:.0f}) | {b.battles} |"
                for b in board.itertuples()]
    return "\n".join(out) + "\n"


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
        if row["task"] == "mt_bench" and (m := MT_BENCH_CATEGORY.match(row["metric"])):
            scores.setdefault(row["model"], {})[m.group(1)] = row["value"]
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
    # Headline metrics first, then MT-Bench's per-turn / per-category breakdowns.
    shown = sorted(series, key=lambda k: (BREAKDOWN.match(k[2]) is not None,
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
        cells += [f"<td>{_fmt(row['value'])}</td>", f"<td>{_fmt(row['stderr'])}</td>", f"<td>{row['n'] or '-'}</td>"]
        for kind in ("previous", "baseline"):
            text, bad = _delta(row, kind)
            ref = row.get(kind)
            title = f' title="{escape(kind)}: {_fmt(ref["value"])} (run #{ref["run_id"]})"' if ref else ""
            css = "bad" if bad else ("muted" if text in ("-", "+0.0000", "-0.0000") else "")
            cells.append(f'<td class="{css}"{title}>{escape(text)}{" REGRESSION" if bad else ""}</td>')
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
        _table(["model", "suite", "task", "metric", "value", "stderr", "n", "vs previous", "vs baseline"],
               _score_rows(report)) if report.rows else "<p>No stored scores for these models and suites.</p>",
    ]
    if chart := _mt_bench_chart(report):
        parts += ["<h2>MT-Bench</h2>", chart]
    for label, board in report.arena.items():
        rows = [f"<tr><td class='name'>{escape(b.model)}</td><td>{b.elo:.0f}</td><td>{b.bt:.0f}</td>"
                f"<td>{b.bt_lo:.0f} - {b.bt_hi:.0f}</td><td>{b.battles}</td></tr>" for b in board.itertuples()]
        parts += [f"<h2>Ratings: {escape(label)}</h2>", _table(["model", "Elo", "Bradley-Terry", "95% interval",
                                                                "battles"], rows)]
    if trends := _trend_charts(report):
        parts += ["<h2>Scores over time</h2>", trends]
    parts.append("</body></html>")
    return "\n".join(parts)
