"""Votes out of a real store (SQLite and PostgreSQL): DPO export (filters, drops, ties file, atomic write), raw
battles, and the `posttrain arena leaderboard` / `posttrain votes export` verbs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime

import pytest

from posttrain.files import write_jsonl
from posttrain.store import Battle, Store
from posttrain.ui.export import export_votes
from posttrain.ui.votes import load_battles, record_vote


def turn(prompt: str, reply: str, history: list | None = None) -> list[dict]:
    return [*(history or []), {"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


@pytest.fixture
def store(db_url):
    store = Store(db_url)

    def vote(a, b, conv_a, conv_b, v, source="arena", day=2):
        row = record_vote(store, session_hash="s", model_a=a, model_b=b, conversation_a=conv_a,
                          conversation_b=conv_b, vote=v, source=source)
        with store.session() as s:  # pin the date for the date filters
            s.get(Battle, row.id).voted_at = datetime(2026, 1, day, 12)

    vote("p", "q", turn("hi", "Hello! How can I help?"), turn("hi", "hey"), "a")
    vote("p", "q", turn("hi", "Hello! How can I help?"), turn("hi", "hey"), "a")  # exact duplicate
    vote("q", "p", turn("2+2?", "4"), turn("2+2?", "Four."), "b", source="side-by-side")
    vote("p", "r", turn("name?", ""), turn("name?", "R."), "b")  # empty reply
    vote("p", "q", turn("tie?", "yes"), turn("tie?", "yes indeed"), "tie")
    vote("p", "q", turn("bad?", "no"), turn("bad?", "nope"), "bothbad")
    vote("r", "q", turn("more", "B wins", turn("hi", "hello")), turn("more", "A loses", turn("hi", "hey")), "a")
    vote("p", "q", turn("old", "an old vote"), turn("old", "older"), "a", day=1)
    vote("p", "q", turn("judge", "judged better"), turn("judge", "judged worse"), "a", source="judge:gpt")
    return store


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dpo_export_keeps_winners_and_says_what_it_dropped(store, tmp_path):
    out, ties = tmp_path / "prefs.jsonl", tmp_path / "ties.jsonl"
    summary = export_votes(store, out, ties_out=ties)
    rows = lines(out)
    assert [r["chosen"][0]["content"] for r in rows] == ["an old vote", "Hello! How can I help?", "Four.", "B wins"]
    assert rows[2]["rejected"] == [{"role": "assistant", "content": "4"}]
    assert rows[2]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert rows[2]["meta"]["chosen_model"] == "p" and rows[2]["meta"]["source"] == "side-by-side"
    # Multi-turn with different histories: the prompt is the winner's conversation so far.
    assert rows[3]["prompt"] == turn("hi", "hello") + [{"role": "user", "content": "more"}]
    assert rows[3]["meta"]["shared_history"] is False
    assert [t["meta"]["vote"] for t in lines(ties)] == ["tie", "bothbad"]
    assert (summary.kept, summary.ties, summary.winner_history) == (4, 2, 1)
    assert dict(summary.dropped) == {"exact duplicates": 1, "with an empty reply": 1}
    text = str(summary)
    assert "kept 4 preference pairs" in text and "wrote 2 ties / both-bad" in text and "dropped 1 exact duplicates" in text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_atomic_write_gets_the_mode_a_plain_write_would(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_jsonl(tmp_path / "prefs.jsonl", [{"a": 1}])
    assert (tmp_path / "prefs.jsonl").stat().st_mode == plain.stat().st_mode


def test_a_failed_export_leaves_the_old_file_whole(tmp_path):
    out = tmp_path / "prefs.jsonl"
    out.write_text('{"old": 1}\n')

    def rows():
        yield {"new": 1}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(out, rows())
    assert out.read_text() == '{"old": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["prefs.jsonl"]


def test_dpo_export_filters(store, tmp_path):
    out = tmp_path / "prefs.jsonl"
    assert export_votes(store, out, since=datetime(2026, 1, 2), min_length=3).kept == 2
    assert [r["chosen"][0]["content"] for r in lines(out)] == ["Hello! How can I help?", "B wins"]
    assert export_votes(store, out, until=datetime(2026, 1, 2)).kept == 1
    assert export_votes(store, out, models=["r"]).kept == 1
    assert export_votes(store, out, source="judge").kept == 1
    assert export_votes(store, out, source="all").kept == 5
    summary = export_votes(store, out, source="arena")
    assert summary.kept == 3 and "excluded 2 ties / both-bad" in str(summary)


def test_battles_export_and_loading(store, tmp_path):
    out = tmp_path / "battles.jsonl"
    assert export_votes(store, out, "battles", source="all").kept == 9
    assert {"conversation_a", "model_a", "vote", "voted_at"} <= set(lines(out)[0])
    assert list(load_battles(store)["vote"]) == ["a", "a", "a", "b", "tie", "bothbad", "a"]  # arena, by vote time
    assert load_battles(store).iloc[0]["voted_at"] == datetime(2026, 1, 1, 12)


def test_cli_leaderboard_and_export(store, tmp_path):
    env = {**os.environ, "POSTTRAIN_DB_URL": store.url}

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "posttrain", *args], env=env, capture_output=True, text=True)
        return result

    board = cli("arena", "leaderboard", "--json", "--source", "human", "--plots", str(tmp_path / "plots"))
    assert board.returncode == 0, board.stderr
    rows = json.loads(board.stdout)
    assert [r["model"] for r in rows][0] == "r" and {"elo", "bt", "bt_lo", "bt_hi", "battles"} <= set(rows[0])
    assert (tmp_path / "plots" / "win_rate.png").stat().st_size > 0
    exported = cli("votes", "export", "--out", str(tmp_path / "p.jsonl"), "--since", "2026-01-02")
    assert exported.returncode == 0 and "kept 3 preference pairs" in exported.stdout
    bad = cli("arena", "export", "--out", str(tmp_path / "x.jsonl"), "--format", "csv")
    assert bad.returncode == 2 and bad.stderr.startswith("posttrain: error: unknown export format 'csv'")


def test_replies_regenerated_away_on_a_voted_turn_are_weak_rejections(db_url, tmp_path):
    store = Store(db_url)
    record_vote(store, session_hash="s", model_a="p", model_b="q", conversation_a=turn("hi", "Hello there!"),
                conversation_b=turn("hi", "hey"), vote="tie", regenerated={"a": ["Go away.", "Hello there!"]})
    summary = export_votes(store, tmp_path / "prefs.jsonl")
    [pair] = lines(tmp_path / "prefs.jsonl")  # the tie is no pair; the reply identical to the final one is none
    assert pair["chosen"] == [{"role": "assistant", "content": "Hello there!"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Go away."}]
    assert pair["meta"]["source"] == "arena-regenerate" and pair["meta"]["weak"] is True
    assert pair["meta"]["chosen_model"] == pair["meta"]["rejected_model"] == "p"
    assert summary.kept == 1 and summary.weak == 1 and "1 of them weak" in str(summary)
    assert export_votes(store, tmp_path / "strong.jsonl", regenerated=False).kept == 0


def test_a_thinking_replys_trace_is_kept_and_a_mismatched_pair_flagged(db_url, tmp_path):
    from posttrain.train.data import DataSource, load

    store = Store(db_url)
    thought = {"role": "assistant", "content": "Four.", "reasoning": "2 + 2 = 4"}
    older = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning": "greet"}]
    record_vote(store, session_hash="s", model_a="thinker", model_b="plain", vote="a",
                conversation_a=[*older, {"role": "user", "content": "2+2?"}, thought],
                conversation_b=[*older, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}])
    both = {"role": "assistant", "content": "Blue.", "reasoning_content": "the sky"}  # older vLLM's name
    record_vote(store, session_hash="s", model_a="thinker", model_b="other", vote="b",
                conversation_a=turn("colour?", "Red.")[:1] + [thought | {"content": "Red."}],
                conversation_b=turn("colour?", "Blue.")[:1] + [both])
    summary = export_votes(store, tmp_path / "prefs.jsonl")
    mismatched, matched = lines(tmp_path / "prefs.jsonl")
    assert mismatched["chosen"] == [thought] and mismatched["rejected"] == [{"role": "assistant", "content": "5"}]
    assert mismatched["prompt"][1] == {"role": "assistant", "content": "hello"}  # earlier traces: as Qwen3 drops them
    assert mismatched["meta"]["mode_mismatch"] is True and "mode_mismatch" not in matched["meta"]
    assert matched["chosen"] == [{"role": "assistant", "content": "Blue.", "reasoning": "the sky"}]
    assert summary.mismatched == 1 and "1 of them mode-mismatched" in str(summary)
    rows = load([DataSource(path=str(tmp_path / "prefs.jsonl"))], "dpo").rows
    assert rows[0]["chosen"][0]["content"] == "<think>\n2 + 2 = 4\n</think>\n\nFour."
    dropped = export_votes(store, tmp_path / "prefs.jsonl", drop_mode_mismatch=True)
    assert dropped.kept == 1 and dropped.dropped == {"mode-mismatched (one side thought, the other did not)": 1}
