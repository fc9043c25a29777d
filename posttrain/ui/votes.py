"""Votes in the store's `battles` table: writing one (durably, before the UI says so) and
reading them back as a DataFrame for ratings and exports.

Sources: "arena" (anonymous battles), "side-by-side" (the user chose the models, so the names
were known when voting) and "judge:<model>" (MT-Bench pairwise verdicts written by the
evaluator). A source filter is one of those, "judge" (any judge), "human" (arena and
side-by-side) or "all".
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

import pandas as pd
from sqlalchemy import func, or_, select, true

from posttrain.errors import PosttrainError
from posttrain.store import Battle, Store, utcnow

HUMAN_SOURCES = ("arena", "side-by-side")
VOTE_LABELS = {"a": "A is better", "b": "B is better", "tie": "tie", "bothbad": "both are bad"}


def record_vote(store: Store, *, session_hash: str, model_a: str, model_b: str,
                conversation_a: list[dict[str, Any]], conversation_b: list[dict[str, Any]], vote: str,
                source: str = "arena", created_at: datetime | None = None) -> Battle:
    """Write one battle and commit it (SQLite: WAL with synchronous=FULL) before returning, so a
    vote the user saw acknowledged survives the process dying right after."""
    if vote not in VOTE_LABELS:
        raise PosttrainError(f"unknown vote {vote!r} (one of {', '.join(VOTE_LABELS)})")
    row = Battle(session_hash=session_hash, model_a=model_a, model_b=model_b, conversation_a=conversation_a,
                 conversation_b=conversation_b, vote=vote, source=source,
                 created_at=created_at or utcnow(), voted_at=utcnow())
    return store.add(row)


def _source_filter(source: str):
    if source == "all":
        return true()
    if source == "human":
        return Battle.source.in_(HUMAN_SOURCES)
    return or_(Battle.source == source, Battle.source.startswith(source + ":"))


def load_battles(store: Store, source: str = "arena", since: datetime | None = None,
                 until: datetime | None = None, models: Iterable[str] = (),
                 conversations: bool = False) -> pd.DataFrame:
    """Battles in the order they were voted. `models` keeps battles where either side is one of
    them; `conversations=False` skips the message lists (all ratings need, and much faster)."""
    columns = [Battle.id, Battle.model_a, Battle.model_b, Battle.vote, Battle.source, Battle.session_hash,
               Battle.created_at, Battle.voted_at]
    if conversations:
        columns += [Battle.conversation_a, Battle.conversation_b]
    stmt = select(*columns).where(_source_filter(source)).order_by(Battle.voted_at, Battle.id)
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


def pair_counts(store: Store, source: str = "arena") -> dict[frozenset[str], int]:
    """How many battles each pair of models has had (either order)."""
    stmt = (select(Battle.model_a, Battle.model_b, func.count()).where(_source_filter(source))
            .group_by(Battle.model_a, Battle.model_b))
    counts: dict[frozenset[str], int] = {}
    with store.session() as s:
        for a, b, n in s.execute(stmt):
            key = frozenset((a, b))
            counts[key] = counts.get(key, 0) + n
    return counts
