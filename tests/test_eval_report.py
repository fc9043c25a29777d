"""The nightly report: regression rules, its YAML config, and two real nightly runs (lm-eval
in-process on the tiny model and its LoRA as the pinned baseline; MT-Bench judged by
`eval_judge_stub`, a STAND-IN FOR A REMOTE GPT-4 JUDGE) with an injected regression caught by the
CLI's exit code and the HTML looked at in headless Chromium."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from eval_judge_stub import JUDGE, JudgeStub
from sqlalchemy import select

from posttrain.errors import PosttrainError
from posttrain.evaluate.report import NightlyConfig, compare, nightly
from posttrain.store import EvalRun, EvalScore

REPO = Path(__file__).parent.parent
CHROMIUM = "/usr/bin/chromium"


def score(run_id, value, stderr=None, model="m", task="t", metric="acc", higher=True, suite="s"):
    return {"run_id": run_id, "model": model, "suite": suite, "task": task, "metric": metric, "value": value,
            "stderr": stderr, "n": 100, "finished_at": datetime(2026, 1, 1) + timedelta(days=run_id),
            "higher_is_better": higher}


def test_a_regression_is_a_drop_beyond_threshold_standard_errors_binomial_or_absolute():
    history = [
        score(1, 0.60, 0.02), score(2, 0.50, 0.02),  # -0.10 > 2 * sqrt(2) * 0.02: flagged
        score(1, 0.60, 0.02, metric="acc_norm"), score(2, 0.56, 0.02, metric="acc_norm"),  # -0.04: noise
        score(1, 10.0, 0.5, metric="perplexity", higher=False), score(2, 12.0, 0.5, metric="perplexity", higher=False),
        score(1, 0.50, task="nostderr"), score(2, 0.30, task="nostderr"),  # -0.20 > 2 x binomial 0.0678
        score(1, 0.50, task="nostderr", metric="inst"), score(2, 0.45, task="nostderr", metric="inst"),  # noise
        score(1, 12.0, task="nostderr", metric="words"), score(2, 11.9, task="nostderr", metric="words"),  # > 0.02
        score(1, 6.0, task="mt_bench", metric="score"), score(2, 5.7, task="mt_bench", metric="score"),  # < 0.5
        score(1, 0.40, 0.02), score(1, 0.40, 0.02, metric="acc_norm"),  # nothing else for the baseline...
    ]
    history[-2]["model"] = history[-1]["model"] = "base"
    history[-2]["run_id"] = history[-1]["run_id"] = 0
    config = NightlyConfig(baseline="base", absolute_thresholds={"mt_bench": 0.5})
    rows, regressions = compare(history, config, ["m"])
    flagged = {(r.task, r.metric, r.against) for r in regressions}
    assert flagged == {("t", "acc", "previous run #1"), ("t", "perplexity", "previous run #1"),
                       ("nostderr", "acc", "previous run #1"), ("nostderr", "words", "previous run #1")}
    acc = next(r for r in rows if (r["task"], r["metric"]) == ("t", "acc"))
    assert acc["previous"]["value"] == 0.60 and acc["baseline"]["value"] == 0.40 and acc["regressed"] == ["previous"]
    assert "2 x stderr 0.0283" in str(next(r for r in regressions if r.metric == "acc" and r.task == "t"))


@pytest.mark.parametrize("text, error", [
    ("models: [a]\nthreshold: -1\n", r"nightly.yaml:2: threshold: Input should be greater than 0"),
    ("models: [a]\nmt_bench:\n  - name: mt\n", r"nightly.yaml:3: mt_bench.0.judge_model: Field required"),
    ("benchmarks:\n  - name: x\n    taks: [mmlu]\n", r"nightly.yaml:3: benchmarks.0.taks: Extra inputs are not permitted"),
    ("benchmarks:\n  - name: x\nmt_bench:\n  - name: x\n    judge_model: j\n", r"suite names must be unique \(x repeated\)"),
])
def test_nightly_config_errors_name_the_file_and_line(tmp_path, text, error):
    path = tmp_path / "nightly.yaml"
    path.write_text(text)
    with pytest.raises(PosttrainError, match=error):
        NightlyConfig.load(path)


def test_the_example_recipe_is_valid():
    config = NightlyConfig.load(REPO / "recipes" / "nightly.yaml")
    assert [s.name for s in config.suites] == ["offline", "mt-bench"] and config.absolute_thresholds["mt_bench"] == 0.5


def test_mt_bench_suites_need_a_server(registry, tiny):
    config = NightlyConfig(models=[tiny.name], mt_bench=[{"judge_model": "j"}])
    with pytest.raises(PosttrainError, match="needs base_url"):
        nightly(config, registry=registry)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True,
                          env={**os.environ, "POSTTRAIN_BASE_URL": ""}, timeout=300)


def test_the_report_shows_the_arena_ratings_as_people_read_them():
    """Ranks by interval, whole numbers with +x / -y intervals, a provisional model last (issue 17
    item 5); a stored report, no evaluation run."""
    import pandas as pd

    from posttrain.evaluate.render import render_html, render_markdown
    from posttrain.evaluate.report import NightlyReport
    from posttrain.ui.ratings import leaderboard

    battles = pd.DataFrame([("big", "small", "a")] * 30 + [("small", "big", "a")] * 10 + [("new", "small", "a")],
                           columns=["model_a", "model_b", "vote"])
    report = NightlyReport(config=NightlyConfig(min_battles=5), rows=[], history=[], regressions=[], failures=[],
                           arena={"arena votes (human)": leaderboard(battles, min_battles=5)})
    markdown = render_markdown(report)
    assert "| Rank | Model | Rating | 95% CI | Battles | Online Elo |" in markdown
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and "Rating" not in line]
    assert lines[-3].startswith("| 1 | big | ") and lines[-1].startswith("| – | new (provisional) | ")
    assert "bt_lo" not in markdown and "Provisional: fewer than 5 battles" in markdown
    assert all(" / -" in line and "." not in line for line in lines[-3:])
    html = render_html(report)
    assert "<th>95% CI</th>" in html and "<td class=name>new (provisional)</td><td>" in html
    assert "share a rank" in html


@pytest.fixture(scope="module")
def nights(registry, tiny, tmp_path_factory):
    """Two nightly runs on the same config, then a regression injected into the latest one."""
    from conftest import build_tiny_lora

    lora = build_tiny_lora(registry)
    stub = JudgeStub(models=[tiny.name, lora.name])
    tmp = tmp_path_factory.mktemp("nightly")
    config_path = tmp / "nightly.yaml"
    config_path.write_text(yaml.safe_dump({
        "models": [tiny.name], "baseline": lora.name, "base_url": stub.base_url,
        "absolute_thresholds": {"mt_bench": 0.5},
        "benchmarks": [{"name": "nightly-bench", "backend": "hf", "tasks": ["posttrain_mc", "posttrain_math"],
                        "limit": 10, "max_gen_toks": 8}],
        "mt_bench": [
            {"name": "nightly-mt", "judge_model": JUDGE, "max_tokens": 16},
            {"name": "nightly-pair", "judge_model": JUDGE, "mode": "pairwise", "baseline": lora.name, "max_tokens": 16},
            {"name": "nightly-unjudged", "judge_model": JUDGE, "limit": 1, "max_tokens": 16},  # question 1: unparsable
        ],
    }))
    config = NightlyConfig.load(config_path)
    try:
        first = nightly(config, registry=registry, out=tmp / "first.html")
        second = nightly(config, registry=registry, out=tmp / "second.html")
    finally:
        stub.stop()
    clean = cli("report", "nightly", "--no-run", "--config", str(config_path), "--set", "baseline=null",
                "--out", str(tmp / "clean.html"))
    with registry.store.session() as s:  # the injected regression: last night's MT-Bench score collapses
        latest = s.scalar(select(EvalRun.id).where(EvalRun.model == tiny.name, EvalRun.suite == "nightly-mt",
                                                   EvalRun.status == "done").order_by(EvalRun.id.desc()))
        row = s.scalar(select(EvalScore).where(EvalScore.run_id == latest, EvalScore.metric == "score"))
        row.value = 1.0
    flagged = cli("report", "nightly", "--no-run", "--config", str(config_path), "--out", str(tmp / "flagged.html"),
                  "--markdown", str(tmp / "flagged.md"))
    return {"first": first, "second": second, "clean": clean, "flagged": flagged, "tmp": tmp, "lora": lora}


def test_two_nights_show_deltas_against_the_previous_run_and_the_baseline(nights, tiny):
    first, second = nights["first"], nights["second"]
    assert not first.failures and not second.failures
    # A suite whose judge parsed nothing is no failure, but the report says so instead of going quiet.
    assert first.unscored == [f"{model} [nightly-unjudged]: judge {JUDGE} gave no parsable verdict "
                              "(2 unparsable, 0 errors of 2 judgments)" for model in (tiny.name, nights["lora"].name)]
    assert f"NO SCORE {first.unscored[0]}" in first.markdown
    assert first.html_path.exists() and second.html_path.exists()
    # Night 1: no previous run; the baseline (the LoRA, evaluated in-process with peft) was run too.
    bench = [r for r in first.rows if r["suite"] == "nightly-bench"]
    assert {(r["task"], r["metric"]) for r in bench} == {("posttrain_mc", "acc"), ("posttrain_mc", "acc_norm"),
                                                        ("posttrain_math", "exact_match,last-number")}
    assert all(r["previous"] is None and r["baseline"] is not None for r in bench)
    assert {r["model"] for r in first.rows} == {tiny.name}
    # Night 2: the same checkpoints give the same scores: every delta to the previous night is 0.
    assert all(r["previous"] is not None and r["value"] == r["previous"]["value"] for r in second.rows)
    assert not [g for g in second.regressions if g.against.startswith("previous")]
    mt = {r["metric"]: r for r in second.rows if r["suite"] == "nightly-mt"}
    assert mt["score"]["baseline"]["value"] == mt["score"]["value"]  # the stub judge rates by question only
    assert {r["metric"] for r in second.rows if r["suite"] == "nightly-pair"} >= {"win_rate", "win_rate_turn1"}
    assert "| vs previous | vs baseline |" in second.markdown and "+0.0000" in second.markdown
    assert "MT-Bench judge verdicts" in second.arena  # the pairwise verdicts, rated like arena votes

    clean = nights["clean"]
    assert clean.returncode == 0, clean.stderr
    assert "0 regression(s)" in clean.stdout and "wrote " in clean.stderr


def test_an_injected_regression_is_flagged_with_exit_code_1(nights, tiny):
    flagged = nights["flagged"]
    assert flagged.returncode == 1, flagged.stderr
    assert f"regression: {tiny.name} [nightly-mt] mt_bench score: 1.0000 vs" in flagged.stderr
    assert "previous run #" in flagged.stderr and f"baseline {nights['lora'].name}" in flagged.stderr
    markdown = (nights["tmp"] / "flagged.md").read_text()
    assert f"REGRESSION {tiny.name} [nightly-mt] mt_bench score" in markdown
    assert "REGRESSION** |" in markdown and flagged.stdout == ""  # --markdown went to the file
    html = (nights["tmp"] / "flagged.html").read_text()
    assert "REGRESSION" in html and html.count("data:image/png;base64,") == 2  # radar + score over time
    assert "http://" not in html and "https://" not in html  # self-contained


@pytest.mark.browser
def test_the_report_renders_in_headless_chromium(nights, artifacts):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` (apt-get install chromium) installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(nights["tmp"] / "profile"), executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            viewport={"width": 1280, "height": 1000})
        try:
            page = browser.new_page()
            page.goto((nights["tmp"] / "flagged.html").as_uri())
            assert "REGRESSION" in page.locator("#summary").inner_text()
            sizes = page.locator("img").evaluate_all("imgs => imgs.map(i => [i.alt, i.naturalWidth, i.naturalHeight])")
            assert [alt for alt, _, _ in sizes] == ["MT-Bench scores per category (radar)", "Scores over time"]
            assert all(w > 300 and h > 300 for _, w, h in sizes)  # decoded, not broken-image icons
            # These three come from this module's runs (the session's store may also hold other
            # tests' arena votes, rated in a table of their own).
            headings = page.locator("h2").all_inner_texts()
            assert {"Scores", "Judge agreement with human votes", "Ratings: MT-Bench judge verdicts"} <= set(headings)
            agreement = page.locator("h2:text-is('Judge agreement with human votes') ~ table").first
            assert "never measured" in agreement.inner_text()  # the stub judge
            page.screenshot(path=str(artifacts / "eval_nightly_report.png"), full_page=True)
        finally:
            browser.close()
