"""Thinking models: the registry's thinking format (detected from the lineage and the chat
template, set by hand, migrated), and serving them through the front door on one real vLLM engine
(the tiny Qwen3, which does not think, beside LoRA adapters of it registered as thinking models):
the trace apart from the answer (chat, streamed, Responses API), the per-request switches and the
per-model default mode, refusals, the thinking budget, and harvested replies exported with their
trace as `posttrain train` reads it.

Random weights rarely write a think block, so the tests force one with vLLM's structured outputs
(a regex); the engine applies the grammar inside the trace too (`enable_in_reasoning`)."""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import closing

import httpx
import openai
import pytest
import sqlalchemy as sa

from posttrain.errors import PosttrainError
from posttrain.models import SMOLLM2_SYSTEM, chatml_template
from posttrain.serve.thinking import NOT_THINKING, REASONING_PARSER, Thinking, policies, reasoning_parser, \
    requested_mode
from posttrain.thinking import taught_thinking, template_thinking

# --- which models think: the registry ---------------------------------------------------------

# Qwen3's own template, reduced to what decides the format: its generation prompt and switch.
QWEN3_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}{# reasoning_content #}")
# DeepSeek-R1's: the generation prompt opens the think block.
R1_TEMPLATE = ("{% for m in messages %}{{ '<｜' + m.role + '｜>' + m.content }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


def model_folder(path, template: str | None = None):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if template is not None:
        (path / "chat_template.jinja").write_text(template)
    return path


def test_the_chat_template_tells_a_thinking_model_unless_posttrain_wrote_it(tmp_path):
    assert template_thinking(model_folder(tmp_path / "qwen3", QWEN3_TEMPLATE)) == "qwen3"
    assert template_thinking(model_folder(tmp_path / "r1", R1_TEMPLATE)) == "deepseek_r1"
    # posttrain's ChatML renders Qwen3's switch for every model it builds: it says nothing.
    assert template_thinking(model_folder(tmp_path / "ours", chatml_template(SMOLLM2_SYSTEM))) is None
    assert template_thinking(model_folder(tmp_path / "plain", "{{ messages[0].content }}")) is None
    assert template_thinking(model_folder(tmp_path / "none")) is None
    old = model_folder(tmp_path / "in-config")  # where transformers kept it before chat_template.jinja
    (old / "tokenizer_config.json").write_text(json.dumps({"chat_template": R1_TEMPLATE}))
    assert template_thinking(old) == "deepseek_r1"


def test_the_training_recipe_tells_what_a_model_learned(tmp_path):
    fusion = {"data": [{"path": "builtin:thinking", "thinking": "think"}, {"path": "builtin:chat", "thinking": "no_think"}]}
    assert taught_thinking(fusion) == "qwen3"
    assert taught_thinking({"data": [{"path": "builtin:thinking"}]}) == "deepseek_r1"  # a cold start on traces
    assert taught_thinking({"data": [{"path": "builtin:gsm8k"}], "rewards": [{"name": "think_format"}]}) == "deepseek_r1"
    assert taught_thinking({"data": [{"path": "builtin:chat"}]}) is None
    ours = tmp_path / "traces.jsonl"
    reply = {"role": "assistant", "content": "4", "reasoning": "2 + 2 is 4"}
    ours.write_text(json.dumps({"messages": [{"role": "user", "content": "2 + 2?"}, reply]}) + "\n")
    assert taught_thinking({"data": [{"path": str(ours)}]}) == "deepseek_r1"
    empty = {"role": "assistant", "content": "<think>\n\n</think>\n\n4"}  # a /no_think answer is no trace
    ours.write_text(json.dumps({"messages": [{"role": "user", "content": "2 + 2?"}, empty]}) + "\n")
    assert taught_thinking({"data": [{"path": str(ours)}]}) is None


def test_the_registry_records_detects_inherits_and_sets_the_format(fresh_registry, tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    base = fresh_registry.add("base", model_folder(tmp_path / "base", chatml_template()), stage="base")
    assert base.thinking is None
    fusion = {"data": [{"path": "builtin:thinking", "thinking": "think"}]}
    fused = fresh_registry.add("fused", model_folder(tmp_path / "fused"), stage="sft", parent="base", recipe=fusion)
    assert fused.thinking == "qwen3" and "Thinks before it answers (qwen3 format)" in \
        fresh_registry.card_path(fused).read_text()
    dpo = fresh_registry.add("dpo", model_folder(tmp_path / "dpo"), stage="dpo", parent="fused",
                             recipe={"data": [{"path": "builtin:preference"}]})
    assert dpo.thinking == "qwen3"  # preference tuning of a thinking model keeps it thinking
    assert fresh_registry.add("plain", tmp_path / "base", stage="base", thinking=None).thinking is None
    with pytest.raises(PosttrainError, match="unknown thinking format 'o1'"):
        fresh_registry.add("x", tmp_path / "base", stage="base", thinking="o1")
    runner = CliRunner()
    added = runner.invoke(app, ["models", "add", "r1", str(tmp_path / "base"), "--thinking", "deepseek_r1"])
    assert added.exit_code == 0 and "(thinking: deepseek_r1)" in added.output, added.output
    assert fresh_registry.get("r1").thinking == "deepseek_r1"
    assert runner.invoke(app, ["models", "set-thinking", "base", "qwen3"]).exit_code == 0
    shown = runner.invoke(app, ["models", "show", "base"], terminal_width=200)
    assert "thinking: qwen3" in shown.output
    assert json.loads(runner.invoke(app, ["models", "show", "base", "--json"]).output)["thinking"] == "qwen3"
    assert runner.invoke(app, ["models", "set-thinking", "base", "none"]).exit_code == 0
    assert fresh_registry.get("base").thinking is None


def test_a_database_at_revision_0003_gains_the_column_with_its_rows_kept(tmp_path):
    from alembic import command

    from posttrain.migrations import alembic_config, revisions
    from posttrain.store import Store

    path = tmp_path / "posttrain.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0003")
        conn.exec_driver_sql(
            "INSERT INTO checkpoints (name, path, kind, stage, recipe, datasets, git_commit, created_at, metrics) "
            "VALUES ('old', '/m', 'full', 'sft', '{}', '[]', 'abc', '2025-01-01 00:00:00', '{}')")
    engine.dispose()
    Store(f"sqlite:///{path}")
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT name, stage, thinking FROM checkpoints").fetchall() == [("old", "sft", None)]
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(revisions()[-1],)]


def test_distillation_keeps_a_thinking_teachers_trace_inline():
    from openai.types.chat import ChatCompletionMessage

    from posttrain.train.distill import as_written

    thought = ChatCompletionMessage.model_validate({"role": "assistant", "content": "\n\n15", "reasoning": "\n5 * 3\n"})
    assert as_written(thought) == "<think>\n5 * 3\n</think>\n\n15"
    assert as_written(ChatCompletionMessage(role="assistant", content="15")) == "15"


# --- how a request asks, and what reaches the engine --------------------------------------------


def chat(text: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


@pytest.mark.parametrize("body, mode", [
    (chat("hi"), None),
    (chat("hi /no_think"), False),
    (chat("hi /think", chat_template_kwargs={"enable_thinking": False}), False),  # false is final
    (chat("hi /no_think", chat_template_kwargs={"enable_thinking": True}), False),  # else the switch decides
    (chat("what does /think do?"), None),  # only as the last word, as posttrain's fusion data has it
    (chat("hi", reasoning_effort="none"), False),
    (chat("hi", reasoning_effort="low"), True),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi /think"}]}]}, True),
])
def test_a_request_asks_for_a_mode_as_qwen3_reads_it(body, mode):
    assert requested_mode("responses" if "input" in body else "chat", body)[0] is mode


def test_what_reaches_the_engine():
    plain = chat("hi")
    assert Thinking("qwen3").apply("m", "chat", plain) is plain  # nothing to change: sent as the client's bytes
    off = Thinking("qwen3", default=False, budget=64)
    assert off.apply("m", "chat", plain)["chat_template_kwargs"] == {"enable_thinking": False}
    on = off.apply("m", "chat", chat("hi /think", max_thinking_tokens=8))
    assert on["chat_template_kwargs"] == {"enable_thinking": True} and on["thinking_token_budget"] == 8
    assert "max_thinking_tokens" not in on
    assert Thinking("deepseek_r1", budget=64).apply("m", "completions", {"prompt": "x"})["thinking_token_budget"] == 64
    assert "thinking_token_budget" not in Thinking("deepseek_r1", budget=64).apply("m", "responses", {"input": "x"})
    # A model that does not think: off is what it does, and its template must not render a think block.
    assert Thinking().apply("m", "chat", chat("hi", chat_template_kwargs={"enable_thinking": False, "x": 1})) \
        == chat("hi", chat_template_kwargs={"x": 1})
    beside = Thinking(beside_thinkers=True).apply("m", "chat", plain)
    assert beside["chat_template_kwargs"] == {NOT_THINKING: True}


@pytest.mark.parametrize("thinking, body, param", [
    (Thinking(), chat("hi", chat_template_kwargs={"enable_thinking": True}), "chat_template_kwargs.enable_thinking"),
    (Thinking(), chat("hi /think"), "messages"),
    (Thinking(), chat("hi", max_thinking_tokens=10), "max_thinking_tokens"),
    (Thinking(), chat("hi", reasoning_effort="high"), "reasoning_effort"),
    (Thinking("deepseek_r1"), chat("hi /no_think"), "messages"),
    (Thinking("qwen3"), chat("hi", max_thinking_tokens=-1), "max_thinking_tokens"),
    (Thinking("qwen3"), chat("hi", max_thinking_tokens=True), "max_thinking_tokens"),
    (Thinking("qwen3"), {"model": "m", "input": "hi", "max_thinking_tokens": 8}, "max_thinking_tokens"),
])
def test_what_a_model_cannot_do_is_a_400(thinking, body, param):
    refusal = thinking.apply("m", "responses" if "input" in body else "chat", body)
    assert refusal.status_code == 400 and json.loads(refusal.body)["error"]["param"] == param


def test_each_engine_gets_the_parser_its_models_need(tmp_path):
    assert reasoning_parser(str(tmp_path), [None, None]) is None
    assert reasoning_parser(str(tmp_path), ["qwen3", "deepseek_r1"]) == "qwen3"
    assert reasoning_parser(str(tmp_path), [None, "qwen3"]) == REASONING_PARSER
    # deepseek_r1's parser finds <think> by token id: only where it is one token.
    assert reasoning_parser(str(tmp_path), ["deepseek_r1"]) == "qwen3"
    tokens = {"model": {"vocab": {"a": 0}}, "added_tokens": [{"content": "<think>"}, {"content": "</think>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokens))
    assert reasoning_parser(str(tmp_path), ["deepseek_r1"]) == "deepseek_r1"


def test_serve_options_for_a_model_that_cannot_take_them_fail_at_start(registry, tiny):
    from posttrain.serve.app import start_front_door

    with pytest.raises(PosttrainError, match="tiny-qwen3 does not think"):
        start_front_door([tiny.name], registry=registry, thinking={tiny.name: True})
    with pytest.raises(PosttrainError, match="nope, which is not a local model"):
        policies({"m": "qwen3"}, {"m": "qwen3"}, {}, {"nope": 5})
    with pytest.raises(PosttrainError, match="r1 always thinks"):
        policies({"r1": "deepseek_r1"}, {"r1": "qwen3"}, {"r1": False}, {})


def test_serve_flags_are_checked_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "POSTTRAIN_HOME": str(tmp_path)}
    for flag, expected in (("--thinking=m=maybe", "expected NAME=on|off"), ("--max-thinking-tokens=m=-5", "NAME=TOKENS")):
        done = subprocess.run([sys.executable, "-m", "posttrain", "serve", "--models", "m", flag], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 2 and expected in done.stderr and done.stderr.count("\n") == 1, done.stderr


# --- through the front door, on a real engine ---------------------------------------------------

THINKER, THINKER_OFF, R1 = "tiny-think", "tiny-think-off", "tiny-r1"
KEY = "thinking-key"
FORCED = {"regex": "<think>[a-z ]{1,20}</think>[a-z ]{1,20}"}
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def door(registry, tiny):
    """tiny-qwen3 (does not think) and three LoRA adapters of it registered as thinking models,
    all on one engine: tiny-think (qwen3), tiny-think-off (qwen3, off unless asked), tiny-r1
    (deepseek_r1, a default budget of 12 tokens). Requests are harvested."""
    from conftest import build_tiny_lora

    from posttrain.serve.app import start_front_door

    for name, thinking in ((THINKER, "qwen3"), (THINKER_OFF, "qwen3"), (R1, "deepseek_r1")):
        build_tiny_lora(registry, name)
        registry.set_thinking(name, thinking)
    door = start_front_door([tiny.name, THINKER, THINKER_OFF, R1], api_keys=[KEY], registry=registry, log_requests=True,
                            engine_args=["--structured-outputs-config", json.dumps({"enable_in_reasoning": True})],
                            thinking={THINKER_OFF: False}, max_thinking_tokens={R1: 12})
    yield door
    door.stop()


@pytest.fixture(scope="module")
def client(door) -> openai.OpenAI:
    return openai.OpenAI(base_url=door.base_url, api_key=KEY, max_retries=0)


def reasoning(message) -> str | None:
    """vLLM 0.32 names the trace `reasoning`; older servers said `reasoning_content`."""
    extra = message.model_extra or {}
    return extra.get("reasoning") or extra.get("reasoning_content")


def forced_chat(client, model: str, **kw):
    return client.chat.completions.create(model=model, messages=HELLO, max_tokens=60, temperature=0,
                                          extra_body={"structured_outputs": FORCED, **kw.pop("extra_body", {})}, **kw)


@pytest.mark.slow
def test_the_trace_comes_apart_from_the_answer_plain_and_streamed(client, door):
    assert door.engines[0].command()[door.engines[0].command().index("--reasoning-parser") + 1] == REASONING_PARSER
    message = forced_chat(client, THINKER).choices[0].message
    trace, answer = reasoning(message), message.content
    assert trace and answer and "<think>" not in answer and "</think>" not in trace + answer
    streamed = list(forced_chat(client, THINKER, stream=True))
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert "".join(reasoning(d) or "" for d in deltas) == trace
    assert "".join(d.content or "" for d in deltas) == answer
    cards = {m.id: m.model_extra["thinking"] for m in client.models.list()}
    assert cards == {"tiny-qwen3": None, THINKER: "qwen3", THINKER_OFF: "qwen3", R1: "deepseek_r1"}
    assert client.models.retrieve(R1).model_extra["thinking"] == "deepseek_r1"


@pytest.mark.slow
def test_a_model_that_does_not_think_keeps_its_reply_in_content_beside_thinkers(client):
    plain = client.chat.completions.create(model="tiny-qwen3", messages=HELLO, max_tokens=8, temperature=0)
    assert plain.choices[0].message.content and reasoning(plain.choices[0].message) is None
    literal = forced_chat(client, "tiny-qwen3").choices[0].message
    assert literal.content.startswith("<think>") and reasoning(literal) is None


@pytest.mark.slow
def test_the_responses_api_carries_the_trace_in_a_reasoning_item(client):
    response = client.responses.create(model=THINKER, input="hello there", max_output_tokens=60, temperature=0,
                                       extra_body={"structured_outputs": FORCED})
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"], kinds
    trace = "".join(part.text for part in response.output[0].content)
    assert trace and response.output_text and "think>" not in trace + response.output_text
    events = list(client.responses.create(model=THINKER, input="hello there", max_output_tokens=60, temperature=0,
                                          stream=True, extra_body={"structured_outputs": FORCED}))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == trace
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text


def tokens(door, model: str, messages: list[dict], **extra) -> list[int]:
    reply = httpx.post(door.base_url.removesuffix("/v1") + "/tokenize", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": model, "messages": messages, "add_generation_prompt": True, **extra}, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


@pytest.mark.slow
def test_switching_thinking_off_renders_the_templates_empty_think_block(client, door, tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.path)

    def rendered(messages, **kw) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    off = rendered(HELLO, enable_thinking=False)
    assert off != rendered(HELLO)
    assert tokens(door, THINKER, HELLO, chat_template_kwargs={"enable_thinking": False}) == off
    assert tokens(door, THINKER_OFF, HELLO) == off  # off by default at `serve` time
    asked = [{"role": "user", "content": "hello there /think"}]
    assert tokens(door, THINKER_OFF, asked) == rendered(asked)  # ... until a request says /think
    soft_off = [{"role": "user", "content": "hello there /no_think"}]
    assert tokens(door, THINKER, soft_off) == rendered(soft_off, enable_thinking=False)
    # A model that does not think is never given the empty block: off is what it does anyway.
    assert tokens(door, "tiny-qwen3", HELLO, chat_template_kwargs={"enable_thinking": False}) == rendered(HELLO)
    reply = client.chat.completions.create(model=THINKER, messages=HELLO, max_tokens=4, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.usage.prompt_tokens == len(off) and reasoning(reply.choices[0].message) is None


@pytest.mark.slow
def test_asking_a_model_for_what_it_cannot_do_is_an_openai_400(client):
    for model, extra in (("tiny-qwen3", {"chat_template_kwargs": {"enable_thinking": True}}),
                         ("tiny-qwen3", {"max_thinking_tokens": 32}),
                         (R1, {"chat_template_kwargs": {"enable_thinking": False}})):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=HELLO, max_tokens=4, extra_body=extra)
        assert refused.value.code == "thinking_not_supported", refused.value
    with pytest.raises(openai.BadRequestError, match="does not think"):
        client.responses.create(model="tiny-qwen3", input="hello /think", max_output_tokens=4)


def long_trace(client, model: str, **extra):
    """A trace the grammar would run to max_tokens: the prompt opens the think block, so the budget
    counts from the first generated token (a forced <think> may be spelled in other tokens)."""
    messages = [*HELLO, {"role": "assistant", "content": "<think>\n"}]
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=80, temperature=0,
        extra_body={"structured_outputs": {"regex": "[a-z ]+</think>[a-z ]{1,20}"}, "continue_final_message": True,
                    "add_generation_prompt": False, **extra})


@pytest.mark.slow
def test_the_thinking_budget_closes_the_trace_and_the_model_answers(client):
    unbounded = long_trace(client, THINKER)
    assert unbounded.choices[0].finish_reason == "length" and not unbounded.choices[0].message.content
    for model, extra, budget in ((THINKER, {"max_thinking_tokens": 16}, 16), (R1, {}, 12)):
        reply = long_trace(client, model, **extra)
        spent = reply.usage.completion_tokens_details.reasoning_tokens
        assert abs(spent - budget) <= 3, (model, spent)
        assert reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
        assert len(reasoning(reply.choices[0].message)) < len(reasoning(unbounded.choices[0].message))


# --- evaluating a thinking model in both modes, through the door ---------------------------------


def forced_in_thinking_mode(pattern: str):
    """`modes.request_body`, plus a regex that forces `pattern` on every reply asked to think
    (random weights rarely think on their own)."""
    from posttrain.evaluate.modes import request_body

    def body(mode, fmt):
        fields = request_body(mode, fmt)
        return fields | {"structured_outputs": {"regex": pattern}} if mode else fields

    return body


@pytest.mark.slow
def test_mt_bench_in_both_modes_shows_the_judge_only_the_answer(door, registry, monkeypatch, tmp_path):
    from posttrain.evaluate import mt_bench
    from posttrain.evaluate.endpoint import Endpoint

    monkeypatch.setattr(mt_bench, "request_body", forced_in_thinking_mode("<think>zqxj[a-z]{2,12}</think>[a-z ]{1,20}"))
    judged, chat = [], Endpoint.chat

    async def recorded(self, messages, gate, **params):
        if self.model == "tiny-qwen3":  # the judge
            judged.append(json.dumps(messages))
        return await chat(self, messages, gate, **params)

    monkeypatch.setattr(Endpoint, "chat", recorded)
    result = mt_bench.run_mt_bench(THINKER, judge_model="tiny-qwen3", base_url=door.base_url, api_key=KEY, limit=1,
                                   max_tokens=48, judge_max_tokens=32, constrain=False, thinking="both",
                                   cache_dir=tmp_path, suite="door-thinking", registry=registry)
    answers = [json.loads(line) for line in (tmp_path / f"{THINKER}.jsonl").read_text().splitlines()]
    traces = [a["reasoning"] for a in answers if a.get("reasoning")]
    assert len(answers) == 4 and len(traces) == 2 and all(t.startswith("zqxj") for t in traces), answers
    assert len(judged) == 5  # the probe and 2 turns x 2 modes
    assert not any("zqxj" in request for request in judged), "a judge saw a trace"
    assert all(any(json.dumps(a["text"])[1:-1] in request for request in judged) for a in answers)
    spent = {(s.task, s.metric): s.value for s in result.scores}
    assert spent[("mt_bench@think", "reasoning_tokens")] > 0 and spent[("mt_bench@no_think", "reasoning_tokens")] == 0
    assert all(r["reasoning_tokens"][0][r["turn"] - 1] > 0 for r in result.records if r["thinking"] is True)


@pytest.mark.slow
def test_eval_bench_scores_the_answer_after_the_trace(door, registry, monkeypatch):
    from posttrain.evaluate import bench

    # The trace holds the task's stop string ("Question:"), which sent to vLLM would end the
    # generation inside the trace, before any answer.
    monkeypatch.setattr(bench, "request_body",
                        forced_in_thinking_mode("<think>Question: what is 5 plus 6</think>The answer is 11"))
    result = bench.run_bench(THINKER, ["posttrain_math"], base_url=door.base_url, api_key=KEY, limit=1,
                             max_gen_toks=48, thinking="both", suite="door-thinking", registry=registry)
    scores = {(s.task, s.metric): s.value for s in result.scores}
    assert scores[("posttrain_math@think", "exact_match,last-number")] == 1.0
    [sample] = [json.loads(line) for line in (result.samples_path / "posttrain_math@think.jsonl").open()]
    assert sample["resps"] == [["The answer is 11"]]  # the answer alone was scored
    assert scores[("posttrain_math@think", "reasoning_tokens")] > 0
    assert ("posttrain_math@no_think", "exact_match,last-number") in scores
    assert scores[("posttrain_math@no_think", "reasoning_tokens")] == 0


# --- harvested, exported, trained on: the trace kept -------------------------------------------

# One word each, so no answer is blank (an export drops those) and no trace holds spaces to strip.
WORDS = {"regex": "<think>[a-z]{1,12}</think>[a-z]{1,12}"}


def harvested(client, model: str, text: str, *, constrain: dict = WORDS, **kw):
    extra_body = {"structured_outputs": constrain, **kw.pop("extra_body", {})}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=40,
                                          temperature=kw.pop("temperature", 0), extra_body=extra_body, **kw)


def rate(client, response_id: str, **body) -> None:
    """Feedback waits for the harvested row, so the rows are in the store once it returns."""
    client.post("/feedback", body={"id": response_id, **body}, cast_to=object)


def as_trained(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.slow
def test_a_harvested_thinking_reply_exports_with_its_trace_plain_and_streamed(client, registry, tiny, tmp_path):
    from transformers import AutoTokenizer

    from posttrain.harvest.export import export_sft
    from posttrain.harvest.logs import Filters
    from posttrain.store import RequestLog, utcnow
    from posttrain.train.data import DataSource, load

    since, question = utcnow(), [{"role": "user", "content": "harvest my thoughts"}]
    plain = harvested(client, THINKER, question[0]["content"])
    chunks = list(harvested(client, THINKER, question[0]["content"], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = ("".join(reasoning(d) or "" for d in deltas), "".join(d.content or "" for d in deltas))
    response = client.responses.create(model=THINKER, input=question[0]["content"], max_output_tokens=40,
                                       temperature=0, extra_body={"structured_outputs": WORDS})
    off = harvested(client, THINKER_OFF, question[0]["content"], constrain={"regex": "[a-z]{1,12}"})
    for response_id in (plain.id, chunks[0].id, response.id, off.id):
        rate(client, response_id, rating=1)
    stored = {r.response_id: (r.reasoning, r.completion)
              for r in registry.store.all(RequestLog, RequestLog.created_at >= since)}
    message, answer = plain.choices[0].message, off.choices[0].message.content
    assert stored[plain.id] == (reasoning(message), message.content) and reasoning(message)
    assert stored[chunks[0].id] == streamed and streamed[0]
    trace = "".join(part.text for part in response.output[0].content)
    assert stored[response.id] == (trace, response.output_text) and trace
    assert stored[off.id] == ("", answer) and reasoning(off.choices[0].message) is None  # thinking off

    export_sft(registry.store, tmp_path / "sft.jsonl", Filters(models=(THINKER, THINKER_OFF), since=since))
    exported = [json.loads(line)["messages"][-1] for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert {"role": "assistant", "content": message.content, "reasoning": reasoning(message)} in exported
    assert {"role": "assistant", "content": streamed[1], "reasoning": streamed[0]} in exported
    # Read back by `posttrain train`: the prompt as the engine rendered it, then what the model wrote.
    tokenizer = AutoTokenizer.from_pretrained(tiny.path)
    trained = {row["messages"][-1]["content"]: as_trained(tokenizer, row["messages"])
               for row in load([DataSource(path=str(tmp_path / "sft.jsonl"))], "sft").rows}
    thought = f"<think>\n{reasoning(message)}\n</think>\n\n{message.content}"
    assert trained[thought] == as_trained(tokenizer, question, add_generation_prompt=True) + thought + "<|im_end|>\n"
    prompt_off = as_trained(tokenizer, question, add_generation_prompt=True, enable_thinking=False)
    assert prompt_off.endswith("<think>\n\n</think>\n\n")
    assert trained["<think>\n\n</think>\n\n" + answer] == prompt_off + answer + "<|im_end|>\n"


@pytest.mark.slow
def test_a_pair_of_a_thought_and_an_unthought_reply_is_flagged_as_mode_mismatched(client, registry, tmp_path):
    from posttrain.harvest.export import export_dpo
    from posttrain.harvest.logs import Filters
    from posttrain.store import utcnow
    from posttrain.train.data import DataSource, load

    since, text = utcnow(), "pair my thoughts"
    thought = harvested(client, THINKER, text)
    direct = harvested(client, THINKER, text, constrain={"regex": "[a-z]{1,12}"},
                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    both = harvested(client, THINKER, text, n=2, temperature=1.0)
    rate(client, thought.id, rating=1)
    rate(client, direct.id, rating=-1)
    rate(client, both.id, choice=1, rating=1)
    out = tmp_path / "dpo.jsonl"
    summary = export_dpo(registry.store, out, Filters(since=since), sources=["thumbs", "choice"])
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    [mismatched] = [p for p in pairs if p["meta"].get("chosen_response_id") == thought.id]
    [matched] = [p for p in pairs if p["meta"].get("response_id") == both.id]
    assert mismatched["chosen"][0]["reasoning"] == reasoning(thought.choices[0].message)
    assert mismatched["rejected"] == [{"role": "assistant",
                                       "content": "<think>\n\n</think>\n\n" + direct.choices[0].message.content}]
    assert mismatched["meta"]["mode_mismatch"] is True and "mode_mismatch" not in matched["meta"]
    assert summary.mismatched == 2 and "2 of them mode-mismatched" in str(summary)  # both thumbs-ups vs `direct`
    chosen, rejected = (next(c.message for c in both.choices if c.index == i) for i in (1, 0))
    assert (matched["chosen"][0]["reasoning"], matched["rejected"][0]["reasoning"]) == \
        (reasoning(chosen), reasoning(rejected))
    row = load([DataSource(path=str(out))], "dpo").rows[pairs.index(matched)]  # one source: the file's order
    assert row["chosen"][0]["content"] == f"<think>\n{reasoning(chosen)}\n</think>\n\n{chosen.content}"
    dropped = export_dpo(registry.store, out, Filters(since=since), sources=["thumbs"], drop_mode_mismatch=True)
    assert (dropped.kept, dropped.dropped["mode-mismatched (one side thought, the other did not)"]) == (0, 2)


# --- the arena: a battle in thinking mode (issue 18 item 2) --------------------------------------


@pytest.mark.slow
def test_an_arena_battle_in_thinking_mode_shows_each_trace_collapsed_apart_from_its_answer(door, tmp_path):
    from types import SimpleNamespace

    from test_arena import parts, start_arena, stream, text

    # Both qwen3 adapters think when asked; tiny-qwen3 does not, so a thinking battle never pairs it.
    arena = start_arena(SimpleNamespace(base_url=door.base_url, api_key=KEY), tmp_path,
                        "--models", f"tiny-qwen3,{THINKER},{THINKER_OFF}", "--thinking", "on",
                        "--extra-body", json.dumps({"structured_outputs": FORCED}))
    try:
        client = arena.client()
        final = stream(client.submit("hello there", api_name="/battle_send"))[-1]
        shown = [parts(chat) for chat in final[:2]]
        for trace, answer in shown:
            assert trace["metadata"]["status"] == "done" and answer and "think>" not in answer + text(trace)
            assert re.fullmatch(r"Thought for [1-9]\d* tokens?", trace["metadata"]["title"]), trace["metadata"]
        client.predict(api_name="/battle_vote_a")
        [battle] = arena.battles()
        assert {battle.model_a, battle.model_b} == {THINKER, THINKER_OFF} and battle.thinking is True
        for conversation, (trace, answer) in zip((battle.conversation_a, battle.conversation_b), shown):
            # stored as the model wrote them; shown without the leading space a trace or answer starts with
            assert (conversation[-1]["reasoning"].strip(), conversation[-1]["content"].strip()) == (text(trace), answer)
            assert trace["metadata"]["title"].split()[2] == str(conversation[-1]["reasoning_tokens"])
        on, off = (json.dumps(client.predict(mode, api_name="/leaderboard")) for mode in ("on", "off"))
        assert THINKER in on and "No votes yet with thinking off" in off
    finally:
        arena.stop()
