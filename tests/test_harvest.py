"""Harvest: feedback on the front door's answers (real vLLM engine, the official openai client),
exports to SFT / DPO data that `posttrain train` reads as it is, PII masking, purge, the loop's
feedback source."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import openai
import pytest

from posttrain.errors import PosttrainError
from posttrain.harvest.export import export_dpo, export_sft
from posttrain.harvest.logs import Filters, purge
from posttrain.serve.feedback import FeedbackBody, FeedbackError, record_feedback
from posttrain.store import Feedback, RequestLog, Store, utcnow

from conftest import FRONT_DOOR_KEY

FAST = ["training.max_steps=2", "training.batch_size=2", "max_length=256"]


@pytest.fixture(scope="module")
def since() -> datetime:
    """What this module harvested and rated: the exports below read from here on (the session's
    store holds other modules' traffic too)."""
    return utcnow()


@pytest.fixture(scope="module")
def client(front_door, since) -> openai.OpenAI:
    return openai.OpenAI(base_url=front_door.base_url, api_key=front_door.api_key, max_retries=0)


def chat(client, content: str, **kw):
    # min_tokens: the random tiny model may otherwise stop at once, and an empty answer is no data.
    return client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": content}],
                                          max_tokens=8, extra_body={"min_tokens": 4}, **kw)


def feedback(client, **body) -> dict:
    return client.post("/feedback", body=body, cast_to=object)


def feedback_count(registry) -> int:
    return len(registry.store.all(Feedback))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_feedback_on_choice_1_of_n2_becomes_a_pair_with_the_right_sides(client, registry, since, tmp_path):
    reply = chat(client, "Pick a colour.", n=2, temperature=1.0)
    first, second = (c.message.content for c in sorted(reply.choices, key=lambda c: c.index))
    assert first != second and reply.id.startswith("chatcmpl-")
    answer = feedback(client, id=reply.id, choice=1, rating=1, comment="the second is better")
    assert answer["object"] == "feedback" and (answer["response_id"], answer["choice"]) == (reply.id, 1)
    summary = export_dpo(registry.store, tmp_path / "dpo.jsonl", Filters(since=since), sources=["choice"])
    [pair] = [p for p in lines(tmp_path / "dpo.jsonl") if p["meta"]["response_id"] == reply.id]
    assert pair["prompt"] == [{"role": "user", "content": "Pick a colour."}]
    assert pair["chosen"] == [{"role": "assistant", "content": second}]
    assert pair["rejected"] == [{"role": "assistant", "content": first}]
    assert pair["meta"]["source"] == "feedback-choice" and summary.by_source["feedback-choice"] >= 1


@pytest.mark.slow
def test_a_streamed_answer_gets_an_id_feedback_accepts_at_once_and_once_per_key(client, registry):
    chunks = list(chat(client, "Stream me something.", stream=True))
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    # Sent the moment the stream ends: the row is written after the response, and feedback waits for it.
    feedback(client, id=chunks[0].id, rating=-1)
    [row] = registry.store.all(RequestLog, RequestLog.response_id == chunks[0].id)
    assert row.completion == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    before = feedback_count(registry)
    with pytest.raises(openai.ConflictError) as again:
        feedback(client, id=chunks[0].id, rating=1)
    assert again.value.code == "feedback_exists" and feedback_count(registry) == before
    # The rule is per API key: another key (here through Python) may rate the same answer.
    stored = record_feedback(registry.store, FeedbackBody(id=chunks[0].id, rating=1), api_key="another-key")
    assert stored.key_hash == hashlib.sha256(b"another-key").hexdigest()
    with pytest.raises(FeedbackError, match="already gave feedback") as python_again:
        record_feedback(registry.store, FeedbackBody(id=chunks[0].id, rating=1), api_key="another-key")
    assert python_again.value.status == 409


@pytest.mark.slow
def test_a_correction_becomes_a_pair_and_replaces_the_answer_in_sft(client, registry, since, tmp_path):
    reply = chat(client, "What is the capital of France?", temperature=0)
    original = reply.choices[0].message.content
    feedback(client, id=reply.id, rating=-1, correction="Paris.")
    export_dpo(registry.store, tmp_path / "dpo.jsonl", Filters(since=since), sources=["correction"])
    [pair] = [p for p in lines(tmp_path / "dpo.jsonl") if p["meta"]["response_id"] == reply.id]
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("Paris.", original)
    assert pair["meta"]["source"] == "feedback-correction"
    summary = export_sft(registry.store, tmp_path / "sft.jsonl", Filters(since=since))
    conversations = [r["messages"] for r in lines(tmp_path / "sft.jsonl")]
    assert [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."}] in conversations
    assert summary.corrected >= 1 and "replaced by a user's correction" in str(summary)


@pytest.mark.slow
def test_thumbs_up_and_down_on_the_same_prompt_become_a_pair(client, registry, since, tmp_path):
    good, bad = (chat(client, "Tell me a joke.", temperature=1.0) for _ in range(2))
    feedback(client, id=good.id, rating=1)
    feedback(client, id=bad.id, rating=-1)
    export_dpo(registry.store, tmp_path / "dpo.jsonl", Filters(since=since), sources=["thumbs"])
    [pair] = [p for p in lines(tmp_path / "dpo.jsonl") if p["meta"]["chosen_response_id"] == good.id]
    assert pair["meta"]["rejected_response_id"] == bad.id and pair["meta"]["source"] == "feedback-thumbs"
    assert pair["chosen"][0]["content"] == good.choices[0].message.content
    assert pair["rejected"][0]["content"] == bad.choices[0].message.content


@pytest.mark.slow
def test_bad_feedback_gets_openai_shaped_errors_and_stores_nothing(client, front_door, registry):
    import httpx

    reply = chat(client, "Hello?")
    scoring = client.completions.create(model="tiny-qwen3", prompt="2+2=", max_tokens=1, echo=True, logprobs=1)
    before = feedback_count(registry)
    with pytest.raises(openai.NotFoundError) as unknown:
        feedback(client, id="chatcmpl-does-not-exist", rating=1)
    assert (unknown.value.code, unknown.value.param) == ("response_not_found", "id")
    with pytest.raises(openai.NotFoundError, match="echo"):  # scoring requests are not harvested
        feedback(client, id=scoring.id, rating=1)
    with pytest.raises(openai.BadRequestError) as seven:
        feedback(client, id=reply.id, rating=7)
    assert seven.value.param == "rating" and "must be 1 (good) or -1 (bad)" in seven.value.message
    with pytest.raises(openai.BadRequestError, match="out of range") as choice:
        feedback(client, id=reply.id, rating=1, choice=3)
    assert choice.value.param == "choice"
    with pytest.raises(openai.BadRequestError, match="a `rating` \\(1 or -1\\), a `correction`, or both"):
        feedback(client, id=reply.id)
    raw = httpx.post(front_door.base_url + "/feedback", content=b"{not json",
                     headers={"Authorization": f"Bearer {FRONT_DOOR_KEY}"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    assert raw.json()["error"]["type"] == "invalid_request_error"
    keyless = httpx.post(front_door.base_url + "/feedback", json={"id": reply.id, "rating": 1})
    assert keyless.status_code == 401
    assert feedback_count(registry) == before


@contextmanager
def served(app):
    """`app` behind uvicorn on a free port, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def test_feedback_to_a_front_door_that_does_not_harvest_says_so(registry):
    from posttrain.serve.app import create_app

    with served(create_app([], api_keys=["k"], harvest=None)) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="started without --log-requests") as off:
            feedback(client, id="chatcmpl-anything", rating=1)
    assert off.value.code == "harvest_off"


@pytest.mark.slow
def test_harvesting_stores_no_api_key_and_no_client_address(client, registry):
    reply = chat(client, "Keep my secrets.")
    feedback(client, id=reply.id, rating=1, comment="fine")
    rows = registry.store.all(RequestLog) + registry.store.all(Feedback)
    stored = json.dumps([{c.name: getattr(r, c.name) for c in r.__table__.columns} for r in rows], default=str)
    assert FRONT_DOOR_KEY not in stored and "127.0.0.1" not in stored and "authorization" not in stored.lower()
    [mine] = registry.store.all(Feedback, Feedback.request_log_id.in_(
        [r.id for r in registry.store.all(RequestLog, RequestLog.response_id == reply.id)]))
    assert mine.key_hash == hashlib.sha256(FRONT_DOOR_KEY.encode()).hexdigest()


@pytest.mark.slow
def test_exports_train_with_posttrain_as_they_are(client, registry, tiny, since, tmp_path):
    from posttrain.train.dpo import DPORecipe, train_dpo
    from posttrain.train.sft import SFTRecipe, train_sft

    reply = chat(client, "Name two fruits.", n=2, temperature=1.0)
    feedback(client, id=reply.id, choice=0, rating=1)
    feedback(client, id=reply.id, choice=1, rating=-1, correction="Apples and pears.")
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    assert export_sft(registry.store, sft, Filters(since=since)).kept >= 2
    assert export_dpo(registry.store, dpo, Filters(since=since)).kept >= 2
    overrides = ["model=tiny-qwen3", *FAST]
    row = train_sft(SFTRecipe.load(None, [*overrides, "output=tiny-harvest-sft", f"data.0.path={sft}"]), registry)
    assert row.datasets[0]["path"] == str(sft)
    row = train_dpo(DPORecipe.load(None, [*overrides, "output=tiny-harvest-dpo", f"data.0.path={dpo}"]), registry)
    assert row.datasets[0]["path"] == str(dpo)


@pytest.mark.slow
def test_the_loop_takes_feedback_pairs(client, registry, since, tmp_path):
    from posttrain.loop import LoopRecipe, export_pairs

    reply = chat(client, "Loop me in.", n=2, temperature=1.0)
    feedback(client, id=reply.id, choice=0, rating=1)
    recipe = LoopRecipe.load(None, [], values={"sources": ["feedback"]})
    summary = export_pairs(registry, recipe, tmp_path / "prefs.jsonl", since, utcnow())
    assert "arena" not in summary.by_source and summary.by_source["feedback-choice"] >= 1
    assert reply.id in {p["meta"].get("response_id") for p in lines(tmp_path / "prefs.jsonl")}
    assert LoopRecipe.load(None, []).sources == ["arena"]


# --- without an engine: the store as the front door fills it -----------------------------

def harvest_row(store: Store, content: str, answer: str, *, model: str = "m", response_id: str | None = None,
                choice: int = 0, when: datetime | None = None, reasoning: str | None = None, **request) -> RequestLog:
    from posttrain.serve.exchange import prompt_hash

    messages = request.pop("messages", [{"role": "user", "content": content}])
    row = RequestLog(model=model, endpoint="chat", request={"model": model, "messages": messages, **request},
                     completion=answer, response_id=response_id or f"chatcmpl-{uuid.uuid4().hex}", choice=choice,
                     prompt_hash=prompt_hash(messages), created_at=when or utcnow(), reasoning=reasoning)
    return store.add(row)


@pytest.fixture
def store(db_url) -> Store:
    return Store(db_url)


def test_sft_export_filters_dedupes_and_says_why(store, tmp_path):
    old = utcnow() - timedelta(days=30)
    harvest_row(store, "hi", "Hello there!")
    harvest_row(store, "hi", "Hello there!", response_id="chatcmpl-again")  # an exact duplicate
    harvest_row(store, "hi", "Hello there!", model="other")
    harvest_row(store, "old", "An old answer.", when=old)
    harvest_row(store, "short", "Ok")
    down = harvest_row(store, "rude", "Go away.")
    up = harvest_row(store, "kind", "Happy to help.")
    harvest_row(store, "tools", "Calling.", messages=[{"role": "user", "content": "x"},
                                                      {"role": "assistant", "content": None, "tool_calls": [{}]},
                                                      {"role": "tool", "content": "42"}])
    harvest_row(store, "dev", "Sure.", messages=[{"role": "developer", "content": "Be brief."},
                                                 {"role": "user", "content": [{"type": "text", "text": "Go"}]}])
    store.add(RequestLog(model="m", endpoint="completions", request={"prompt": "1+1="}, completion="2"))
    for row, rating in ((down, -1), (up, 1)):
        record_feedback(store, FeedbackBody(id=row.response_id, rating=rating))
    out = tmp_path / "sft.jsonl"
    summary = export_sft(store, out, Filters(models=("m",), since=old + timedelta(days=1)), min_length=3)
    kept = [r["messages"] for r in lines(out)]
    assert kept == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"}],
                    [{"role": "user", "content": "kind"}, {"role": "assistant", "content": "Happy to help."}],
                    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go"},
                     {"role": "assistant", "content": "Sure."}]]
    assert str(summary).splitlines() == [
        f"kept 3 conversations -> {out}",
        "dropped 1 exact duplicates",
        "dropped 1 from /v1/completions (not a chat conversation)",
        "dropped 1 rated down",
        "dropped 1 with an answer shorter than 3 characters",
        "dropped 1 with tool calls or non-text content",
    ]
    positive = export_sft(store, out, Filters(models=("m",)), positive_only=True)
    assert positive.kept == 1 and positive.dropped["not rated up (--positive-only)"] == 5


def test_pii_is_masked_and_counted(store, tmp_path):
    harvest_row(store, "Mail jane.doe@example.com or call +1 415 555 0132, key sk-abcdefghijklmnop1234",
                "Call (415) 555-0132 on 2024-11-25 about 1 000 000 items at 3.14159.")
    summary = export_sft(store, tmp_path / "sft.jsonl", scrub_pii=True)
    [record] = lines(tmp_path / "sft.jsonl")
    assert record["messages"] == [
        {"role": "user", "content": "Mail [EMAIL] or call [PHONE], key [KEY]"},
        {"role": "assistant", "content": "Call [PHONE] on 2024-11-25 about 1 000 000 items at 3.14159."}]
    assert "masked 1 email address, 1 key-like string, 2 phone numbers" in str(summary)


def test_purge_deletes_old_logs_and_their_feedback_and_the_cli_says_so(store, db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POSTTRAIN_DB_URL", db_url)
    old, new = utcnow() - timedelta(days=60), utcnow()
    for model in ("a", "b"):
        for when in (old, new):
            row = harvest_row(store, f"{model}{when:%j}", "An answer.", model=model, when=when)
            record_feedback(store, FeedbackBody(id=row.response_id, rating=1))
    assert purge(store, utcnow() - timedelta(days=30), ["a"]) == (1, 1)
    cutoff = f"{utcnow() - timedelta(days=30):%Y-%m-%d}"
    done = subprocess.run([sys.executable, "-m", "posttrain", "data", "purge", "--before", cutoff],
                          capture_output=True, text=True, env=os.environ, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"deleted 1 request logs harvested before {cutoff} 00:00:00 UTC, and 1 feedback on them"
    assert sorted(r.model for r in store.all(RequestLog)) == ["a", "b"] and len(store.all(Feedback)) == 2
    assert all(r.created_at > old for r in store.all(RequestLog))


def test_export_cli_refuses_mixed_up_flags_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    for flags, message in ((["--kind", "csv"], "--kind must be one of sft, dpo"),
                           (["--kind", "sft", "--sources", "arena"], "--sources picks preference pairs"),
                           (["--kind", "dpo", "--sources", "votes"], "unknown preference source 'votes'"),
                           (["--kind", "sft", "--drop-mode-mismatch"], "filters preference pairs: it goes with --kind dpo")):
        done = subprocess.run([sys.executable, "-m", "posttrain", "data", "export", "-o", str(tmp_path / "x"), *flags],
                              capture_output=True, text=True, env=os.environ, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_feedback_python_api_validates_like_the_endpoint(store):
    row = harvest_row(store, "q", "a")
    with pytest.raises(PosttrainError, match="no harvested response"):
        record_feedback(store, FeedbackBody(id="chatcmpl-nope", rating=1))
    with pytest.raises(FeedbackError, match="choice 1 is out of range"):
        record_feedback(store, FeedbackBody(id=row.response_id, rating=1, choice=1))
    assert record_feedback(store, FeedbackBody(id=row.response_id, correction="b")).rating is None


def test_dpo_export_takes_arena_votes_with_feedback_each_pair_saying_its_source(store, tmp_path):
    from posttrain.ui.votes import record_vote

    question = [{"role": "user", "content": "Name a fruit."}]
    record_vote(store, session_hash="s", model_a="m", model_b="n", vote="a",
                conversation_a=question + [{"role": "assistant", "content": "An apple."}],
                conversation_b=question + [{"role": "assistant", "content": "A rock."}])
    record_vote(store, session_hash="s", model_a="m", model_b="n", vote="tie",
                conversation_a=question + [{"role": "assistant", "content": "A pear."}],
                conversation_b=question + [{"role": "assistant", "content": "A plum."}])
    same = harvest_row(store, "Name a colour.", "Blue.")
    record_feedback(store, FeedbackBody(id=same.response_id, rating=-1, correction="Blue."))
    picked = harvest_row(store, "Name a colour.", "Red.", response_id="chatcmpl-n2", choice=0)
    harvest_row(store, "Name a colour.", "Green.", response_id="chatcmpl-n2", choice=1)
    record_feedback(store, FeedbackBody(id=picked.response_id, choice=1, rating=1))
    summary = export_dpo(store, tmp_path / "dpo.jsonl")
    pairs = {p["meta"]["source"]: (p["chosen"][0]["content"], p["rejected"][0]["content"])
             for p in lines(tmp_path / "dpo.jsonl")}
    assert pairs == {"arena": ("An apple.", "A rock."), "feedback-choice": ("Green.", "Red."),
                     "feedback-thumbs": ("Green.", "Blue.")}
    assert summary.dropped == {"arena votes that were ties or both-bad": 1,
                               "with the same answer chosen and rejected": 1}
    later = export_dpo(store, tmp_path / "later.jsonl", Filters(since=utcnow()), sources=["arena", "choice"])
    assert later.kept == 0  # the time range is when the vote or the feedback was given


def test_responses_api_requests_export_as_chats(store, tmp_path):
    store.add(RequestLog(model="m", endpoint="responses", completion="Paris.",
                         request={"model": "m", "input": "Capital of France?", "instructions": "Be brief."}))
    store.add(RequestLog(model="m", endpoint="responses", completion="Two.", request={"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "1+1?"}]}]}))
    export_sft(store, tmp_path / "sft.jsonl")
    assert [r["messages"] for r in lines(tmp_path / "sft.jsonl")] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris."}],
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "Two."}]]


# --- thinking models: the trace from the front door's replies to the exports -------------------

def test_the_exchange_keeps_the_trace_of_plain_streamed_and_responses_replies():
    from posttrain.serve.exchange import Exchange

    plain = Exchange("m", "chat", {"messages": []})
    plain.read({"id": "chatcmpl-1", "choices": [
        {"index": 0, "message": {"content": "Four.", "reasoning": "2 + 2 = 4"}},
        {"index": 1, "message": {"content": None, "reasoning_content": "cut off while thinking"}}]})
    assert [(r.completion, r.reasoning) for r in plain.log_rows()] == [("Four.", "2 + 2 = 4"),
                                                                        ("", "cut off while thinking")]
    streamed = Exchange("m", "chat", {"messages": []})
    for delta in ({"role": "assistant"}, {"reasoning": "2 + 2"}, {"reasoning": " = 4"}, {"content": "Four."}):
        streamed.read({"id": "chatcmpl-2", "choices": [{"index": 0, "delta": delta}]})
    assert [(r.completion, r.reasoning) for r in streamed.log_rows()] == [("Four.", "2 + 2 = 4")]
    off = Exchange("m", "chat", {"messages": []}, thinking_off=True)
    off.read({"id": "chatcmpl-3", "choices": [{"index": 0, "message": {"content": "Four.", "reasoning": None}}]})
    assert off.log_rows()[0].reasoning == ""  # answered after the empty think block
    responses = Exchange("m", "responses", {"input": "2+2?"})
    responses.read({"id": "resp-1", "output": [
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "2 + 2 = 4"}]},
        {"type": "message", "content": [{"type": "output_text", "text": "Four."}]}]})
    events = Exchange("m", "responses", {"input": "2+2?", "stream": True})
    for event in ({"type": "response.reasoning_text.delta", "delta": "2 + 2"},
                  {"type": "response.reasoning_text.delta", "delta": " = 4"},
                  {"type": "response.output_text.delta", "delta": "Four."}):
        events.read(event)
    for exchange in (responses, events):
        assert [(r.completion, r.reasoning) for r in exchange.log_rows()] == [("Four.", "2 + 2 = 4")]


def test_thinking_answers_export_with_their_trace_and_mismatched_pairs_are_flagged(store, tmp_path):
    from posttrain.train.data import EMPTY_THINK

    thought = harvest_row(store, "2+2?", "Four.", reasoning="\n2 + 2 = 4, mail me at jo@example.com\n")
    off = harvest_row(store, "2+2?", "4", reasoning="")
    plain = harvest_row(store, "Hi", "Hello!")
    corrected = harvest_row(store, "3+3?", "Five.", reasoning="3 + 3 = 5?")
    for row, body in ((thought, {"rating": 1}), (off, {"rating": -1}), (corrected, {"correction": "Six."})):
        record_feedback(store, FeedbackBody(id=row.response_id, **body))
    assert plain.reasoning is None
    summary = export_sft(store, tmp_path / "sft.jsonl", scrub_pii=True)
    answers = [r["messages"][-1] for r in lines(tmp_path / "sft.jsonl")]
    assert answers == [{"role": "assistant", "content": "Four.", "reasoning": "\n2 + 2 = 4, mail me at [EMAIL]\n"},
                       {"role": "assistant", "content": "Hello!"},
                       {"role": "assistant", "content": EMPTY_THINK + "Six."}]  # a person's answer has no trace
    assert "  1 with the model's reasoning trace (the assistant's `reasoning` field)" in str(summary).splitlines()
    assert summary.dropped["rated down"] == 1

    summary = export_dpo(store, tmp_path / "dpo.jsonl", sources=["thumbs", "correction"])
    pairs = {p["meta"]["source"]: p for p in lines(tmp_path / "dpo.jsonl")}
    thumbs = pairs["feedback-thumbs"]
    assert thumbs["chosen"] == [{"role": "assistant", "content": "Four.", "reasoning": thought.reasoning}]
    assert thumbs["rejected"] == [{"role": "assistant", "content": EMPTY_THINK + "4"}]
    assert pairs["feedback-correction"]["rejected"][0]["reasoning"] == "3 + 3 = 5?"
    assert all(p["meta"]["mode_mismatch"] for p in pairs.values())
    assert ("  2 of them mode-mismatched: one side thought, the other did not (meta.mode_mismatch; "
            "--drop-mode-mismatch leaves them out)") in str(summary).splitlines()
    dropped = export_dpo(store, tmp_path / "dpo.jsonl", sources=["thumbs", "correction"], drop_mode_mismatch=True)
    assert dropped.kept == 0 and "dropped 2 mode-mismatched (one side thought, the other did not)" in str(dropped)


def test_two_thought_answers_make_a_pair_that_is_not_mismatched(store, tmp_path):
    for choice, (answer, trace) in enumerate((("Blue.", "sky colour"), ("Red.", "a warm one"))):
        row = harvest_row(store, "A colour?", answer, reasoning=trace, response_id="chatcmpl-n2", choice=choice)
    record_feedback(store, FeedbackBody(id=row.response_id, choice=1, rating=1))
    summary = export_dpo(store, tmp_path / "dpo.jsonl", sources=["choice"])
    [pair] = lines(tmp_path / "dpo.jsonl")
    assert (pair["chosen"][0]["reasoning"], pair["rejected"][0]["reasoning"]) == ("a warm one", "sky colour")
    assert "mode_mismatch" not in pair["meta"] and summary.mismatched == 0 and "mismatched" not in str(summary)


def render(messages: list[dict], **kwargs) -> str:
    """posttrain's chat template (every model it trains has it), rendered as the trainers render it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from posttrain.models import chatml_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=chatml_template(), **kwargs)
    return rendered[0]


def test_an_exported_thinking_answer_trains_as_the_model_wrote_it(store, tmp_path):
    """Read back by `posttrain train`, a harvested answer renders as the served model's prompt
    followed by what it generated: the trace in Qwen3's `<think>` block (thinking on), or the
    answer after the empty think block the template put in the prompt (thinking off)."""
    from posttrain.train.data import DataSource, load

    question = [{"role": "user", "content": "2+2?"}]
    up = harvest_row(store, "2+2?", "\n\nFour.", reasoning="\n2 + 2 = 4\n")
    down = harvest_row(store, "2+2?", "4", reasoning="")
    for row, rating in ((up, 1), (down, -1)):
        record_feedback(store, FeedbackBody(id=row.response_id, rating=rating))
    harvest_row(store, "2+2?", "Four!", reasoning="", n=1)  # a second off answer, not rated
    export_sft(store, tmp_path / "sft.jsonl")
    export_dpo(store, tmp_path / "dpo.jsonl", sources=["thumbs"])
    sft = load([DataSource(path=str(tmp_path / "sft.jsonl"))], "sft").rows
    [dpo] = load([DataSource(path=str(tmp_path / "dpo.jsonl"))], "dpo").rows
    on, off = render(question, add_generation_prompt=True), render(question, add_generation_prompt=True,
                                                                    enable_thinking=False)
    assert render(sft[0]["messages"]) == on + "<think>\n2 + 2 = 4\n</think>\n\nFour.<|im_end|>\n"
    assert render(sft[1]["messages"]) == off + "Four!<|im_end|>\n"
    assert render(dpo["prompt"] + dpo["chosen"]) == render(sft[0]["messages"])
    assert render(dpo["prompt"] + dpo["rejected"]) == off + "4<|im_end|>\n"
