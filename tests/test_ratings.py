"""Ratings on synthetic votes drawn from known strengths, and the edge cases (ties, both-bad,
undefeated models, self-battles, no votes); the leaderboard read from a store (counted by the
database, Elo streamed) against the per-battle computation on the same votes."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from posttrain.errors import PosttrainError
from posttrain.store import Battle, Store
from posttrain.ui.cli import app as arena_cli
from posttrain.ui.ratings import (
    DISPLAY_COLUMNS,
    LEADERBOARD_COLUMNS,
    axis_labels,
    battle_count_matrix,
    board_notes,
    bradley_terry,
    heatmap,
    interval_ranks,
    leaderboard,
    online_elo,
    plots,
    plus_minus,
    readable,
    stored_leaderboard,
    win_rate_matrix,
)
from posttrain.ui.votes import iter_votes, load_battles, newest_battle_id, vote_counts

TRUE = {f"m{i}": 1000 + 60 * (i - 3.5) for i in range(8)}  # mean 1000, 60 Elo points apart


def synthetic(votes: int, seed: int, tie_rate: float = 0.1) -> pd.DataFrame:
    """Votes from the Elo-scale strengths in TRUE. Ties (split between "tie" and "bothbad") are
    drawn so that A's expected score is still the BT win probability, i.e. consistent with
    ties counting as half-wins."""
    rng = np.random.default_rng(seed)
    names = np.array(list(TRUE))
    strength = np.array(list(TRUE.values()))
    a = rng.integers(0, len(names), votes)
    b = (a + rng.integers(1, len(names), votes)) % len(names)
    p = 1 / (1 + 10 ** ((strength[b] - strength[a]) / 400))
    tie = rng.random(votes) < tie_rate
    a_wins = rng.random(votes) < (p - tie_rate / 2) / (1 - tie_rate)
    vote = np.where(tie, np.where(rng.random(votes) < 0.5, "tie", "bothbad"), np.where(a_wins, "a", "b"))
    return pd.DataFrame({"model_a": names[a], "model_b": names[b], "vote": vote})


def frame(*rows: tuple[str, str, str, int]) -> pd.DataFrame:
    """Battles from (model_a, model_b, vote, count) rows."""
    return pd.DataFrame([(a, b, v) for a, b, v, n in rows for _ in range(n)], columns=["model_a", "model_b", "vote"])


def test_bradley_terry_recovers_known_strengths_with_covering_intervals():
    board = leaderboard(synthetic(20_000, seed=1), rounds=200)
    assert list(board.columns) == LEADERBOARD_COLUMNS
    assert list(board["model"]) == sorted(TRUE, key=TRUE.get, reverse=True)
    truth = board["model"].map(TRUE)
    covered = (board["bt_lo"] <= truth) & (truth <= board["bt_hi"])
    assert covered.sum() >= 7, board.assign(truth=truth)  # 95% intervals: at most one of 8 may miss
    assert ((board["bt_hi"] - board["bt_lo"]) < 40).all()
    assert (board["bt"] - truth).abs().max() < 20
    assert board["bt"].mean() == pytest.approx(1000)
    assert board["battles"].sum() == 2 * 20_000


def test_online_elo_agrees_with_bradley_terry_on_the_order():
    battles = synthetic(20_000, seed=2)
    elo = online_elo(battles, k=4).sort_values(ascending=False)
    bt = bradley_terry(battles).sort_values(ascending=False)
    assert list(elo.index) == list(bt.index) == sorted(TRUE, key=TRUE.get, reverse=True)
    assert elo.mean() == pytest.approx(1000)


def test_ties_are_half_wins_and_bothbad_is_a_tie_unless_dropped():
    # 30 wins, 10 losses, 20 ties: 40 of 60 points, odds 2:1 -> 400*log10(2) Elo points apart.
    with_ties = frame(("x", "y", "a", 30), ("x", "y", "b", 10), ("y", "x", "tie", 20))
    bt = bradley_terry(with_ties, prior=0)
    assert bt["x"] - bt["y"] == pytest.approx(400 * math.log10(2), abs=0.01)
    assert bt.mean() == pytest.approx(1000)
    both_bad = frame(("x", "y", "a", 30), ("x", "y", "b", 10), ("x", "y", "bothbad", 20))
    assert bradley_terry(both_bad, prior=0)["x"] == pytest.approx(bt["x"], abs=0.01)
    dropped = bradley_terry(both_bad, bothbad="drop", prior=0)
    assert dropped["x"] - dropped["y"] == pytest.approx(400 * math.log10(3), abs=0.01)
    only_ties = frame(("x", "y", "tie", 5), ("x", "y", "bothbad", 5))
    assert bradley_terry(only_ties).to_dict() == pytest.approx({"x": 1000, "y": 1000})
    assert leaderboard(only_ties, bothbad="drop")["battles"].tolist() == [5, 5]
    assert leaderboard(frame(("x", "y", "bothbad", 3)), bothbad="drop").empty


def test_undefeated_models_get_finite_ordered_ratings():
    battles = frame(("top", "mid", "a", 5), ("mid", "low", "a", 5), ("low", "top", "b", 5))
    for prior in (0, 1):
        board = leaderboard(battles, prior=prior)
        assert list(board["model"]) == ["top", "mid", "low"]
        assert np.isfinite(board[["elo", "bt", "bt_lo", "bt_hi"]].to_numpy(dtype=float)).all()


def test_the_prior_keeps_a_young_arena_sane_and_fades_with_votes():
    one_vote = bradley_terry(frame(("x", "y", "a", 1)))
    assert 50 < one_vote["x"] - one_vote["y"] < 400  # the plain MLE puts x thousands of points ahead
    many = frame(("x", "y", "a", 3000), ("x", "y", "b", 1000))
    gap = bradley_terry(many)["x"] - bradley_terry(many)["y"]
    assert gap == pytest.approx(400 * math.log10(3), abs=1)


def test_matrices_self_battles_and_bad_input():
    battles = frame(("x", "y", "a", 3), ("y", "x", "a", 1), ("x", "z", "tie", 2), ("x", "x", "a", 9))
    counts = battle_count_matrix(battles)
    assert counts.loc["x", "y"] == counts.loc["y", "x"] == 4 and counts.loc["x", "z"] == 2
    assert counts.loc["y", "z"] == 0 and "x" not in counts.loc["x"].loc[lambda s: s > 0].index
    rates = win_rate_matrix(battles, order=["x", "y", "z"])
    assert rates.loc["x", "y"] == 0.75 and rates.loc["y", "x"] == 0.25 and rates.loc["z", "x"] == 0.5
    assert math.isnan(rates.loc["y", "z"])
    assert leaderboard(battles.iloc[:0]).columns.tolist() == LEADERBOARD_COLUMNS
    with pytest.raises(PosttrainError, match=r"unknown votes \['draw'\]"):
        leaderboard(frame(("x", "y", "draw", 1)))
    fig = heatmap(rates, "win rate")
    assert len(fig.axes) == 2  # the matrix and its colour bar


# --- the leaderboard from the store ---

T0 = datetime(2026, 1, 1)
# (model_a, model_b, vote, source, minute voted), stored (ids) in this order, voted in another.
STORED = [
    ("x", "y", "a", "arena", 0),
    ("y", "x", "tie", "arena", 5),
    ("x", "z", "bothbad", "arena", 3),
    ("z", "y", "b", "arena", 5),  # voted in the same minute as the tie: the id breaks the tie
    ("x", "x", "a", "arena", 6),  # a self-battle rates nobody
    ("y", "z", "a", "side-by-side", 7),
    ("z", "x", "a", "judge:gpt", 8),
    ("x", "y", "bothbad", "judge:claude", 9),
    ("y", "x", "a", "arena", 1),
]


def fill(store: Store, rows) -> Store:
    with store.session() as s:
        s.add_all(Battle(session_hash="s", model_a=a, model_b=b, vote=v, source=source,
                         voted_at=T0 + timedelta(minutes=minute)) for a, b, v, source, minute in rows)
    return store


def new_store(folder, rows) -> Store:
    return fill(Store(f"sqlite:///{folder / f'{len(list(folder.iterdir()))}.db'}"), rows)


@pytest.fixture
def store(tmp_path) -> Store:
    return new_store(tmp_path, STORED)


def per_battle_elo(rows, k: float, bothbad: str) -> dict[str, float]:
    """Online Elo written out plainly, one battle at a time."""
    rating: dict[str, float] = {}
    for a, b, vote in rows:
        if a == b or (vote == "bothbad" and bothbad == "drop"):
            continue
        ra, rb = rating.setdefault(a, 1000.0), rating.setdefault(b, 1000.0)
        expected = 1 / (1 + 10 ** ((rb - ra) / 400))
        delta = k * ({"a": 1.0, "b": 0.0}.get(vote, 0.5) - expected)
        rating[a], rating[b] = ra + delta, rb - delta
    return rating


def test_votes_are_counted_by_the_database_and_streamed_in_vote_order(store):
    counts = vote_counts(store).sort_values(["model_a", "model_b", "vote"], ignore_index=True)
    assert counts.values.tolist() == [
        ["x", "x", "a", 1], ["x", "y", "a", 1], ["x", "z", "bothbad", 1], ["y", "x", "a", 1],
        ["y", "x", "tie", 1], ["z", "y", "b", 1]]
    assert newest_battle_id(store) == 9 and vote_counts(store, last_id=3)["n"].sum() == 3
    assert vote_counts(store, "judge")["n"].sum() == 2 and vote_counts(store, "human")["n"].sum() == 7
    in_order = [("x", "y", "a"), ("y", "x", "a"), ("x", "z", "bothbad"), ("y", "x", "tie"), ("z", "y", "b"),
                ("x", "x", "a")]
    assert [tuple(row) for row in iter_votes(store)] == in_order
    assert [tuple(row) for row in iter_votes(store, last_id=3)] == [in_order[0], in_order[2], in_order[3]]
    assert [tuple(row) for row in iter_votes(store, "judge:gpt")] == [("z", "x", "a")]
    assert vote_counts(store, "nobody").empty and not list(iter_votes(store, "nobody"))


@pytest.mark.parametrize("source", ["arena", "human", "side-by-side", "judge", "judge:claude", "all"])
@pytest.mark.parametrize("bothbad", ["tie", "drop"])
def test_stored_leaderboard_is_the_per_battle_leaderboard(store, source, bothbad):
    table, counts = stored_leaderboard(store, source, k=16, rounds=50, bothbad=bothbad, seed=7)
    battles = load_battles(store, source)
    expected = leaderboard(battles, k=16, rounds=50, bothbad=bothbad, seed=7)
    pd.testing.assert_frame_equal(table, expected, check_exact=True, check_dtype=False)
    assert counts["n"].sum() == len(battles)
    elo = per_battle_elo(battles[["model_a", "model_b", "vote"]].itertuples(index=False), 16, bothbad)
    assert dict(zip(table["model"], table["elo"])) == pytest.approx(elo, abs=1e-9)
    if source == "judge:claude" and bothbad == "drop":
        assert table.empty and list(table.columns) == LEADERBOARD_COLUMNS


def test_stored_leaderboard_by_hand(store, tmp_path):
    table = stored_leaderboard(store, rounds=0)[0].set_index("model")
    # x: x-y a, y-x a, x-z bothbad, y-x tie (the self-battle is not counted); y: 4; z: 2.
    assert table["battles"].to_dict() == {"x": 4, "y": 4, "z": 2}
    first = stored_leaderboard(new_store(tmp_path, STORED[:1]), k=4, rounds=0)[0].set_index("model")
    assert first["elo"].to_dict() == {"x": 1002.0, "y": 998.0}  # 4 * (1 - 1/2) each way
    assert stored_leaderboard(new_store(tmp_path, []))[0].empty
    # 30 wins, 10 losses and 20 ties (half of them both-bad): 40 of 60 points, odds 2:1.
    many = [("x", "y", "a", "arena", 0)] * 30 + [("y", "x", "a", "arena", 1)] * 10
    many += [("x", "y", "tie", "arena", 2)] * 10 + [("y", "x", "bothbad", "arena", 3)] * 10
    board = stored_leaderboard(new_store(tmp_path, many), prior=0, rounds=20)[0].set_index("model")
    assert board.loc["x", "bt"] - board.loc["y", "bt"] == pytest.approx(400 * math.log10(2), abs=0.01)
    dropped = stored_leaderboard(new_store(tmp_path, many), prior=0, bothbad="drop")[0].set_index("model")
    # Without both-bad: 35 of 50 points, odds 7:3.
    assert dropped.loc["x", "bt"] - dropped.loc["y", "bt"] == pytest.approx(400 * math.log10(7 / 3), abs=0.01)
    assert dropped["battles"].tolist() == [50, 50]


def test_stored_leaderboard_of_many_votes_with_shared_vote_times(tmp_path):
    battles = synthetic(3000, seed=3)
    minutes = np.random.default_rng(3).integers(0, 500, len(battles))  # many votes share a minute
    sources = np.where(np.arange(len(battles)) % 7 == 0, "side-by-side", "arena")
    store = new_store(tmp_path, zip(battles["model_a"], battles["model_b"], battles["vote"], sources,
                                    minutes.tolist()))
    for source in ("arena", "human"):
        expected = leaderboard(load_battles(store, source), seed=5)
        pd.testing.assert_frame_equal(stored_leaderboard(store, source, seed=5)[0], expected, check_exact=True,
                                      check_dtype=False)


def test_stored_leaderboard_rejects_unknown_votes(store):
    fill(store, [("x", "y", "draw", "arena", 20)])
    with pytest.raises(PosttrainError, match=r"unknown votes \['draw'\]"):
        stored_leaderboard(store)


def test_the_leaderboard_splits_by_thinking_mode(tmp_path, monkeypatch):
    """Battles run with thinking on, off, and from before modes were recorded (None)."""
    store = Store(f"sqlite:///{tmp_path / 'modes.db'}")
    modes = [True, False, None] * 6
    with store.session() as s:
        s.add_all(Battle(session_hash="s", model_a=a, model_b=b, vote=v, source="arena", thinking=mode,
                         voted_at=T0 + timedelta(minutes=i))
                  for i, ((a, b, v), mode) in enumerate(zip(synthetic(18, seed=1)[["model_a", "model_b", "vote"]]
                                                            .itertuples(index=False), modes)))
    for mode, n in ((True, 6), (False, 6), (None, 18)):
        table, counts = stored_leaderboard(store, thinking=mode, seed=2)
        battles = load_battles(store, thinking=mode)
        assert len(battles) == counts["n"].sum() == n
        pd.testing.assert_frame_equal(table, leaderboard(battles, seed=2), check_exact=True, check_dtype=False)
    assert list(load_battles(store, thinking=True)["thinking"]) == [True] * 6
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POSTTRAIN_DB_URL", store.url)
    runner = CliRunner()
    shown = runner.invoke(arena_cli, ["leaderboard", "--thinking", "off", "--min-battles", "0"])
    assert shown.exit_code == 0 and "6 arena votes with thinking off" in shown.output, shown.output
    on = runner.invoke(arena_cli, ["leaderboard", "--thinking", "on", "--json"])
    assert json.loads(on.output) == json.loads(stored_leaderboard(store, thinking=True)[0].to_json(orient="records"))
    wrong = runner.invoke(arena_cli, ["leaderboard", "--thinking", "maybe"])
    assert wrong.exit_code == 2 and "expected on or off" in wrong.output


def test_cli_leaderboard_reads_the_store(store, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POSTTRAIN_DB_URL", store.url)
    runner = CliRunner()
    done = runner.invoke(arena_cli, ["leaderboard", "--json", "--source", "human", "--bothbad", "drop", "--k", "8",
                                     "--plots", str(tmp_path / "plots")])
    assert done.exit_code == 0, done.output
    expected = leaderboard(load_battles(store, "human"), k=8, bothbad="drop")
    assert json.loads(done.output) == json.loads(expected.to_json(orient="records"))
    assert (tmp_path / "plots" / "win_rate.png").stat().st_size > 0
    table = runner.invoke(arena_cli, ["leaderboard", "--source", "all"])
    assert table.exit_code == 0 and "9 all votes" in table.output
    assert "Rank" in table.output and "95% CI" in table.output and "bt_lo" not in table.output
    assert "(provisional)" in table.output and "fewer than 10 battles" in table.output  # 2 to 6 battles each
    ranked = runner.invoke(arena_cli, ["leaderboard", "--source", "all", "--min-battles", "2"])
    assert ranked.exit_code == 0 and "provisional" not in ranked.output.lower()
    assert runner.invoke(arena_cli, ["leaderboard", "--source", "nobody"]).output == "no nobody votes yet\n"


# --- the leaderboard as people read it: ranks by interval, provisional models, plots ---

LONG = ["smollm2-135m-instruct", "smollm2-135m-instruct-sft", "smollm2-135m-instruct-sft-dpo-loop-1"]


def one_loop_turn() -> pd.DataFrame:
    """Three models with 40 battles each (x beats y beats z, ties between), then a new model
    that won its one battle: the young arena of issue 17 item 5."""
    rows = [(LONG[2], LONG[1], "a", 12), (LONG[1], LONG[2], "a", 8), (LONG[1], LONG[0], "a", 14),
            (LONG[0], LONG[1], "a", 6), (LONG[2], LONG[0], "a", 15), (LONG[0], LONG[2], "tie", 5)]
    return pd.concat([frame(*rows), frame(("brand-new-model-after-one-loop-turn-dpo", LONG[0], "a", 1))],
                     ignore_index=True)


def test_rank_is_one_plus_the_models_whose_whole_interval_is_above():
    lo = np.array([1100.0, 1050.0, 900.0, 950.0])
    hi = np.array([1200.0, 1150.0, 1000.0, 1060.0])
    # A, B overlap: both 1. C: A, B and not D (950 < 1000) lie above: 3. D: only A (1100 > 1060): 2.
    assert interval_ranks(lo, hi).tolist() == [1, 1, 3, 2]
    assert interval_ranks(np.array([5.0, 5.0, 3.0]), np.array([5.0, 5.0, 3.0])).tolist() == [1, 1, 3]  # no intervals


def test_a_model_with_few_battles_is_provisional_and_never_ranked_above_measured_ones():
    battles = one_loop_turn()
    board = leaderboard(battles, seed=1)
    new = board.iloc[-1]
    assert new["model"].startswith("brand-new") and new["battles"] == 1 and new["provisional"]
    assert pd.isna(new["rank"]) and new["bt"] == board["bt"].max()  # rated highest, yet listed last, unranked
    measured = board.iloc[:-1]
    assert not measured["provisional"].any() and measured["battles"].tolist() == [40, 40, 41]
    assert list(measured["model"]) == [LONG[2], LONG[1], LONG[0]] and measured["rank"].iloc[0] == 1
    assert measured["rank"].tolist() == interval_ranks(measured["bt_lo"].to_numpy(), measured["bt_hi"].to_numpy()).tolist()
    assert (measured["rank"].diff().dropna() >= 0).all()
    # The threshold is a setting: at 1 battle everyone is ranked, by interval, the new model too.
    everyone = leaderboard(battles, seed=1, min_battles=1)
    assert not everyone["provisional"].any() and everyone["rank"].notna().all() and everyone["rank"].min() == 1
    assert leaderboard(battles, seed=1, min_battles=41)["provisional"].tolist() == [False, True, True, True]


def test_the_readable_table_has_whole_numbers_plus_minus_intervals_and_marks_provisional_models():
    assert plus_minus(1166.4, 1000.2, 1285.7) == "+119 / -166"
    assert plus_minus(1000.0, 1000.0, 1000.0) == "+0 / -0"
    board = leaderboard(one_loop_turn(), seed=1)
    shown = readable(board)
    assert list(shown.columns) == DISPLAY_COLUMNS == ["Rank", "Model", "Rating", "95% CI", "Battles", "Online Elo"]
    assert shown["Rank"].tolist()[-1] == "–" and shown["Model"].tolist()[-1].endswith(" (provisional)")
    assert shown["Rank"].iloc[0] == "1" and shown["Model"].iloc[0] == LONG[2]
    first = board.iloc[0]
    assert shown.iloc[0]["Rating"] == round(first["bt"]) and shown.iloc[0]["Online Elo"] == round(first["elo"])
    assert shown.iloc[0]["95% CI"] == f"+{round(first['bt_hi'] - first['bt'])} / -{round(first['bt'] - first['bt_lo'])}"
    assert not any("." in str(cell) for cell in shown.to_numpy().ravel() if not isinstance(cell, str) or "-" not in cell)
    notes = board_notes(board, 10)
    assert "share a rank" in notes[0] and notes[1].startswith("Provisional: fewer than 10 battles")
    assert len(board_notes(board.iloc[:-1], 10)) == 1  # no provisional model, no note about them
    assert readable(leaderboard(one_loop_turn().iloc[:0])).columns.tolist() == DISPLAY_COLUMNS


def texts_outside(fig) -> list[str]:
    """The visible texts of a figure (drawn as Gradio saves it, without bbox_inches) that do not
    lie wholly inside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    width, height = fig.bbox.width, fig.bbox.height
    outside = []
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text():
            box = text.get_window_extent(renderer)
            if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1:
                outside.append(text.get_text())
    return outside


def test_plots_shorten_long_names_with_a_legend_and_every_label_fits():
    battles = one_loop_turn()
    order = list(leaderboard(battles, rounds=0)["model"])
    assert axis_labels(["m0", "m1"]) == (["m0", "m1"], [])
    labels, legend = axis_labels(order)
    assert labels == ["M1", "M2", "M3", "M4"] and legend[0] == f"M1  {order[0]}"
    for stem, fig in plots(battles, order).items():
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == labels, stem
        assert [t.get_text() for t in fig.legends[0].get_texts()] == legend, stem
        assert texts_outside(fig) == [], stem
    short = synthetic(500, seed=2)
    for stem, fig in plots(short, sorted(TRUE)).items():
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == sorted(TRUE) and not fig.legends, stem
        assert texts_outside(fig) == [], stem
    assert fig.axes[0].get_title() == "Battles per pair"


def test_every_view_defaults_to_the_same_minimum_of_battles():
    import inspect

    from posttrain.evaluate.report import NightlyConfig
    from posttrain.ui import cli
    from posttrain.ui.arena import ArenaConfig
    from posttrain.ui.ratings import MIN_BATTLES

    for command in (cli.arena, cli.leaderboard):
        assert inspect.signature(command).parameters["min_battles"].default.default == MIN_BATTLES
    assert ArenaConfig().min_battles == NightlyConfig().min_battles == MIN_BATTLES
