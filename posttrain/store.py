"""The one schema for everything posttrain persists, and how to open it.

SQLite (WAL) under POSTTRAIN_HOME by default; any SQLAlchemy URL (Postgres for a shared
deployment) through POSTTRAIN_DB_URL. Migrations are deliberately simple: `create_all` adds
missing tables, and a schema-version row makes an older posttrain refuse a newer database
instead of silently misreading it.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from posttrain.errors import PosttrainError

SCHEMA_VERSION = 1


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
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    voted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class RequestLog(Base):
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


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the arena, the server and the evaluator write concurrently; FULL sync makes a
    # vote acknowledged to a user survive the process being killed right after.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Store:
    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._migrate()

    def _migrate(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as exc:
            raise PosttrainError(f"cannot open the database {self.url}: {exc.orig}") from None
        with self.session() as s:
            row = s.get(Meta, "schema_version")
            if row is None:
                s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise PosttrainError(
                    f"the database {self.url} has schema version {row.value}, newer than this "
                    f"posttrain understands ({SCHEMA_VERSION}); upgrade posttrain"
                )

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
