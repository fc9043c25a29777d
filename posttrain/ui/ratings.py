"""Ratings from pairwise votes: online Elo, Bradley-Terry MLE with bootstrap CIs, and the
win-rate / battle-count matrices behind the leaderboard plots.

Everything starts from the aggregate: a million votes over 50 models collapse to at most
50*49*3 (pair, outcome) counts, so the BT fit is a Newton solve on a 50x50 system and a bootstrap
round is a multinomial draw of those counts instead of a resample of a million rows; all rounds
are fitted together as one batched Newton solve. The same counts can come straight from the
database (`stored_leaderboard`: a GROUP BY), which leaves only online Elo reading every vote,
streamed in order.

Votes: "a" / "b" are wins, "tie" is half a win for each side. "bothbad" says neither reply was
good, which carries no preference between the two; by default it counts as a tie (as FastChat
does: two equally bad replies are evidence the models are close), `bothbad="drop"` ignores it.
A battle of a model against itself tells nothing about ratings and is skipped. BT adds one
virtual tie per model against a 1000-rated reference (`prior`), which keeps a young arena's
ratings finite and sane and fades away as votes accumulate.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal

import numpy as np
import pandas as pd

from posttrain.errors import PosttrainError

if TYPE_CHECKING:
    from posttrain.store import Store

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
    n: np.ndarray | None = None  # battles each row stands for (counted rows); None: one each


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
    """Check and encode battles (columns model_a, model_b, vote, and n where a row stands for n
    battles, as vote_counts returns them), dropping self-battles."""
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
    weights = battles["n"].to_numpy(dtype=np.float64)[keep] if "n" in battles.columns else None
    return Votes(list(models), codes[:n], codes[n:], np.minimum(vote[keep], 2).astype(np.int64), weights)


def aggregate(votes: Votes) -> Outcomes:
    m = len(votes.models)
    counts = np.bincount((votes.a * m + votes.b) * 3 + votes.code, weights=votes.n, minlength=m * m * 3)
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


def _online_elo(votes: Iterable[tuple[str, str, str]], k: float, bothbad: BothBad) -> dict[str, float]:
    """Elo after (model_a, model_b, vote) rows, taken one at a time so that they can stream from
    the database. Unknown votes are skipped here: encode rejects them."""
    score = {"a": 1.0, "b": 0.0, "tie": 0.5, "bothbad": 0.5 if bothbad == "tie" else None}
    rating: dict[str, float] = {}
    # Inherently sequential; plain Python floats keep a million updates around half a second.
    for a, b, vote in votes:
        s = score.get(vote)
        if s is None or a == b:
            continue
        ra, rb = rating.get(a, ANCHOR), rating.get(b, ANCHOR)
        delta = k * (s - 1.0 / (1.0 + 10.0 ** ((rb - ra) / SCALE)))
        rating[a] = ra + delta
        rating[b] = rb - delta
    return rating


def _rows(battles: pd.DataFrame) -> Iterable[tuple[str, str, str]]:
    return zip(battles["model_a"].tolist(), battles["model_b"].tolist(), battles["vote"].tolist())


def online_elo(battles: pd.DataFrame, k: float = 4.0, bothbad: BothBad = "tie") -> pd.Series:
    """Sequential Elo in the order of the rows (sort by voted_at first), everyone starting at
    1000. K=4 is FastChat's choice for an arena with many votes; raise it for a young arena."""
    models = encode(battles, bothbad).models
    rating = _online_elo(_rows(battles), k, bothbad)
    return pd.Series([rating[m] for m in models], index=models, name="elo", dtype=np.float64)


LEADERBOARD_COLUMNS = ["rank", "model", "elo", "bt", "bt_lo", "bt_hi", "battles", "provisional"]
# Below this many battles a model's interval is too wide to rank it (one lucky vote put a new
# model first, 1166 with an interval of 1000-1285, above models with 40 battles each).
MIN_BATTLES = 10


def interval_ranks(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """LMArena's rank: 1 + the number of models whose lower bound exceeds this one's upper
    bound, i.e. that are better beyond doubt. Models whose intervals overlap share a rank."""
    return 1 + (lo[None, :] > hi[:, None]).sum(axis=1)


def _board(o: Outcomes, elo: dict[str, float], rounds: int, seed: int, prior: float,
           min_battles: int) -> pd.DataFrame:
    bt = _ratings(o, o.count, prior)
    lo, hi = np.percentile(bootstrap_bradley_terry(o, rounds, seed, prior), [2.5, 97.5], axis=0) if rounds else (bt, bt)
    sides = np.concatenate([o.i, o.j])
    battles = np.bincount(sides, weights=np.tile(o.count, 2), minlength=o.size).astype(np.int64)
    provisional = battles < min_battles
    # Ranked among the well-measured models only: a provisional model's wide interval says
    # little, and it must not push anyone down (or up) by chance.
    rank = pd.array([pd.NA] * o.size, dtype="Int64")
    rank[~provisional] = interval_ranks(lo[~provisional], hi[~provisional])
    table = pd.DataFrame({
        # Only votes committed out of id order between the two reads (PostgreSQL) can leave a
        # model out of `elo`: it starts at the anchor.
        "rank": rank, "model": o.models, "elo": [elo.get(m, ANCHOR) for m in o.models], "bt": bt,
        "bt_lo": lo, "bt_hi": hi, "battles": battles, "provisional": provisional,
    })
    return table.sort_values(["provisional", "rank", "bt"], ascending=[True, True, False], ignore_index=True)


def _empty_board() -> pd.DataFrame:
    return pd.DataFrame(columns=LEADERBOARD_COLUMNS)


def leaderboard(battles: pd.DataFrame, k: float = 4.0, rounds: int = 100, bothbad: BothBad = "tie",
                seed: int = 0, prior: float = PRIOR, min_battles: int = MIN_BATTLES) -> pd.DataFrame:
    """One row per model: its rank by interval (`interval_ranks`), online Elo, Bradley-Terry
    rating with its bootstrap 95% interval (bt_lo, bt_hi), the number of battles counted, and
    whether that is under `min_battles` (provisional: no rank, listed after the ranked models).
    Ranked models come first by rank, then rating. Input columns: model_a, model_b, vote (in
    the order the votes were cast)."""
    o = aggregate(encode(battles, bothbad))
    if not o.models:
        return _empty_board()
    return _board(o, _online_elo(_rows(battles), k, bothbad), rounds, seed, prior, min_battles)


def stored_leaderboard(store: Store, source: str = "arena", k: float = 4.0, rounds: int = 100,
                       bothbad: BothBad = "tie", seed: int = 0, prior: float = PRIOR,
                       min_battles: int = MIN_BATTLES,
                       thinking: bool | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`leaderboard(load_battles(store, source, thinking=thinking))` without loading the battles:
    the database counts them per (model_a, model_b, vote) for Bradley-Terry and the bootstrap,
    and only online Elo streams the votes, in the same order. Same table, the same bootstrap
    draws for the same seed. Also returns the counts (vote_counts), which `plots` takes as
    battles. `thinking`: only the battles run in that mode (None: all)."""
    from posttrain.ui.votes import iter_votes, newest_battle_id, vote_counts

    last_id = newest_battle_id(store)
    # The database counts while this thread streams Elo: both drivers let go of the GIL while
    # a query runs, so on two cores the count costs no time (SQLite sorts a million rows for it).
    with ThreadPoolExecutor(1) as pool:
        counting = pool.submit(vote_counts, store, source, last_id, thinking)
        elo = _online_elo(iter_votes(store, source, last_id, thinking=thinking), k, bothbad)
        counts = counting.result()
    o = aggregate(encode(counts, bothbad))
    if not o.models:
        return _empty_board(), counts
    return _board(o, elo, rounds, seed, prior, min_battles), counts


# What the three views (the arena's Leaderboard tab, `posttrain arena leaderboard`, the nightly
# report) show: the same columns, worded for people, from `readable`.
DISPLAY_COLUMNS = ["Rank", "Model", "Rating", "95% CI", "Battles", "Online Elo"]
NOT_RANKED = "–"


def plus_minus(rating: float, lo: float, hi: float) -> str:
    """A 95% interval as whole points around the rating, "+x / -y" as LMArena writes it:
    decimals of a bootstrap percentile are noise."""
    return f"+{round(hi - rating)} / -{round(rating - lo)}"


def readable(board: pd.DataFrame) -> pd.DataFrame:
    """A `leaderboard` table as people read it, in the same order: human column names, whole
    numbers, the interval as "+x / -y", and provisional models unranked and marked."""
    rows = [(NOT_RANKED if b.provisional else str(b.rank), f"{b.model} (provisional)" if b.provisional else b.model,
             round(b.bt), plus_minus(b.bt, b.bt_lo, b.bt_hi), int(b.battles), round(b.elo))
            for b in board.itertuples()]
    return pd.DataFrame(rows, columns=DISPLAY_COLUMNS)


def board_notes(board: pd.DataFrame, min_battles: int) -> list[str]:
    """How to read the table, one sentence a line; the provisional one only when it applies."""
    notes = ["Rating: Bradley-Terry on the Elo scale (mean 1000), with its 95% bootstrap interval. "
             "Rank: 1 + the number of models whose interval lies wholly above this one's, "
             "so models whose intervals overlap share a rank."]
    if board["provisional"].any():
        notes.append(f"Provisional: fewer than {min_battles} battles, too few to rank; listed last.")
    return notes


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


# Longer model names crowd the heatmaps' axes out of the figure: the ticks then show short
# labels, explained by a legend under the plot.
LABEL_CHARS = 12


def axis_labels(models: list[str]) -> tuple[list[str], list[str]]:
    """Tick labels for `models`, and the legend lines that explain them (none if the names fit)."""
    if all(len(m) <= LABEL_CHARS for m in models):
        return list(models), []
    labels = [f"M{i}" for i in range(1, len(models) + 1)]
    return labels, [f"{label}  {model}" for label, model in zip(labels, models)]


def heatmap(matrix: pd.DataFrame, title: str, fmt: str = "{:.2f}", cmap: str = "Blues",
            vmin: float | None = None, vmax: float | None = None):
    """A matplotlib figure of a model x model matrix with the values written in the cells. Its
    layout engine fits titles, ticks and the legend inside the figure even when saved without
    bbox_inches="tight" (as Gradio does)."""
    # A bare Figure, not pyplot: a long-running arena would otherwise keep every figure alive.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(matrix)
    labels, legend = axis_labels(list(matrix.index))
    long_ticks = max(map(len, labels), default=0) > 3
    # Cells of about half an inch, a 6-inch minimum so that the title fits, and a line per legend entry.
    size = max(6.0, 1.5 + 0.5 * n)
    fig = Figure(figsize=(size, size * 0.8 + 0.22 * len(legend) + (0.1 * LABEL_CHARS if long_ticks else 0)),
                 layout="constrained")
    ax = fig.subplots()
    values = matrix.to_numpy(dtype=float)
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n), labels, rotation=45 if long_ticks else 0, ha="right" if long_ticks else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("opponent")
    ax.set_ylabel("model")
    ax.set_title(title)
    if n <= 20:
        for (r, c), value in np.ndenumerate(values):
            if not np.isnan(value):
                red, green, blue, _ = image.cmap(image.norm(value))  # white text on dark cells
                ink = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black"
                ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize=9, color=ink)
    fig.colorbar(image, ax=ax, shrink=0.8)
    if legend:
        fig.legend([Patch(visible=False)] * n, legend, loc="outside lower left", handlelength=0, handletextpad=0,
                   frameon=False, fontsize=9, title="Models", alignment="left")
    return fig


def plots(battles: pd.DataFrame, order: list[str], bothbad: BothBad = "tie") -> dict[str, object]:
    """The leaderboard's figures, models in `order` (best first): file stem -> figure. `battles`
    as for `encode`: one row per battle, or counted rows from vote_counts."""
    return {
        "win_rate": heatmap(win_rate_matrix(battles, order, bothbad), "Win rate against each opponent "
                            "(ties: half)", fmt="{:.0%}", cmap="RdBu", vmin=0, vmax=1),
        "battles": heatmap(battle_count_matrix(battles, order, bothbad), "Battles per pair", fmt="{:.0f}"),
    }
