"""`posttrain up` as a user runs it: the default model and its tuned variant behind the OpenAI API,
the arena in front of them, everything gone after SIGTERM. (Runs after test_train.py, whose
recipe test registers the tuned variant; alone, it trains it first.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_up_serves_the_default_pair_and_the_arena_then_stops_cleanly(smollm2, session_home, tmp_path):
    api_port, arena_port = free_port(), free_port()
    log = tmp_path / "up.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "up", "--port", str(api_port), "--arena-port", str(arena_port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while f"posttrain arena: http://127.0.0.1:{arena_port}" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="none")
        models = [m.id for m in client.models.list()]
        assert models[:2] == ["smollm2-135m-instruct", "smollm2-135m-instruct-sft"]
        for model in models[:2]:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=20, temperature=0)
            assert "Paris" in reply.choices[0].message.content
        assert httpx.get(f"http://127.0.0.1:{arena_port}/", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0, log.read_text()[-3000:]
    engine = f"vllm.entrypoints.openai.api_server --model {session_home}/models/smollm2-135m-instruct "
    time.sleep(2)
    assert subprocess.run(["pgrep", "-f", engine], capture_output=True).returncode == 1, "the engine outlived `up`"
