"""Ratings from pairwise votes: online Elo, Bradley-Terry MLE with bootstrap CIs, and the
win-rate / battle-count matrices behind the leaderboard plots.

Everything starts from the aggregate: a million votes over 50 models collapse to at most
50*49*3 (pair, outcome) counts, so the BT fit is a Newton solve on a 50x50 system and a bootstrap
round is a multinomial draw of those counts instead of a resample of a million rows; all rounds
are fitted together as one batched Newton solve.

Votes: "a" / "b" are wins, "tie" is half a win for each side. "bothbad" says neither reply was
good, which carries no preference between the two; by default it counts as a tie (as FastChat
does: two equally bad replies are evidence the models are close), `bothbad="drop"` ignores it.
A battle of a model against itself tells nothing about ratings and is skipped. BT adds one
virtual tie per model against a 1000-rated reference (`prior`), which keeps a young arena's
ratings finite and sane and fades away as votes accumulate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from posttrain.errors import PosttrainError

VOTES = ("a", "b", "tie", "bothbad")
ANCHOR = 1000.0
SCALE = 400.0  # Elo points per factor 10 in odds
BothBad = Literal["tie", "drop"]

# Score of side A per outcome code (a won, b won, tie or both bad).
_SCORE = np.array([1.0, 0.0, 0.5])
# Keeps the plain MLE (prior=0) finite when a model never lost or never won.
RIDGE = 1e-6
# Default virtual ties per model against a 1000-rated reference (see bradley_terry).
PRIOR = 1.0


@dataclass(frozen=True)
class Votes:
    """Battles as integer arrays: model indices of each side and the outcome code."""

    models: list[str]
    a: np.ndarray
    b: np.ndarray
    code: np.ndarray  # 0: a won, 1: b won, 2: tie


@dataclass(frozen=True)
class Outcomes:
    """Votes aggregated to one row per (model i, model j, outcome) with its count."""

    models: list[str]
    i: np.ndarray
    j: np.ndarray
    score: np.ndarray  # side i's score: 1, 0 or 0.5
    count: np.ndarray

    @property
    def size(self) -> int:
        return len(self.models)


def encode(battles: pd.DataFrame, bothbad: BothBad = "tie") -> Votes:
    """Check and encode battles (columns model_a, model_b, vote), dropping self-battles."""
    if bothbad not in ("tie", "drop"):
        raise PosttrainError(f"bothbad={bothbad!r}: use 'tie' or 'drop'")
    missing = {"model_a", "model_b", "vote"} - set(battles.columns)
    if missing:
        raise PosttrainError(f"battles need the columns model_a, model_b, vote (missing: {', '.join(sorted(missing))})")
    vote = pd.Index(VOTES).get_indexer(battles["vote"])
    if (vote < 0).any():
        unknown = sorted(set(map(str, battles["vote"][vote < 0])))
        raise PosttrainError(f"unknown votes {unknown} (expected one of {', '.join(VOTES)})")
    keep = battles["model_a"].to_numpy() != battles["model_b"].to_numpy()
    if bothbad == "drop":
        keep &= vote != VOTES.index("bothbad")
    n = int(keep.sum())
    codes, models = pd.factorize(np.concatenate([battles["model_a"].to_numpy()[keep],
                                                 battles["model_b"].to_numpy()[keep]]), sort=True)
    return Votes(list(models), codes[:n], codes[n:], np.minimum(vote[keep], 2).astype(np.int64))


def aggregate(votes: Votes) -> Outcomes:
    m = len(votes.models)
    counts = np.bincount((votes.a * m + votes.b) * 3 + votes.code, minlength=m * m * 3)
    keys = np.flatnonzero(counts)
    pair, code = np.divmod(keys, 3)
    i, j = np.divmod(pair, m)
    return Outcomes(votes.models, i, j, _SCORE[code], counts[keys].astype(np.float64))


def _matrices(o: Outcomes, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score matrices W[..., i, j] (i's points against j) for one or a batch of count vectors."""
    m = o.size
    batch = counts.reshape(-1, counts.shape[-1])
    rows = np.arange(len(batch))[:, None] * m * m
    flat = np.concatenate([rows + o.i * m + o.j, rows + o.j * m + o.i], axis=1)
    weights = np.concatenate([batch * o.score, batch * (1 - o.score)], axis=1)
    w = np.bincount(flat.ravel(), weights=weights.ravel(), minlength=len(batch) * m * m)
    w = w.reshape(counts.shape[:-1] + (m, m))
    return w, w + np.swapaxes(w, -1, -2)


def _fit(wins: np.ndarray, games: np.ndarray, prior: float, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Bradley-Terry MLE (natural-log strengths, mean zero) by Newton's method, batched over
    any leading axes, plus `prior` virtual ties of each model against a reference at zero.
    The log-likelihood is concave, so Newton converges from zero; the step is capped because
    a nearly undefeated model's first steps would otherwise overshoot."""
    m = wins.shape[-1]
    theta = np.zeros(wins.shape[:-1])
    total = wins.sum(-1)
    eye = np.eye(m)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(theta[..., None, :] - theta[..., :, None]))  # P(i beats j)
        p_ref = 1.0 / (1.0 + np.exp(-theta))
        grad = total - (games * p).sum(-1) + prior * (0.5 - p_ref) - RIDGE * theta
        curv = games * p * np.swapaxes(p, -1, -2)
        diag = curv.sum(-1) + prior * p_ref * (1 - p_ref) + RIDGE
        step = -np.linalg.solve(curv - eye * diag[..., None], grad[..., None])[..., 0]
        biggest = np.abs(step).max(-1, keepdims=True)
        step = step * np.minimum(1.0, 4.0 / np.maximum(biggest, 1e-300))
        theta = theta + step
        if biggest.max() < tol:
            break
    return theta - theta.mean(-1, keepdims=True)


def _ratings(o: Outcomes, counts: np.ndarray, prior: float) -> np.ndarray:
    wins, games = _matrices(o, counts)
    return ANCHOR + SCALE / math.log(10) * _fit(wins, games, prior)


def bradley_terry(battles: pd.DataFrame, bothbad: BothBad = "tie", prior: float = PRIOR) -> pd.Series:
    """Bradley-Terry maximum-likelihood ratings on the Elo scale, mean 1000.

    `prior` adds that many virtual ties of every model against a 1000-rated reference: in a
    young arena one vote no longer puts a model thousands of points ahead, and with real
    vote counts its weight vanishes (bench/ratings.py: under 0.1 point at 1M votes). 0 gives
    the plain MLE."""
    o = aggregate(encode(battles, bothbad))
    return pd.Series(_ratings(o, o.count, prior), index=o.models, name="bt")


def bootstrap_bradley_terry(o: Outcomes, rounds: int = 100, seed: int = 0, prior: float = PRIOR) -> np.ndarray:
    """BT ratings for `rounds` bootstrap resamples of the votes, shape (rounds, models).
    Resampling N votes with replacement is a multinomial draw over the aggregated counts."""
    rng = np.random.default_rng(seed)
    n = int(o.count.sum())
    return _ratings(o, rng.multinomial(n, o.count / n, size=rounds).astype(np.float64), prior)


def _online_elo(votes: Votes, k: float) -> np.ndarray:
    rating = [ANCHOR] * len(votes.models)
    score = _SCORE[votes.code].tolist()
    # Inherently sequential; plain Python floats keep a million updates around a second.
    for i, j, s in zip(votes.a.tolist(), votes.b.tolist(), score):
        delta = k * (s - 1.0 / (1.0 + 10.0 ** ((rating[j] - rating[i]) / SCALE)))
        rating[i] += delta
        rating[j] -= delta
    return np.array(rating)


def online_elo(battles: pd.DataFrame, k: float = 4.0, bothbad: BothBad = "tie") -> pd.Series:
    """Sequential Elo in the order of the rows (sort by voted_at first), everyone starting at
    1000. K=4 is FastChat's choice for an arena with many votes; raise it for a young arena."""
    votes = encode(battles, bothbad)
    return pd.Series(_online_elo(votes, k), index=votes.models, name="elo")


LEADERBOARD_COLUMNS = ["model", "elo", "bt", "bt_lo", "bt_hi", "battles"]


def leaderboard(battles: pd.DataFrame, k: float = 4.0, rounds: int = 100, bothbad: BothBad = "tie",
                seed: int = 0, prior: float = PRIOR) -> pd.DataFrame:
    """One row per model, best first: online Elo, Bradley-Terry rating with its bootstrap 95%
    interval (bt_lo, bt_hi) and the number of battles counted. Input columns: model_a,
    model_b, vote (in the order the votes were cast)."""
    votes = encode(battles, bothbad)
    if not votes.models:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    o = aggregate(votes)
    bt = _ratings(o, o.count, prior)
    lo, hi = np.percentile(bootstrap_bradley_terry(o, rounds, seed, prior), [2.5, 97.5], axis=0) if rounds else (bt, bt)
    table = pd.DataFrame({
        "model": o.models, "elo": _online_elo(votes, k), "bt": bt, "bt_lo": lo, "bt_hi": hi,
        "battles": np.bincount(np.concatenate([votes.a, votes.b]), minlength=o.size),
    })
    return table.sort_values("bt", ascending=False, ignore_index=True)


def _pair_matrices(battles: pd.DataFrame, bothbad: BothBad) -> tuple[list[str], np.ndarray, np.ndarray]:
    o = aggregate(encode(battles, bothbad))
    wins, games = _matrices(o, o.count)
    return o.models, wins, games


def battle_count_matrix(battles: pd.DataFrame, order: list[str] | None = None,
                        bothbad: BothBad = "tie") -> pd.DataFrame:
    """Battles between each pair of models (symmetric)."""
    models, _, games = _pair_matrices(battles, bothbad)
    return pd.DataFrame(games, index=models, columns=models).reindex(index=order, columns=order)


def win_rate_matrix(battles: pd.DataFrame, order: list[str] | None = None,
                    bothbad: BothBad = "tie") -> pd.DataFrame:
    """Row model's share of points against the column model (ties half); NaN where they never met."""
    models, wins, games = _pair_matrices(battles, bothbad)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(games > 0, wins / games, np.nan)
    return pd.DataFrame(rate, index=models, columns=models).reindex(index=order, columns=order)


def heatmap(matrix: pd.DataFrame, title: str, fmt: str = "{:.2f}", cmap: str = "Blues",
            vmin: float | None = None, vmax: float | None = None):
    """A matplotlib figure of a model x model matrix with the values written in the cells."""
    # A bare Figure, not pyplot: a long-running arena would otherwise keep every figure alive.
    from matplotlib.figure import Figure

    n = len(matrix)
    fig = Figure(figsize=(max(5.0, 2.5 + 0.6 * n), max(4.0, 2.0 + 0.5 * n)))
    ax = fig.subplots()
    image = ax.imshow(matrix.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), matrix.index)
    ax.set_xlabel("opponent")
    ax.set_ylabel("model")
    ax.set_title(title)
    if n <= 20:
        for (r, c), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
            if not np.isnan(value):
                ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plots(battles: pd.DataFrame, order: list[str], bothbad: BothBad = "tie") -> dict[str, object]:
    """The leaderboard's figures, models in `order` (best first): file stem -> figure."""
    return {
        "win_rate": heatmap(win_rate_matrix(battles, order, bothbad), "Win rate against the opponent (ties: half)",
                            cmap="RdBu", vmin=0, vmax=1),
        "battles": heatmap(battle_count_matrix(battles, order, bothbad), "Battles per pair", fmt="{:.0f}"),
    }
