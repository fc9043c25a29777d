"""Fuzzing the front door's HTTP surface against the real engine (`front_door`: tiny Qwen3 and
its LoRA on one vLLM process). Hypothesis writes request bodies: well-formed OpenAI requests
with hostile values, arbitrary JSON, and bytes that are not JSON. Whatever arrives, the answer
is a success or an OpenAI-shaped client error; never a 5xx (a 503 would mean the engine died),
never a traceback, and the front door and its engine stay healthy.

The number of cases is bounded (FUZZ_EXAMPLES, default 60 per test) so the suite stays
within CI's time; run it longer with e.g. `FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_http.py`.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from conftest import TINY_LORA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)
models = st.sampled_from(["tiny-qwen3", TINY_LORA, "nope", ""]) | json_values
small_ints = st.integers(-3, 40) | json_values
content = st.text(max_size=40) | st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "bogus"]), "text": st.text(max_size=10)}), max_size=2) | json_values
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "wizard"]) | json_values},
    optional={"content": content, "name": json_values, "tool_calls": json_values, "reasoning": json_values})
sampling = {
    "max_tokens": small_ints, "temperature": st.floats(-1, 3) | json_values, "top_p": st.floats(-1, 2) | json_values,
    "n": st.integers(-1, 3) | json_values, "seed": st.integers(-2**70, 2**70) | json_values, "stop": json_values,
    "stream": st.booleans() | json_values, "stream_options": json_values, "logprobs": st.booleans() | small_ints,
    "logit_bias": json_values, "response_format": json_values, "user": json_values, "extra_field": json_values,
}
chat_bodies = st.fixed_dictionaries(
    {"model": models, "messages": st.lists(message, max_size=3) | json_values},
    optional={**sampling, "top_logprobs": small_ints, "tools": json_values, "tool_choice": json_values,
              "chat_template_kwargs": json_values, "max_completion_tokens": small_ints})
token_ids = st.lists(st.integers(-5, 200_000), max_size=6)
completion_bodies = st.fixed_dictionaries(
    {"model": models, "prompt": st.text(max_size=40) | token_ids | st.lists(token_ids, max_size=2) | json_values},
    optional={**sampling, "echo": st.booleans() | json_values, "suffix": json_values, "best_of": small_ints})
response_bodies = st.fixed_dictionaries(
    {"model": models, "input": st.text(max_size=40) | st.lists(message, max_size=3) | json_values},
    optional={"max_output_tokens": small_ints, "temperature": sampling["temperature"], "stream": sampling["stream"],
              "instructions": json_values, "reasoning": json_values, "tools": json_values, "text": json_values})
raw_bodies = st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode())


def ensure_answered_properly(reply: httpx.Response) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text[:500])
    if reply.status_code != 200:
        error = reply.json()["error"]
        assert isinstance(error["message"], str) and isinstance(error["type"], str), reply.text[:500]
        assert "Traceback" not in reply.text
    elif reply.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e.partition("data: ")[2] for e in reply.text.split("\n\n") if e.strip()]
        assert events[-1] == "[DONE]" or json.loads(events[-1])["type"] == "response.completed", reply.text[-500:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), event[:500]
    else:
        assert isinstance(reply.json(), dict)


@pytest.fixture(scope="module")
def http(front_door):
    headers = {"Authorization": f"Bearer {front_door.api_key}", "content-type": "application/json"}
    with httpx.Client(base_url=front_door.base_url, headers=headers, timeout=120) as client:
        yield client
    health = httpx.get(front_door.base_url.removesuffix("/v1") + "/health", timeout=10)
    assert health.status_code == 200 and all(e["restarts"] == 0 for e in health.json()["engines"]), health.text


@FUZZ
@given(body=chat_bodies)
def test_fuzzed_chat_requests(http, body):
    ensure_answered_properly(http.post("/chat/completions", content=json.dumps(body)))


@FUZZ
@given(body=completion_bodies)
def test_fuzzed_completion_requests(http, body):
    ensure_answered_properly(http.post("/completions", content=json.dumps(body)))


@FUZZ
@given(body=response_bodies)
def test_fuzzed_responses_requests(http, body):
    ensure_answered_properly(http.post("/responses", content=json.dumps(body)))


@FUZZ
@given(body=raw_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/responses",
                                               "/v1/models", "/tokenize", "/detokenize"]))
def test_fuzzed_raw_bodies(http, body, path):
    root = str(http.base_url).rstrip("/").removesuffix("/v1")
    ensure_answered_properly(http.post(root + path, content=body))
