"""Schema migrations (Alembic): revision 0001 is exactly the schema posttrain made before
migrations, the newest matches the models, and a database from before migrations (the fixture,
built by that schema with rows in every table) upgrades with nothing lost."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
import sqlalchemy as sa

from posttrain.errors import PosttrainError
from posttrain.migrations import HERE, alembic_config, revisions, upgrade
from posttrain.store import Base, Store

FIXTURES = Path(__file__).parent / "fixtures"
BEFORE = FIXTURES / "before_migrations.db"


def rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table the fixture has, in the columns it has."""
    with closing(sqlite3.connect(BEFORE)) as before, closing(sqlite3.connect(path)) as db:
        tables = [t for (t,) in before.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {t: [c for (_, c, *_) in before.execute(f"PRAGMA table_info({t})")] for t in tables}
        return {t: db.execute(f"SELECT {', '.join(columns[t])} FROM {t} ORDER BY 1").fetchall() for t in tables}


def schema(path: Path) -> list[tuple]:
    with closing(sqlite3.connect(path)) as db:
        return sorted(db.execute("SELECT type, name, sql FROM sqlite_master WHERE tbl_name != 'alembic_version'"))


@pytest.fixture
def old_db(tmp_path) -> Path:
    copy = tmp_path / "posttrain.db"
    shutil.copy(BEFORE, copy)
    return copy


def test_revisions_are_one_line_numbered_like_their_files():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(HERE))
    chain = [r for r in reversed(list(script.walk_revisions()))]
    assert [r.revision for r in chain] == revisions() == [f"{i:04d}" for i in range(1, len(chain) + 1)]
    assert [r.down_revision for r in chain] == [None, *revisions()[:-1]]
    assert all(Path(r.path).name.startswith(r.revision + "_") for r in chain)


def test_revision_0001_is_the_schema_before_migrations(tmp_path):
    from alembic import command

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'r1.db'}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    assert schema(tmp_path / "r1.db") == schema(BEFORE)


def test_the_newest_revision_matches_the_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    store = Store(db_url)
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata) == []


def test_a_database_from_before_migrations_upgrades_with_nothing_lost(old_db, caplog):
    before = rows(old_db)
    assert all(before[t] for t in before) and len(before) == 6  # the fixture has rows in every table
    Store(f"sqlite:///{old_db}")
    # Only the version a posttrain from before migrations reads changed: it now refuses the file.
    assert rows(old_db) == before | {"meta": [("arena_roster", '["base-lora-merged"]'), ("schema_version", "2")]}
    assert f"upgraded the database sqlite:///{old_db} from revision 0001 to {revisions()[-1]}" in caplog.text
    backup = old_db.with_name("posttrain.db.0001.bak")
    assert rows(backup) == before and schema(backup) == schema(BEFORE)
    Store(f"sqlite:///{old_db}")  # nothing left to do: no second backup
    assert sorted(p.name for p in old_db.parent.glob("*.bak")) == ["posttrain.db.0001.bak"]


@pytest.fixture(scope="module")
def old_store():
    """posttrain's store module from before migrations, from git (see the fixture's maker)."""
    sys.path.insert(0, str(FIXTURES))
    try:
        from make_before_migrations_db import old_store

        return old_store()
    except subprocess.CalledProcessError:
        pytest.skip("the commit from before migrations is not in this clone's history")
    finally:
        sys.path.remove(str(FIXTURES))


def test_the_posttrain_from_before_migrations_refuses_an_upgraded_database(old_db, old_store):
    Store(f"sqlite:///{old_db}")
    with pytest.raises(PosttrainError, match="schema version 2, newer than this posttrain understands"):
        old_store.Store(f"sqlite:///{old_db}")


def test_a_postgres_database_from_before_migrations_upgrades_with_nothing_lost(postgres, old_store):
    def contents(engine: sa.Engine) -> dict[str, list]:
        """Every table as the store before migrations saw it (its columns, its types)."""
        with engine.connect() as conn:
            return {t.name: conn.execute(t.select().order_by(*t.primary_key)).all()
                    for t in old_store.Base.metadata.sorted_tables}

    fixture = contents(sa.create_engine(f"sqlite:///{BEFORE}"))
    url = postgres.database()
    old = old_store.Store(url)  # create_all and the schema_version row, as posttrain did then
    with old.engine.begin() as conn:
        conn.execute(sa.delete(old_store.Meta))
        for table in old_store.Base.metadata.sorted_tables:
            conn.execute(table.insert(), [row._asdict() for row in fixture[table.name]])
    old.engine.dispose()
    Store(url)
    after = contents(sa.create_engine(url))
    assert after.pop("meta") == [("arena_roster", '["base-lora-merged"]'), ("schema_version", "2")]
    assert after == {name: rows for name, rows in fixture.items() if name != "meta"}


def test_processes_opening_an_old_database_at_once_upgrade_it_once(old_db):
    code = "import sys; from posttrain.store import Store; Store(sys.argv[1])"

    def open_store(_):
        return subprocess.run([sys.executable, "-c", code, f"sqlite:///{old_db}"], capture_output=True, text=True,
                              timeout=300)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(open_store, range(3)))
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert sum("upgraded the database" in r.stderr for r in results) == 1
    assert [p.name for p in old_db.parent.glob("*.bak")] == ["posttrain.db.0001.bak"]


def test_a_newer_database_is_refused_in_one_line(db_url):
    url = db_url
    store = Store(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0999'")
    with pytest.raises(PosttrainError, match="revision 0999, newer than this posttrain understands"):
        Store(url)
    done = cli("db", "upgrade", "--url", url)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "upgrade posttrain" in done.stderr


def test_db_upgrade_cli(old_db):
    done = cli("db", "upgrade", "--url", f"sqlite:///{old_db}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"upgraded the database sqlite:///{old_db} from revision 0001 to "
                                   f"{revisions()[-1]}; the old file is kept as {old_db}.0001.bak")
    again = cli("db", "upgrade", "--url", f"sqlite:///{old_db}")
    assert again.stdout.strip().endswith("the newest; nothing to do")


def test_a_database_that_cannot_be_opened_is_one_line(tmp_path):
    with pytest.raises(PosttrainError, match="cannot open the database"):
        upgrade(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True,
                          env=os.environ, timeout=300)
