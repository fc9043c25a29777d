"""Ratings on synthetic votes drawn from known strengths, and the edge cases (ties, both-bad,
undefeated models, self-battles, no votes)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from posttrain.errors import PosttrainError
from posttrain.ui.ratings import (
    LEADERBOARD_COLUMNS,
    battle_count_matrix,
    bradley_terry,
    heatmap,
    leaderboard,
    online_elo,
    win_rate_matrix,
)

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
