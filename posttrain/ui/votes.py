"""Votes in the store's `battles` table: writing one (durably, before the UI says so) and
reading them back: as a DataFrame for exports, or, for ratings over a million votes, as counts
per (model_a, model_b, vote) from the database plus a stream of the votes in order.

Sources: "arena" (anonymous battles), "side-by-side" (the user chose the models, so the names
were known when voting) and "judge:<model>" (MT-Bench pairwise verdicts written by the
evaluator). A source filter is one of those, "judge" (any judge), "human" (arena and
side-by-side) or "all". A mode filter (`thinking`) keeps the battles whose two sides ran with
thinking on (True) or off (False); None keeps all, those with no mode recorded included.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Iterator

import pandas as pd
from sqlalchemy import and_, func, or_, select, true

from posttrain.errors import PosttrainError
from posttrain.store import Battle, Store, utcnow

HUMAN_SOURCES = ("arena", "side-by-side")
MODE_FILTERS = {"on": True, "off": False}
VOTE_LABELS = {"a": "A is better", "b": "B is better", "tie": "tie", "bothbad": "both are bad"}


def record_vote(store: Store, *, session_hash: str, model_a: str, model_b: str,
                conversation_a: list[dict[str, Any]], conversation_b: list[dict[str, Any]], vote: str,
                source: str = "arena", created_at: datetime | None = None,
                regenerated: dict[str, list[Any]] | None = None, thinking: bool | None = None) -> Battle:
    """Write one battle and commit it (SQLite: WAL with synchronous=FULL) before returning, so a
    vote the user saw acknowledged survives the process dying right after. `regenerated` and
    `thinking`: see `Battle`."""
    if vote not in VOTE_LABELS:
        raise PosttrainError(f"unknown vote {vote!r} (one of {', '.join(VOTE_LABELS)})")
    row = Battle(session_hash=session_hash, model_a=model_a, model_b=model_b, conversation_a=conversation_a,
                 conversation_b=conversation_b, vote=vote, source=source, regenerated=regenerated,
                 thinking=thinking, created_at=created_at or utcnow(), voted_at=utcnow())
    return store.add(row)


def mode_filter(mode: str | None) -> bool | None:
    """A mode filter from its name: "on" / "off" (`--thinking`, the Leaderboard tab's selector);
    None or "all": every battle."""
    if mode in (None, "", "all"):
        return None
    if mode not in MODE_FILTERS:
        raise PosttrainError(f"thinking mode {mode!r}: expected on, off or all")
    return MODE_FILTERS[mode]


def _source_filter(source: str):
    if source == "all":
        return true()
    if source == "human":
        return Battle.source.in_(HUMAN_SOURCES)
    return or_(Battle.source == source, Battle.source.startswith(source + ":"))


def _filter(source: str, thinking: bool | None):
    """The WHERE clause of a source and a mode filter."""
    where = _source_filter(source)
    return where if thinking is None else and_(where, Battle.thinking.is_(thinking))


def load_battles(store: Store, source: str = "arena", since: datetime | None = None,
                 until: datetime | None = None, models: Iterable[str] = (),
                 conversations: bool = False, thinking: bool | None = None) -> pd.DataFrame:
    """Battles in the order they were voted. `models` keeps battles where either side is one of
    them; `conversations=False` skips the message lists (all ratings need, and much faster)."""
    columns = [Battle.id, Battle.model_a, Battle.model_b, Battle.vote, Battle.source, Battle.thinking,
               Battle.session_hash, Battle.created_at, Battle.voted_at]
    if conversations:
        columns += [Battle.conversation_a, Battle.conversation_b, Battle.regenerated]
    stmt = select(*columns).where(_filter(source, thinking)).order_by(Battle.voted_at, Battle.id)
    if since is not None:
        stmt = stmt.where(Battle.voted_at >= since)
    if until is not None:
        stmt = stmt.where(Battle.voted_at < until)
    models = list(models)
    if models:
        stmt = stmt.where(or_(Battle.model_a.in_(models), Battle.model_b.in_(models)))
    with store.session() as s:
        rows = s.execute(stmt).all()
    return pd.DataFrame(rows, columns=[c.key for c in columns])


def pair_counts(store: Store, source: str = "arena", thinking: bool | None = None) -> dict[frozenset[str], int]:
    """How many battles each pair of models has had (either order)."""
    stmt = (select(Battle.model_a, Battle.model_b, func.count()).where(_filter(source, thinking))
            .group_by(Battle.model_a, Battle.model_b))
    counts: dict[frozenset[str], int] = {}
    with store.session() as s:
        for a, b, n in s.execute(stmt):
            key = frozenset((a, b))
            counts[key] = counts.get(key, 0) + n
    return counts


def newest_battle_id(store: Store) -> int | None:
    """The highest battle id: reads that stop there see the same votes however many come in
    meanwhile (ids grow with every vote)."""
    with store.session() as s:
        return s.scalar(select(func.max(Battle.id)))


def _up_to(stmt, source: str, last_id: int | None, thinking: bool | None):
    stmt = stmt.where(_filter(source, thinking))
    return stmt if last_id is None else stmt.where(Battle.id <= last_id)


def vote_counts(store: Store, source: str = "arena", last_id: int | None = None,
                thinking: bool | None = None) -> pd.DataFrame:
    """Battles per (model_a, model_b, vote) as columns model_a, model_b, vote, n: all that
    Bradley-Terry, its bootstrap and the matrices need, counted by the database. `last_id`: see
    newest_battle_id."""
    # vote first: SQLite would otherwise walk ix_battles_model_a and fetch every row out of
    # order (slower than a scan); PostgreSQL hashes the groups in any order.
    stmt = (select(Battle.model_a, Battle.model_b, Battle.vote, func.count())
            .group_by(Battle.vote, Battle.model_a, Battle.model_b))
    with store.session() as s:
        rows = s.execute(_up_to(stmt, source, last_id, thinking)).all()
    return pd.DataFrame(rows, columns=["model_a", "model_b", "vote", "n"])


def iter_votes(store: Store, source: str = "arena", last_id: int | None = None,
               batch: int = 10_000, thinking: bool | None = None) -> Iterator[tuple[str, str, str]]:
    """(model_a, model_b, vote) of each battle in the order they were voted (load_battles'
    order), fetched up to `batch` rows at a time (a server-side cursor on PostgreSQL): online
    Elo needs the order but never the whole table in memory. `last_id`: see newest_battle_id."""
    stmt = select(Battle.model_a, Battle.model_b, Battle.vote).order_by(Battle.voted_at, Battle.id)
    with store.engine.connect() as conn:
        options = conn.execution_options(stream_results=True, max_row_buffer=batch)
        yield from options.execute(_up_to(stmt, source, last_id, thinking))
