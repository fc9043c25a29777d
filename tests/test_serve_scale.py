"""Beyond one engine: two replicas of tiny-qwen3 behind the front door with fail-over, and a
remote engine (a vLLM started outside posttrain, with its own key) routed under a name of ours
beside them. Real processes throughout; nothing of the network is mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from posttrain.errors import PosttrainError
from posttrain.serve.app import start_front_door
from posttrain.serve.engine import Engine, check_engine_args, free_port, plan
from posttrain.serve.recipe import ServeRecipe
from posttrain.serve.upstream import Upstream
from posttrain.store import RequestLog

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "serve.yaml"

pytestmark = pytest.mark.slow

REMOTE_KEY = "remote-secret"


@pytest.fixture(scope="module")
def remote(tiny, session_home):
    """A vLLM OpenAI server that posttrain did not start, serving tiny-qwen3 as `remote-tiny`."""
    port = free_port()
    log = open(session_home / "logs-remote-vllm.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny.path, "--served-model-name",
         "remote-tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
         "--api-key", REMOTE_KEY], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    while True:
        assert process.poll() is None, (session_home / "logs-remote-vllm.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the remote vLLM did not start"
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    yield process, url
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def door(remote, registry, tiny):
    _, url = remote
    with start_front_door([tiny.name], api_keys=["door-key"], log_requests=True, registry=registry, replicas=2,
                          dtype="float32",
                          upstreams=[Upstream("remote", url, api_key=REMOTE_KEY, model="remote-tiny")]) as front:
        yield front


@pytest.fixture(scope="module")
def client(door):
    return openai.OpenAI(base_url=door.base_url, api_key="door-key", max_retries=0)


def test_remote_and_local_models_share_one_list_and_one_harvest(client, door, registry):
    cards = {m.id: m for m in client.models.list()}
    assert set(cards) == {"tiny-qwen3", "remote"} and len(door.engines) == 2
    assert cards["remote"].model_extra["capabilities"] == {"prompt_logprobs": True}  # a vLLM upstream has them
    assert cards["remote"].model_extra["root"] == door.upstreams[0].url
    marker = uuid.uuid4().hex
    messages = [{"role": "user", "content": f"remote {marker}"}]
    local = client.chat.completions.create(model="tiny-qwen3", messages=messages, max_tokens=6, temperature=0)
    far = client.chat.completions.create(model="remote", messages=messages, max_tokens=6, temperature=0)
    assert far.choices[0].message.content == local.choices[0].message.content  # the same weights, fp32 both
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="remote", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert streamed == far.choices[0].message.content
    deadline = time.monotonic() + 30
    while len(rows := [r for r in registry.store.all(RequestLog, RequestLog.model == "remote")
                       if marker in json.dumps(r.request)]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(rows) == 2 and REMOTE_KEY not in json.dumps([r.request for r in rows])
    metrics = text_string_to_metric_families(httpx.get(door.base_url.removesuffix("/v1") + "/metrics").text)
    assert {"model": "remote", "endpoint": "chat", "status": "200"} in [
        s.labels for family in metrics for s in family.samples if s.name == "posttrain_requests_total" and s.value == 2]


def test_engines_answer_only_the_front_door(door):
    engine = door.engine("tiny-qwen3", replica=0)
    body = {"model": "tiny-qwen3", "prompt": "hi", "max_tokens": 1}
    assert httpx.post(engine.url + "/v1/completions", json=body).status_code == 401
    assert httpx.post(engine.url + "/v1/completions", json=body, headers=engine.headers).status_code == 200


def stream_until(client, stop: threading.Event, outcomes: list) -> None:
    """Stream chats back to back; record (start time, error or None) for each."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            chunks = list(client.chat.completions.create(
                model="tiny-qwen3", messages=[{"role": "user", "content": "Count to ten."}], max_tokens=24,
                temperature=0, stream=True))
            error = None if chunks and chunks[-1].choices[0].finish_reason else "stream ended early"
        except openai.OpenAIError as exc:
            error = f"{type(exc).__name__}: {exc}"
        outcomes.append((started, error))


def test_a_replica_killed_under_load_fails_no_request_that_started_after(client, door):
    stop, outcomes = threading.Event(), []
    streams = [threading.Thread(target=stream_until, args=(client, stop, outcomes)) for _ in range(4)]
    for thread in streams:
        thread.start()
    try:
        while len(outcomes) < 8:  # both replicas are busy
            time.sleep(0.1)
        victim = door.engine("tiny-qwen3", replica=0)
        os.killpg(victim.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while len([o for o in outcomes if o[0] > killed_at]) < 24:
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in streams:
            thread.join()
    after = [error for started, error in outcomes if started > killed_at]
    assert after and [e for e in after if e] == []
    health = httpx.get(door.base_url.removesuffix("/v1") + "/health").json()
    assert health["status"] in ("degraded", "ok")  # the other replica answered throughout


def test_a_remote_that_is_down_gives_the_openai_shaped_503(client, remote):
    process, _ = remote
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.status_code == 503 and err.value.body["code"] == "engine_unavailable"
    assert "remote" in err.value.body["message"]
    assert client.chat.completions.create(model="tiny-qwen3", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices


def test_wrong_upstreams_engine_arguments_and_exposure_are_one_line_errors_before_anything_starts(
        registry, tiny, door, session_home, monkeypatch):
    engine_log = session_home / "logs" / f"engine-{tiny.name}.log"
    starts = engine_log.read_text().count("\n=== ") if engine_log.exists() else 0
    lying = Upstream("liar", door.base_url, api_key="door-key", model="not-served-there")
    with pytest.raises(PosttrainError, match=r"does not serve 'not-served-there' \(it lists: tiny-qwen3, remote\)"):
        start_front_door([tiny.name], registry=registry, upstreams=[lying])
    with pytest.raises(PosttrainError, match="cannot reach upstream"):
        start_front_door([], registry=registry, upstreams=[Upstream("gone", f"http://127.0.0.1:{free_port()}/v1")])
    with pytest.raises(PosttrainError, match="engine argument: unrecognized arguments: --tensr-parallel-size"):
        start_front_door([tiny.name], registry=registry, engine_args=["--tensr-parallel-size", "2"])
    with pytest.raises(PosttrainError, match="refusing to listen on 0.0.0.0 without an API key"):
        start_front_door([tiny.name], host="0.0.0.0", registry=registry)
    for value, message in [('--enforce-eager "unclosed', "POSTTRAIN_ENGINE_ARGS: No closing quotation"),
                           ("--enforce-eagr", "engine argument: unrecognized arguments: --enforce-eagr")]:
        monkeypatch.setenv("POSTTRAIN_ENGINE_ARGS", value)
        with pytest.raises(PosttrainError, match=message):
            start_front_door([tiny.name], registry=registry)
    # Every check came before any engine start (each start is logged with its command line).
    assert (engine_log.read_text().count("\n=== ") if engine_log.exists() else 0) == starts


def test_a_door_opened_before_its_engine_is_ready_refuses_then_reports_a_failed_start(registry, tiny):
    """`start_front_door(wait=False)` (what `posttrain up` does, so the arena opens at once): the
    model list answers with `ready: false` and requests get the OpenAI-shaped 503 while the
    engine starts; an engine that dies starting (here vLLM refuses a context longer than the
    model's) is `wait_ready()`'s one-line error, with nothing left running."""
    with start_front_door([tiny.name], registry=registry, max_model_len=100_000, wait=False) as door:
        client = openai.OpenAI(base_url=door.base_url, api_key="none", max_retries=0)
        assert [(m.id, m.model_extra["ready"]) for m in client.models.list()] == [(tiny.name, False)]
        with pytest.raises(openai.APIStatusError, match="is starting; retry shortly") as err:
            client.chat.completions.create(model=tiny.name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
        with pytest.raises(PosttrainError, match=f"the vLLM engine for {tiny.name} exited during start-up"):
            door.wait_ready()
        assert not any(engine.alive() for engine in door.engines)
        assert [m.model_extra["ready"] for m in client.models.list()] == [False]


def test_the_serve_recipes_parallelism_becomes_engine_arguments_that_vllms_parser_accepts(registry, tiny, tmp_path):
    """What a GPU host's recipe sets (no GPU here to run them on: vLLM's own parser is the check)."""
    recipe = ServeRecipe.load(RECIPE, ["tensor_parallel_size=2", "pipeline_parallel_size=2", "data_parallel_size=2",
                                       "gpu_memory_utilization=0.85", "engine_args.max_num_seqs=64",
                                       "engine_args.enable_prefix_caching=false"])
    assert recipe.models == ["smollm2-135m-instruct", "smollm2-135m-instruct-sft"] and recipe.replicas == 1
    args = recipe.vllm_args()
    assert args == ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--data-parallel-size", "2",
                    "--gpu-memory-utilization", "0.85", "--max-num-seqs", "64", "--no-enable-prefix-caching"]
    [spec] = plan(registry, [tiny.name])
    check_engine_args(Engine(spec, tmp_path, engine_args=args))
    assert ServeRecipe.load(RECIPE).vllm_args() == []  # the shipped recipe adds nothing to a one-box engine
    typo = ServeRecipe.load(RECIPE, ["engine_args.tensr_parallel_size=2"]).vllm_args()
    with pytest.raises(PosttrainError, match="engine argument: unrecognized arguments: --tensr-parallel-size"):
        check_engine_args(Engine(spec, tmp_path, engine_args=typo))


@pytest.mark.parametrize("args, message", [
    (["--upstream", "x=ftp://host/v1"], "upstream x: 'ftp://host/v1' is not an http(s) URL"),
    (["--upstream", "x"], "expected NAME=URL"),
    (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without an API key"),
    (["--replicas", "two"], "--replicas 'two': expected a number or NAME=NUMBER"),
    (["--models", "tiny-qwen3", "--replicas", "nope=2"], "--replicas names nope, which is not served here"),
])
def test_serve_cli_bad_input(session_home, tiny, args, message):
    run = subprocess.run([sys.executable, "-m", "posttrain", "serve", *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "POSTTRAIN_API_KEY": ""})
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_cpu_engine_defaults_follow_the_machine(monkeypatch, tiny):
    from posttrain.serve import engine

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4})
    assert engine.cpu_binding(0, 1) == "0,1,2,3,4"
    assert [engine.cpu_binding(i, 2) for i in range(2)] == ["0,1,2", "3,4"]
    assert [engine.cpu_binding(i, 3) for i in range(3)] == ["0,1", "2,3", "4"]
    assert engine.cpu_binding(5, 6) == "0"  # more engines than cores: they share
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda _: {0})
    assert engine.cpu_binding(0, 1) is None
    # tiny-qwen3: 2 layers x 2 kv heads x 32 dims -> far under 1 GiB for 64 x 2048 tokens.
    assert engine.kv_cache_gib(tiny.path, 2048, "float32", 1) == 1
    for has_bf16, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(engine, "native_bf16", lambda: has_bf16)
        monkeypatch.setattr(engine, "cpu_build", lambda: True)
        assert engine.default_dtype(tiny.path) == expected
