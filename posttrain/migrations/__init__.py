"""Schema migrations with Alembic, run from Python: no alembic.ini, no separate tool.

`upgrade(url)` brings a database to the newest revision this posttrain knows. `Store` runs it
whenever it opens a database and `posttrain db upgrade` runs it on demand. A SQLite file is
copied (SQLite's online backup) before anything changes; migrations are forward-only, so that
copy is the way back. A database posttrain made before migrations (`create_all` plus a
`meta.schema_version` row, no `alembic_version` table) is revision 0001 and is stamped so.

Revisions live in versions/, written by hand with portable operations (SQLite and PostgreSQL);
tests/test_migrations.py checks that the newest one matches `posttrain.store`'s models.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from posttrain.errors import PosttrainError

HERE = Path(__file__).parent
BEFORE_MIGRATIONS = "0001"  # what a database made by posttrain's `create_all` is


@dataclass
class Upgrade:
    """What `upgrade` did: revisions before (None: an empty database) and after, and the copy
    of the SQLite file taken first (None when nothing changed or it is not a file)."""

    url: str
    before: str | None
    after: str
    backup: Path | None = None

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def __str__(self) -> str:
        if not self.changed:
            return f"the database {self.url} is at revision {self.after}, the newest; nothing to do"
        if self.before is None:
            return f"created the schema in {self.url} (revision {self.after})"
        backup = f"; the old file is kept as {self.backup}" if self.backup else ""
        return f"upgraded the database {self.url} from revision {self.before} to {self.after}{backup}"


def revisions() -> list[str]:
    """The revisions this posttrain knows, oldest first. They are numbered 0001, 0002, ... and
    their files named after the number (tests/test_migrations.py checks it), so this needs no
    Alembic import: that would add ~0.3 s to every CLI call, and most of them open the store."""
    return sorted(p.name[:4] for p in (HERE / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def upgrade(database: str | Engine, backup: bool = True) -> Upgrade:
    """Bring `database` (a SQLAlchemy URL, or an engine to check with) to the newest revision.
    One process upgrades at a time; the others wait and find nothing left to do."""
    engine = sa.create_engine(database, poolclass=NullPool) if isinstance(database, str) else database
    shown = engine.url.render_as_string(hide_password=True)
    known = revisions()
    newest = known[-1]
    try:
        with engine.connect() as conn:
            current = _revision(conn)
        if current == newest:
            return Upgrade(shown, current, newest)
        if current is not None and current not in known:
            raise PosttrainError(f"the database {shown} is at schema revision {current}, newer than this posttrain "
                                 f"understands (up to {newest}); upgrade posttrain")
        return _upgrade_locked(engine.url, shown, newest, backup)
    except OperationalError as exc:
        raise PosttrainError(f"cannot open the database {shown}: {exc.orig}") from None
    finally:
        if isinstance(database, str):
            engine.dispose()


def _revision(conn: Connection) -> str | None:
    """The database's revision: Alembic's record of it, 0001 for a database made before
    migrations, None for an empty one."""
    tables = sa.inspect(conn)
    if tables.has_table("alembic_version"):
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    return BEFORE_MIGRATIONS if tables.has_table("meta") else None


def _upgrade_locked(url: sa.URL, shown: str, head: str, backup: bool) -> Upgrade:
    from alembic import command

    engine = _locking_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7242135)")  # any constant shared by posttrains
            result = Upgrade(shown, _revision(conn), head)  # again: another process may have just upgraded
            if not result.changed:
                return result
            if backup and result.before is not None:
                result.backup = _backup_sqlite(url, result.before)
            config = alembic_config(conn)
            if result.before == BEFORE_MIGRATIONS:
                command.stamp(config, BEFORE_MIGRATIONS)
            command.upgrade(config, "head")
    finally:
        engine.dispose()
    return result


def alembic_config(conn: Connection):
    """Alembic's configuration for running this package's revisions on `conn` (tests step a
    database through single revisions with it)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = conn
    return config


def _locking_engine(url: sa.URL) -> Engine:
    """An engine whose transactions hold the database for the whole upgrade. pysqlite would
    commit around DDL and only lock at the first write; here BEGIN IMMEDIATE takes SQLite's
    write lock at the start and the DDL stays inside the transaction."""
    engine = sa.create_engine(url, poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _manual_transactions(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA busy_timeout=60000")  # wait for another process's upgrade

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


def add_column_once(table: str, column: sa.Column) -> None:
    """For revisions adding a column that a development build between 0001 and migrations may
    already have made with `create_all` (such a database is stamped 0001 all the same)."""
    from alembic import op

    if column.name not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}:
        op.add_column(table, column)


def _backup_sqlite(url: sa.URL, revision: str) -> Path | None:
    """A consistent copy of a SQLite file (what its WAL holds included) beside it:
    `posttrain.db.0001.bak`, then `.0001.2.bak`, ... (an earlier copy is never overwritten)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    source = Path(url.database)
    target, n = source.with_name(f"{source.name}.{revision}.bak"), 1
    while target.exists():
        n += 1
        target = source.with_name(f"{source.name}.{revision}.{n}.bak")
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
    return target
