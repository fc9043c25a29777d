"""Fuzzing the arena through its public API, as people with two browser tabs would: Hypothesis
draws sequences of send / regenerate / vote / new round in either tab (two gradio_client
sessions, each in the battle or the side-by-side mode), some fired without waiting so that the
next ones race them (a vote while both models stream, a double click). A real `posttrain arena`
process in front of the real front door takes them.

Checked: the store's battles are exactly the votes the arena acknowledged (none lost, none
twice, each with the conversation and names the voter saw), and, whenever no other event is in
flight on a chat, each event is accepted or refused as the arena's rules say."""

from __future__ import annotations

import hashlib
import inspect
import time
from collections import Counter

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from broken_door import BrokenDoor
from posttrain.store import Battle, Store
from test_arena import start_arena, text

MODES = ("battle", "side_by_side")
SOURCES = {"battle": "arena", "side_by_side": "side-by-side"}
PROMPTS = ("Hi!", "Name a colour.", "Count to three.", "", "Why?")
VOTES = ("a", "b", "tie", "bothbad")
STEPS = 10  # actions per sequence; a turn is two events
DEADLINE_S = 120  # per event: generous, only a hang should reach it
MAX_IN_FLIGHT = 3  # then the sequence waits for them before going on

tabs = st.integers(0, 1)
waits = st.booleans()  # False: the next events race this one
prompts, pairs, votes = st.sampled_from(PROMPTS), st.integers(0, 2), st.sampled_from(VOTES)
ACTIONS = {"send": st.tuples(st.just("send"), tabs, waits, prompts, pairs),
           "vote": st.tuples(st.just("vote"), tabs, waits, votes),
           "regenerate": st.tuples(st.just("regenerate"), tabs, waits),
           "new_round": st.tuples(st.just("new_round"), tabs, st.just(True)),
           # What most people do: send, read both replies, vote (the vote may be a double click).
           "turn": st.tuples(st.just("turn"), tabs, waits, prompts, pairs, votes)}
actions = st.sampled_from(["turn", "turn", "send", "vote", "regenerate", "new_round"]).flatmap(ACTIONS.get)


@pytest.fixture(scope="module")
def fuzz_arena(front_door, tmp_path_factory):
    proc = start_arena(front_door, tmp_path_factory.mktemp("arena-fuzz"), "--prompts-per-minute", "100000",
                       max_tokens=16)
    yield proc
    proc.stop()


def messages(chatbot: dict) -> tuple:
    """(role, text) of each message a Chatbot update shows."""
    return tuple((m["role"], text(m)) for m in chatbot["value"] or [])


def shown(conversation: list[dict]) -> tuple:
    """(role, text) of each stored message as the Chatbot shows it (through inspect.cleandoc)."""
    return tuple((m["role"], inspect.cleandoc(m["content"])) for m in conversation)


def outcome(job):
    """(outputs, None) if the event succeeded, (None, message) if the arena refused it."""
    try:
        return job.result(timeout=DEADLINE_S), None
    except AppError as exc:
        return None, str(exc)


class Tabs:
    """Two sessions, one chat each, driven through gradio_client, with what the arena's rules
    predict of each chat and the votes it acknowledged."""

    def __init__(self, arena, modes: tuple[str, str], pairs: list[tuple[str, str]]):
        self.arena, self.modes, self.pairs = arena, modes, pairs
        self.clients = [Client(arena.url, verbose=False) for _ in modes]
        self.in_flight: list[tuple[int, str, object]] = []
        self.contested: set[int] = set()  # tabs where events overlapped: their order is unknown
        # Each chat's status as the rules predict it; None where races made it unknowable, until
        # an event's success tells it again.
        self.status: list[str | None] = ["empty", "empty"]
        self.picked: list[tuple[str, str] | None] = [None, None]  # side-by-side models, if known
        self.acknowledged: Counter = Counter()
        self.events = self.raced = self.failed = 0

    def busy(self, tab: int) -> bool:
        return any(t == tab for t, _, _ in self.in_flight)

    def run(self, action: tuple) -> None:
        kind, tab, wait, *args = action
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            self.settle()
        expected, inputs, event = getattr(self, kind)(tab, wait, *args)
        self.fire(tab, event, expected, wait, *inputs)

    def send(self, tab: int, wait: bool, prompt: str, pair: int):
        if self.modes[tab] == "battle":
            inputs = (prompt,)
        else:
            inputs = (prompt, *self.pairs[pair])
            idle = wait and not self.busy(tab)
            if self.pairs[pair] != self.picked[tab]:  # other models start a new conversation
                self.status[tab] = "empty" if idle and self.picked[tab] else None
            self.picked[tab] = self.pairs[pair] if idle else None
        status = self.status[tab]
        expected = ("A reply failed" if status == "failed" else
                    "start a new round" if status == "voted" and self.modes[tab] == "battle" else
                    "Type a prompt first" if not prompt else None)
        return expected, inputs, "send"

    def regenerate(self, tab: int, wait: bool):
        status = self.status[tab]
        return ("already voted" if status == "voted" else "Nothing to regenerate" if status == "empty" else None,
                (), "regenerate")

    def vote(self, tab: int, wait: bool, vote: str):
        status = self.status[tab]
        return (None if status == "ready" else "already voted" if status == "voted" else "Voting opens",
                (), f"vote_{vote}")

    def new_round(self, tab: int, wait: bool):
        return None, (), "new_round"

    def turn(self, tab: int, wait: bool, prompt: str, pair: int, vote: str):
        self.run(("send", tab, True, prompt, pair))
        return self.vote(tab, wait, vote)

    def fire(self, tab: int, event: str, expected: str | None, wait: bool, *inputs) -> None:
        """Submit one event; unless `wait`, leave it in flight. `expected`: None if it must
        succeed, part of the refusal if it must be refused (checked when the chat is idle and
        its status known)."""
        if self.busy(tab):
            self.contested.add(tab)
        job = self.clients[tab].submit(*inputs, api_name=f"/{self.modes[tab]}_{event}")
        self.events += 1
        if not wait:
            self.raced += 1
            self.in_flight.append((tab, event, job))
            self.status[tab] = None
            return
        predictable = not self.busy(tab) and self.status[tab] is not None
        outputs, refusal = outcome(job)
        if predictable:
            assert (refusal is None) == (expected is None) and (expected or "") in (refusal or ""), \
                f"{event} in tab {tab} ({self.status[tab]}): expected {expected!r}, got {refusal!r}"
        self.done(tab, event, outputs, known=not self.busy(tab))

    def done(self, tab: int, event: str, outputs, known: bool) -> None:
        """Account for a finished event: an acknowledged vote, and the chat's new status."""
        if outputs is None:
            return
        if event.startswith("vote_"):
            names = [o["label"].split(": ", 1)[1] for o in outputs[:2]]  # shown once voted
            self.acknowledged[(self.session(tab), SOURCES[self.modes[tab]], event.removeprefix("vote_"), *names,
                               messages(outputs[0]), messages(outputs[1]))] += 1
            status = "voted"
        elif event == "new_round":
            status = "empty"
        else:
            status = "failed" if "cannot be voted on" in outputs[-1] else "ready"
            self.failed += status == "failed"
        self.status[tab] = status if known else None

    def settle(self) -> None:
        """Wait for the events in flight; then the store must hold exactly the acknowledged votes."""
        in_flight, self.in_flight = self.in_flight, []
        for tab, event, job in in_flight:
            self.done(tab, event, outcome(job)[0], known=tab not in self.contested)
        self.contested.clear()
        sessions = [self.session(tab) for tab in range(2)]
        stored = Counter((b.session_hash, b.source, b.vote, b.model_a, b.model_b,
                          shown(b.conversation_a), shown(b.conversation_b))
                         for b in Store(self.arena.db_url).all(Battle, Battle.session_hash.in_(sessions)))
        assert stored == self.acknowledged

    def session(self, tab: int) -> str:
        return hashlib.sha256(self.clients[tab].session_hash.encode()).hexdigest()[:16]

    def close(self) -> None:
        for client in self.clients:
            client.close()


def fuzz(arena, pairs: list[tuple[str, str]], examples: int) -> str:
    """Run `examples` sequences of STEPS actions against `arena`; a summary of what ran."""
    tally = Counter()

    # No shrinking: replaying races against a live server is slow and need not fail the same way;
    # a failure prints its whole sequence (STEPS actions) instead.
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(modes=st.tuples(st.sampled_from(MODES), st.sampled_from(MODES)),
           sequence=st.lists(actions, min_size=STEPS, max_size=STEPS))
    def sequences(modes, sequence):
        tabs = Tabs(arena, modes, pairs)
        try:
            for action in sequence:
                tabs.run(action)
            tabs.settle()
        finally:
            tabs.close()
        tally.update(sequences=1, events=tabs.events, raced=tabs.raced, votes=sum(tabs.acknowledged.values()),
                     failed=tabs.failed)

    started = time.monotonic()
    sequences()
    return (f"{tally['sequences']} sequences, {tally['events']} events ({tally['raced']} raced), "
            f"{tally['failed']} failed turns, {tally['votes']} votes acknowledged, {time.monotonic() - started:.0f} s")


@pytest.mark.slow
def test_arena_fuzz_two_tabs_store_exactly_the_acknowledged_votes(fuzz_arena, front_door):
    base, lora = front_door.models
    print(f"\narena fuzz: {fuzz(fuzz_arena, [(base, lora), (lora, base), (base, base)], examples=4)}")


def test_arena_fuzz_with_a_model_that_fails_every_other_reply(tmp_path):
    """The same against `BrokenDoor`, whose "flaky" model breaks its stream every other request:
    failed turns in the mix, and no engine needed."""
    door = BrokenDoor()
    arena = start_arena(door, tmp_path, "--prompts-per-minute", "100000", "--models", "whole,flaky")
    try:
        summary = fuzz(arena, [("whole", "flaky"), ("flaky", "whole"), ("whole", "whole")], examples=3)
        print(f"\narena fuzz, flaky model: {summary}")
    finally:
        arena.stop()
        door.stop()
