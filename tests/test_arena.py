"""The arena end to end: a real `posttrain arena` process in front of the real front door
(tiny-qwen3 and its LoRA on one vLLM engine), driven with gradio_client and with headless
Chromium; votes checked in SQLite and in the DPO export."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from posttrain.errors import PosttrainError
from posttrain.store import Battle, Store
from posttrain.ui.arena import Arena, ArenaConfig, load_moderation, new_session, weighted_pair

TESTS = Path(__file__).parent
MAX_TOKENS = 64


@dataclass
class ArenaProcess:
    url: str
    db_url: str
    process: subprocess.Popen
    log: Path

    def client(self) -> Client:
        return Client(self.url, verbose=False)  # a fresh client is a fresh browser session

    def battles(self, client: Client | None = None) -> list[Battle]:
        """All battles, or those voted from one client's session."""
        where = [] if client is None else [
            Battle.session_hash == hashlib.sha256(client.session_hash.encode()).hexdigest()[:16]]
        return Store(self.db_url).all(Battle, *where, order_by=Battle.id)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_arena(front_door, tmp: Path, *extra: str) -> ArenaProcess:
    port = free_port()
    db_url = f"sqlite:///{tmp / 'arena.db'}"
    env = {**os.environ, "POSTTRAIN_DB_URL": db_url, "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    log = tmp / "arena.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "arena", "--port", str(port), "--base-url", front_door.base_url,
         "--api-key", front_door.api_key, "--max-tokens", str(MAX_TOKENS), "--temperature", "0", *extra],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    arena = ArenaProcess(f"http://127.0.0.1:{port}/", db_url, process, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the arena exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(arena.url, timeout=2).status_code == 200:
                return arena
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    arena.stop()
    pytest.fail(f"the arena did not answer within 120 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def arena(front_door, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arena")
    proc = start_arena(front_door, tmp, "--moderation", "arena_moderation:refuse_secrets",
                       "--max-prompt-chars", "200")
    yield proc
    proc.stop()


def stream(job) -> list:
    """All updates of a streaming gradio_client job, once it finished."""
    updates = list(job)
    assert job.status().success, job.exception()
    return updates


def reply(chat_update: dict) -> str:
    """The text of the last message in a Chatbot update as gradio_client returns it."""
    content = chat_update["value"][-1]["content"]
    return "".join(part["text"] for part in content) if isinstance(content, list) else content


@pytest.mark.slow
def test_a_battle_streams_both_replies_and_its_vote_lands_in_the_db_and_export(arena, front_door, tmp_path):
    client = arena.client()
    with pytest.raises(AppError, match="Voting opens once both replies are complete"):
        client.predict(api_name="/battle_vote_a")
    updates = stream(client.submit("Tell me a story about a fox.", api_name="/battle_send"))
    assert len(updates) >= 3  # streamed, not one final answer
    lengths = [len(reply(u[0])) + len(reply(u[1])) for u in updates]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    hidden = json.dumps(updates)
    assert not any(name in hidden for name in front_door.models)  # anonymous until the vote

    # Multi-turn: a second prompt before voting; each model keeps its own history.
    stream(client.submit("And then?", api_name="/battle_send"))
    final = stream(client.submit(api_name="/battle_regenerate"))[-1]  # replaces the last replies
    assert [len(final[0]["value"]), len(final[1]["value"])] == [4, 4]
    reply_a, reply_b = reply(final[0]), reply(final[1])
    assert reply_a and reply_b and reply_a != reply_b  # two different models
    outcome = client.predict(api_name="/battle_vote_a")
    revealed = outcome[-1]
    model_a, model_b = outcome[0]["label"].removeprefix("Model A: "), outcome[1]["label"].removeprefix("Model B: ")
    assert {model_a, model_b} == set(front_door.models)
    assert f"Model A was **{model_a}**" in revealed and f"model B was **{model_b}**" in revealed
    with pytest.raises(AppError, match="already voted"):
        client.predict(api_name="/battle_vote_b")
    with pytest.raises(AppError, match="start a new round"):
        client.predict("Another?", api_name="/battle_send")

    [battle] = arena.battles(client)
    assert (battle.model_a, battle.model_b, battle.vote, battle.source) == (model_a, model_b, "a", "arena")
    assert [m["role"] for m in battle.conversation_a] == ["user", "assistant", "user", "assistant"]
    assert battle.conversation_a[-1]["content"] == reply_a and battle.conversation_b[-1]["content"] == reply_b
    assert len(battle.session_hash) == 16 and battle.voted_at >= battle.created_at

    out = tmp_path / "prefs.jsonl"
    result = subprocess.run([sys.executable, "-m", "posttrain", "arena", "export", "--format", "dpo", "--out", str(out)],
                            env={**os.environ, "POSTTRAIN_DB_URL": arena.db_url}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "kept 1 preference pairs" in result.stdout
    [pair] = [json.loads(line) for line in out.read_text().splitlines()]
    assert pair["chosen"] == [{"role": "assistant", "content": reply_a}]
    assert pair["rejected"] == [{"role": "assistant", "content": reply_b}]
    assert pair["prompt"] == battle.conversation_a[:-1]
    assert pair["meta"]["chosen_model"] == model_a and pair["meta"]["battle_id"] == battle.id

    # A new round starts clean.
    client.predict(api_name="/battle_new_round")
    stream(client.submit("Hi!", api_name="/battle_send"))
    assert client.predict(api_name="/battle_vote_tie")[-1].startswith("**You voted: tie.**")
    assert [b.vote for b in arena.battles(client)] == ["a", "tie"]


@pytest.mark.slow
def test_side_by_side_votes_once_per_turn_with_chosen_models(arena, front_door):
    client = arena.client()
    base, lora = front_door.models
    stream(client.submit("What is 2+2?", base, lora, api_name="/side_by_side_send"))
    client.predict(api_name="/side_by_side_vote_b")
    with pytest.raises(AppError, match="already voted"):
        client.predict(api_name="/side_by_side_vote_a")
    stream(client.submit("Are you sure?", base, lora, api_name="/side_by_side_send"))
    client.predict(api_name="/side_by_side_vote_bothbad")
    turns = arena.battles(client)
    assert {b.source for b in turns} == {"side-by-side"}
    assert [(b.model_a, b.model_b, b.vote, len(b.conversation_a)) for b in turns] == [
        (base, lora, "b", 2), (base, lora, "bothbad", 4)]


@pytest.mark.slow
def test_prompts_are_refused_by_moderation_and_length(arena):
    client = arena.client()
    with pytest.raises(AppError, match="Refused by moderation: no secrets in this arena"):
        client.predict("Tell me a secret", api_name="/battle_send")
    with pytest.raises(AppError, match="the limit is 200"):
        client.predict("x" * 201, api_name="/battle_send")


def test_rate_limit_per_session(tmp_path):
    arena = Arena(ArenaConfig(prompts_per_minute=2), Store(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    session, other = new_session(), new_session()
    chat = session["arena"]
    assert arena.refusal(chat, "one") is None and arena.refusal(chat, "two") is None
    assert arena.refusal(chat, "three").startswith("Rate limit: 2 prompts per minute")
    chat.reset()  # a new round does not reset the limit
    assert arena.refusal(chat, "four").startswith("Rate limit")
    assert arena.refusal(session["side-by-side"], "four").startswith("Rate limit")  # nor does the other tab
    assert arena.refusal(other["arena"], "one") is None  # another session has its own
    chat.sent[0] -= 61  # a minute later
    assert arena.refusal(chat, "five") is None


@pytest.mark.slow
def test_voting_opens_only_when_both_replies_are_complete(front_door, tmp_path):
    # In-process, so the vote provably lands mid-stream (through HTTP that would be a race). Long
    # replies: 16 tokens of the tiny model could arrive in one read, i.e. one UI update.
    arena = Arena(ArenaConfig(base_url=front_door.base_url, api_key=front_door.api_key, max_tokens=256),
                  Store(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    chat = new_session()["arena"]

    async def battle() -> int:
        chat.models = await arena.pick_pair()
        for conv in chat.conversations:
            conv.append({"role": "user", "content": "Count to ten."})
        updates = 0
        async for _ in arena.stream(chat):
            updates += 1
            with pytest.raises(PosttrainError, match="Voting opens once both replies are complete"):
                arena.vote(chat, "a", "session")
        return updates

    assert asyncio.run(battle()) >= 2 and chat.status == "ready"
    arena.vote(chat, "tie", "session")
    with pytest.raises(PosttrainError, match="already voted"):
        arena.vote(chat, "a", "session")
    [battle_row] = arena.store.all(Battle)
    assert battle_row.vote == "tie" and battle_row.conversation_a == chat.conversations[0]


def test_new_pairs_are_drawn_more_often_and_sides_are_random():
    counts = {frozenset("xy"): 99, frozenset("xz"): 99}  # y-z never met
    draws = [weighted_pair(["x", "y", "z"], counts, random.Random(seed)) for seed in range(2000)]
    pairs = Counter(frozenset(d) for d in draws)
    assert pairs[frozenset("yz")] > 0.95 * len(draws) and all(len(set(d)) == 2 for d in draws)
    assert 0.4 < sum(d[0] == "y" for d in draws if set(d) == {"y", "z"}) / pairs[frozenset("yz")] < 0.6


def test_moderation_hooks_load_by_name():
    assert load_moderation("arena_moderation:refuse_secrets")("a secret") == "no secrets in this arena"
    with pytest.raises(PosttrainError, match="expected module:function"):
        load_moderation("arena_moderation")
    with pytest.raises(PosttrainError, match="no_such_module"):
        load_moderation("no_such_module:hook")


@pytest.mark.slow
def test_an_acknowledged_vote_survives_sigkill(front_door, tmp_path):
    arena = start_arena(front_door, tmp_path)
    try:
        client = arena.client()
        stream(client.submit("Quick, say something.", api_name="/battle_send"))
        acknowledged = client.predict(api_name="/battle_vote_b")[-1]
        os.kill(arena.process.pid, signal.SIGKILL)
        arena.process.wait()
    finally:
        arena.stop()
    assert "You voted: B is better" in acknowledged
    [battle] = arena.battles()
    assert battle.vote == "b" and len(battle.conversation_b) == 2


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow
@pytest.mark.browser
def test_battle_in_headless_chromium(arena, front_door, artifacts, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` (apt-get install chromium) installs it")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            viewport={"width": 1280, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(arena.url)
            page.locator("#battle-prompt textarea").fill("Write a haiku about the sea.")
            page.locator("#battle-send").click()
            vote = page.locator("#battle-vote-a")
            expect(vote).to_be_enabled(timeout=60_000)  # both replies complete
            for side in "ab":
                expect(page.locator(f"#battle-chat-{side} .bot").last).not_to_be_empty()
            expect(page.locator("#battle-chat-a")).not_to_contain_text(front_door.models[0])
            vote.click()
            info = page.locator("#battle-info")
            expect(info).to_contain_text("Model A was", timeout=30_000)
            for name in front_door.models:
                expect(info).to_contain_text(name)
            expect(vote).to_be_disabled()
            page.screenshot(path=str(artifacts / "arena_battle.png"), full_page=True)
            page.get_by_role("tab", name="Leaderboard").click()
            expect(page.locator("table").first).to_contain_text(front_door.models[0], timeout=30_000)
            plots = page.get_by_role("img", name=re.compile("plot visualising"))
            expect(plots).to_have_count(2)  # win rate and battle count matrices
            page.screenshot(path=str(artifacts / "arena_leaderboard.png"), full_page=True)
        finally:
            browser.close()
    assert arena.battles()[-1].vote == "a"
