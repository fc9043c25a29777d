"""`posttrain arena import FILE --format fastchat`: FastChat's arena battles and MT-Bench human
judgments into the battles table, under their own sources, idempotently, all or nothing; the
leaderboard and the DPO export take them by source. Fixture files are written here, small, in
FastChat's shapes (clean_battle_data.py output; lmsys/mt_bench_human_judgments)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from posttrain.errors import PosttrainError
from posttrain.store import Battle
from posttrain.ui.export import export_votes
from posttrain.ui.imports import import_battles


def chat(*turns: str) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def arena_record(winner: str, tstamp: float = 1687000000.5, **extra) -> dict:
    return {"question_id": f"q{tstamp}", "model_a": "vicuna-13b", "model_b": "koala-13b", "winner": winner,
            "judge": "arena_user_1", "conversation_a": chat("Hi", "Hello!"), "conversation_b": chat("Hi", "Hey."),
            "turn": 1, "anony": True, "language": "English", "tstamp": tstamp} | extra


def human_record(winner: str, turn: int, judge: str = "expert_3", question_id: int = 81) -> dict:
    return {"question_id": question_id, "model_a": "gpt-4", "model_b": "llama-13b", "winner": winner, "judge": judge,
            "conversation_a": chat("Write a poem.", "Roses...", "Shorter.", "Roses."),
            "conversation_b": chat("Write a poem.", "Poem.", "Shorter.", "Po."), "turn": turn}


ARENA = [arena_record("model_a", 1687000000.5), arena_record("model_b", 1687000100.0), arena_record("tie", 1687000200.0),
         arena_record("tie (bothbad)", 1687000300.0),
         # The Elo-only releases carry no conversations: rated, never judged or exported.
         arena_record("model_b", 1687000400.0, conversation_a=None, conversation_b=None)]
HUMAN = [human_record("model_a", 1), human_record("model_b", 2), human_record("tie", 2, judge="author_0")]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    arena = tmp_path / "clean_battle_20230905.json"
    arena.write_text(json.dumps(ARENA, indent=2))  # clean_battle_data.py writes one JSON array
    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps(r) + "\n" for r in HUMAN))
    return {"arena": arena, "human": human}


def test_both_kinds_land_under_their_own_sources_with_votes_times_and_judged_turns(fresh_registry, files):
    store = fresh_registry.store
    summary = import_battles(store, files["arena"])
    assert summary.added == {"fastchat": 5, "mt-bench-human": 0} and summary.already == 0
    assert import_battles(store, files["human"]).added["mt-bench-human"] == 3
    arena = store.all(Battle, Battle.source == "fastchat", order_by=Battle.voted_at)
    assert [b.vote for b in arena] == ["a", "b", "tie", "bothbad", "b"]
    assert arena[0].voted_at == datetime(2023, 6, 17, 11, 6, 40, 500000)  # tstamp 1687000000.5, UTC
    assert arena[0].conversation_a == chat("Hi", "Hello!") and arena[-1].conversation_a == []
    human = store.all(Battle, Battle.source == "mt-bench-human", order_by=Battle.id)
    assert [b.vote for b in human] == ["a", "b", "tie"]
    # A turn-1 judgment saw the first turn only; a turn-2 one the whole conversation.
    assert human[0].conversation_b == chat("Write a poem.", "Poem.") and len(human[1].conversation_b) == 4
    assert len({b.session_hash for b in arena + human}) == 8


def test_importing_again_adds_nothing_and_the_cli_says_so(fresh_registry, files, tmp_path):
    import_battles(fresh_registry.store, files["arena"])
    both = tmp_path / "both.jsonl"  # an overlapping file: the arena battles again, plus the MT-Bench ones
    both.write_text("".join(json.dumps(r) + "\n" for r in ARENA + HUMAN))
    env = {**os.environ, "POSTTRAIN_HOME": str(fresh_registry.settings.home)}
    run = subprocess.run([sys.executable, "-m", "posttrain", "arena", "import", str(both), "--format", "fastchat"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "imported 3 battles" in run.stdout and "(3 mt-bench-human); 5 already there" in run.stdout
    again = import_battles(fresh_registry.store, both)
    assert sum(again.added.values()) == 0 and again.already == 8
    assert len(fresh_registry.store.all(Battle)) == 8


def test_parquet_as_the_hugging_face_copies_store_it(fresh_registry, tmp_path):
    import pandas as pd

    path = tmp_path / "human-00000-of-00001.parquet"
    pd.DataFrame(HUMAN).to_parquet(path)
    assert import_battles(fresh_registry.store, path).added["mt-bench-human"] == 3
    assert fresh_registry.store.all(Battle, Battle.source == "mt-bench-human")[1].conversation_a[3]["content"] == "Roses."


@pytest.mark.parametrize("record, problem", [
    ([1, 2], "expected a JSON object, got list"),
    ({k: v for k, v in arena_record("model_a").items() if k != "model_b"}, "model_b must be a model name"),
    (arena_record("model_c"), "winner must be one of model_a, model_b, tie, tie \\(bothbad\\), not 'model_c'"),
    (arena_record("tie", tstamp="yesterday"), "tstamp must be a Unix time in seconds"),
    (arena_record("tie", conversation_a=[{"role": "assistant", "content": "x"}]), "conversation_a must be a list of alternating"),
    (arena_record("tie", conversation_b=None), "has one conversation but not the other"),
    (human_record("model_a", 1, judge="gpt4_pair"), "judge 'gpt4_pair' is not a human"),
    (human_record("model_a", 3), "turn must be 1 or 2"),
    (human_record("model_a", 2) | {"conversation_a": chat("q", "a")}, "conversation_a has 1 turn\\(s\\), but turn 2 was judged"),
    ({"model_a": "x", "model_b": "y", "winner": "tie"}, "neither an arena battle"),
])
def test_a_malformed_record_is_named_and_nothing_is_imported(fresh_registry, tmp_path, record, problem):
    path = tmp_path / "votes.json"
    path.write_text(json.dumps([arena_record("model_a"), record, arena_record("tie", 1687009999.0)]))
    with pytest.raises(PosttrainError, match=f"^{path}:2: {problem}"):
        import_battles(fresh_registry.store, path)
    assert fresh_registry.store.all(Battle) == []


def test_unreadable_files_and_bad_lines(fresh_registry, tmp_path):
    lines = tmp_path / "votes.jsonl"
    lines.write_text(json.dumps(arena_record("tie")) + "\n\n{oops\n")
    with pytest.raises(PosttrainError, match=f"^{lines}:3: not valid JSON"):
        import_battles(fresh_registry.store, lines)
    with pytest.raises(PosttrainError, match="cannot read the file"):
        import_battles(fresh_registry.store, tmp_path / "missing.json")
    with pytest.raises(PosttrainError, match="unknown import format 'lmsys'"):
        import_battles(fresh_registry.store, lines, "lmsys")
    assert fresh_registry.store.all(Battle) == []


def test_the_leaderboard_and_the_dpo_export_take_imported_votes_by_source(fresh_registry, files, tmp_path):
    import_battles(fresh_registry.store, files["arena"])
    import_battles(fresh_registry.store, files["human"])
    env = {**os.environ, "POSTTRAIN_HOME": str(fresh_registry.settings.home)}
    board = subprocess.run([sys.executable, "-m", "posttrain", "arena", "leaderboard", "--source", "fastchat", "--json",
                            "--rounds", "10"], capture_output=True, text=True, env=env, timeout=120)
    assert board.returncode == 0, board.stderr
    assert {row["model"] for row in json.loads(board.stdout)} == {"vicuna-13b", "koala-13b"}
    summary = export_votes(fresh_registry.store, tmp_path / "dpo.jsonl", source="mt-bench-human")
    pairs = [json.loads(line) for line in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert summary.kept == 2 and summary.ties == 1
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Roses..."}]  # turn 1: gpt-4 won
    assert pairs[1]["chosen"] == [{"role": "assistant", "content": "Po."}] and pairs[1]["prompt"][-1]["content"] == "Shorter."
    fastchat = export_votes(fresh_registry.store, tmp_path / "arena.jsonl", source="fastchat")
    assert fastchat.kept == 2 and fastchat.ties == 2 and sum(fastchat.dropped.values()) == 1  # no conversations
