"""posttrain on a real PostgreSQL server (the session's throwaway one, see conftest.py): bad
database URLs, votes from two processes at once (the vote-writing function, and two real
`posttrain arena` processes driven with gradio_client), counted afterwards. The store, registry
and export tests run on PostgreSQL too, through the `db_url` fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from broken_door import BrokenDoor
from posttrain.errors import PosttrainError
from posttrain.store import Battle, Store
from test_arena import start_arena, stream

TESTS = Path(__file__).parent


@pytest.mark.parametrize("url, message", [
    ("postgresql://posttrain:s3cret@127.0.0.1:1/db",
     r"^cannot connect to the database postgresql://posttrain:\*\*\*@127\.0\.0\.1:1/db: connection failed: .*refused"),
    ("postgres://posttrain:s3cret@127.0.0.1/db",
     r"^cannot open the database postgres://posttrain:\*\*\*@127\.0\.0\.1/db: Can't load plugin"),
    ("posttrain:s3cret@127.0.0.1/db", r"^the database URL is not a SQLAlchemy URL"),
])
def test_a_database_that_cannot_be_opened_is_one_line_without_the_password(url, message):
    with pytest.raises(PosttrainError, match=message) as error:
        Store(url)
    assert "\n" not in str(error.value) and "s3cret" not in str(error.value)


def test_the_cli_names_an_unreachable_database_in_one_line(tmp_path):
    env = {**os.environ, "POSTTRAIN_HOME": str(tmp_path), "POSTTRAIN_DB_URL": "postgresql://u:s3cret@127.0.0.1:1/db"}
    done = subprocess.run([sys.executable, "-m", "posttrain", "models", "list"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("posttrain: error: cannot connect to the database postgresql://u:***@127.0.0.1:1/db")
    assert done.stderr.count("\n") == 1 and "s3cret" not in done.stderr


def test_a_plain_postgresql_url_uses_psycopg(postgres):
    store = Store(postgres.database())
    assert (store.engine.dialect.name, store.engine.dialect.driver) == ("postgresql", "psycopg")


def test_two_processes_writing_votes_at_once_lose_none(db_url):
    votes, threads = 150, 4
    writers = [subprocess.Popen([sys.executable, str(TESTS / "vote_writer.py"), db_url, tag, str(votes), str(threads)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for tag in ("one", "two")]
    try:
        for w in writers:  # both opened the (empty) database, i.e. both created or found its schema
            assert w.stdout.readline() == "ready\n"
        for w in writers:
            w.stdin.write("go\n")
            w.stdin.flush()
        results = [json.loads(w.communicate(timeout=600)[0]) for w in writers]
    finally:
        for w in writers:
            w.kill()
    assert [w.returncode for w in writers] == [0, 0]
    store = Store(db_url)
    ids = [i for r in results for i in r["ids"]]
    with store.session() as s:
        stored = set(s.scalars(select(Battle.id)))
        per_session = dict(s.execute(select(Battle.session_hash, func.count()).group_by(Battle.session_hash)).all())
    assert len(ids) == len(set(ids)) == len(stored) == 2 * threads * votes and set(ids) == stored
    assert per_session == {f"{tag}-{t}": votes for tag in ("one", "two") for t in range(threads)}
    seconds = max(r["seconds"] for r in results)
    print(f"{store.engine.dialect.name}: {len(ids)} votes from 2 processes x {threads} threads in {seconds:.1f} s "
          f"({len(ids) / seconds:.0f} votes/s), none lost")


@pytest.fixture(scope="module")
def broken_door():
    door = BrokenDoor()
    yield door
    door.stop()


def test_two_arena_processes_on_one_postgres_lose_no_votes(postgres, broken_door, tmp_path):
    url = postgres.database()
    arenas = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        arenas.append(start_arena(broken_door, tmp_path / name, db_url=url))
    clients_per_arena, turns = 3, 4
    errors: list[BaseException] = []
    clients = []

    def user(arena) -> None:
        try:
            client = arena.client()
            for turn in range(turns):
                stream(client.submit(f"Question {turn}?", "whole", "whole", api_name="/side_by_side_send"))
                client.predict(api_name="/side_by_side_vote_a")
            clients.append(client)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the arena's log
            errors.append(exc)

    try:
        users = [threading.Thread(target=user, args=(a,)) for a in arenas for _ in range(clients_per_arena)]
        for u in users:
            u.start()
        for u in users:
            u.join(timeout=600)
        assert not errors, (errors, [a.log.read_text() for a in arenas])
        assert [len(arenas[0].battles(c)) for c in clients] == [turns] * len(users)
        assert len(arenas[0].battles()) == len(users) * turns
    finally:
        for a in arenas:
            a.stop()
