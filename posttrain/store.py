"""The one schema for everything posttrain persists, and how to open it.

SQLite (WAL) under POSTTRAIN_HOME by default; any SQLAlchemy URL (Postgres for a shared
deployment) through POSTTRAIN_DB_URL. Opening a database brings its schema up to date with the
Alembic revisions in `posttrain.migrations` (a changed model here needs a new revision there),
and an older posttrain refuses a newer database instead of silently misreading it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from posttrain.errors import PosttrainError
from posttrain.migrations import upgrade

log = logging.getLogger("posttrain.store")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Checkpoint(Base):
    """A model folder and where it came from. `kind` is "full" or "adapter"; an adapter's
    parent is the full checkpoint it loads on top of."""

    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), default="full")
    stage: Mapped[str] = mapped_column(String(32))
    parent: Mapped[str | None] = mapped_column(String(200), nullable=True)
    recipe: Mapped[dict[str, Any]] = mapped_column(default=dict)
    datasets: Mapped[list[Any]] = mapped_column(default=list)
    git_commit: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # How the model reasons before it answers: None (it does not), "qwen3" (a <think> block it can
    # switch off: enable_thinking, /no_think) or "deepseek_r1" (always). See `detect_thinking`.
    thinking: Mapped[str | None] = mapped_column(String(32), nullable=True)


class EvalRun(Base):
    __tablename__ = "eval_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    suite: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    lineage: Mapped[list[Any]] = mapped_column(default=list)
    harness_version: Mapped[str] = mapped_column(String(64), default="")
    samples_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class EvalScore(Base):
    __tablename__ = "eval_scores"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    task: Mapped[str] = mapped_column(String(200))
    metric: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    stderr: Mapped[float | None] = mapped_column(Float, nullable=True)
    n: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Battle(Base):
    """One arena round: both conversations as OpenAI message lists and the human's verdict
    ("a", "b", "tie", "bothbad"); `source` tells arena votes from judge verdicts."""

    __tablename__ = "battles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), index=True)
    model_a: Mapped[str] = mapped_column(String(200), index=True)
    model_b: Mapped[str] = mapped_column(String(200), index=True)
    conversation_a: Mapped[list[Any]] = mapped_column(default=list)
    conversation_b: Mapped[list[Any]] = mapped_column(default=list)
    vote: Mapped[str] = mapped_column(String(16))
    # "arena", "side-by-side" or "judge:" + a model name (up to 200 characters, like model_a).
    source: Mapped[str] = mapped_column(String(206), default="arena")
    # Arena: replies the user replaced with Regenerate on the voted turn, {"a": [...], "b": [...]}
    # (oldest first, sides without any left out): each a weak rejected against that side's last
    # reply. Assistant messages, with the trace of a reply that thought in `reasoning` (stored
    # before revision 0006: the reply's text alone). None when nothing was regenerated.
    regenerated: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    # The mode both sides ran in: True (thinking), False (not thinking); None where nobody
    # recorded it (battles before revision 0006, imports, judge verdicts).
    thinking: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    voted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class RequestLog(Base):
    """One harvested answer: the request body as sent (never the API key or the client's
    address), one choice's completion, and the engine's response id that feedback refers to."""

    __tablename__ = "request_logs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    completion: Mapped[str] = mapped_column(Text, default="")
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # The engine's `id` (chatcmpl-..., cmpl-...), shared by the rows of one request's n choices;
    # None on rows harvested before feedback existed.
    response_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    choice: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # sha256 of the prompt (messages or text), so answers to the same prompt can be paired.
    prompt_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A thinking model's trace, apart from the answer in `completion` (vLLM's reasoning parser
    # split them); "" when a thinking model answered with thinking off (its prompt ended in the
    # template's empty think block); None when no thinking was involved.
    reasoning: Mapped[str | None] = mapped_column(Text, nullable=True)


class Feedback(Base):
    """A rating (1 or -1) and/or a correction of one harvested answer, from one API key (kept as
    its sha256, never the key): at most one per answer and key."""

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("request_log_id", "key_hash", name="uq_feedback_request_log_id_key_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_log_id: Mapped[int] = mapped_column(ForeignKey("request_logs.id", ondelete="CASCADE"), index=True)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the arena, the server and the evaluator write concurrently; FULL sync makes a
    # vote acknowledged to a user survive the process being killed right after.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _open(url: str) -> Engine:
    """An engine on `url` whose server answers. What goes wrong is one line naming the URL
    without its password: a mistyped POSTTRAIN_DB_URL, a missing driver and a server that is
    down are the user's to fix, and libpq's messages run over several lines."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        raise PosttrainError("the database URL is not a SQLAlchemy URL "
                             "(dialect://user:password@host:port/database, e.g. postgresql://...)") from None
    try:
        engine = create_engine(url, future=True)
    except NoSuchModuleError as exc:
        raise PosttrainError(f"cannot open the database {shown}: {exc}") from None
    except ImportError as exc:
        raise PosttrainError(f"cannot open the database {shown}: its driver is not installed ({exc}; "
                             "for PostgreSQL: pip install 'posttrain[postgres]')") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        reason = " ".join(str(exc.orig).split())
        raise PosttrainError(f"cannot connect to the database {shown}: {reason}") from None
    return engine


class Store:
    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = _open(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        done = upgrade(self.engine)
        if done.changed and done.before is not None:
            log.warning("posttrain: %s", done)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def add(self, row: Base) -> Base:
        with self.session() as s:
            s.add(row)
        return row

    def all(self, model: type[Base], *where, order_by=None) -> list:
        with self.session() as s:
            stmt = select(model).where(*where)
            if order_by is not None:
                stmt = stmt.order_by(order_by)
            return list(s.scalars(stmt))
