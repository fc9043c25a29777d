"""A real OpenAI-compatible HTTP server (raw asyncio sockets, in a thread) whose chat streams
break the ways a real one can, chosen by the model name:

- "whole": a complete stream, "<model> reply <n>" (n counts requests, so every reply differs);
- "cut": a few chunks, then the connection closes mid-body (httpx.RemoteProtocolError);
- "garbled": a chunk whose SSE data is not JSON (a ValueError while parsing);
- "unfinished": a few chunks and a clean end of body, but no finish reason and no [DONE];
- "flaky": "cut" on every other request to it, else "whole".

and two that think, as the front door serves them (their model cards say `thinking`): "thinker"
(qwen3: thinks unless the request's chat_template_kwargs say enable_thinking false) and
"ponderer" (deepseek_r1: always thinks). A thinking reply streams its trace in `reasoning`
deltas, "<model> thought <n>", then its answer; the usage (when asked for) counts each word of
the trace as two tokens, so a test tells the server's count from a count of deltas. Every
request body is kept in `bodies`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading

MODELS = ("whole", "cut", "garbled", "unfinished", "flaky", "thinker", "ponderer")
THINKING = {"thinker": "qwen3", "ponderer": "deepseek_r1"}


def _event(model: str, content: str | None, finish_reason: str | None = None, field: str = "content") -> bytes:
    delta = {"role": "assistant", field: content} if content is not None else {}
    return _chunk(model, [{"index": 0, "delta": delta, "finish_reason": finish_reason}])


def _chunk(model: str, choices: list[dict], **extra) -> bytes:
    chunk = {"id": "chatcmpl-broken", "object": "chat.completion.chunk", "created": 0, "model": model,
             "choices": choices, **extra}
    return _sse(json.dumps(chunk))


def _words(model: str, text: str, field: str = "content") -> bytes:
    return b"".join(_event(model, (" " if i else "") + word, field=field) for i, word in enumerate(text.split(" ")))


def thinks(model: str, body: dict) -> bool:
    switch = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
    return model in THINKING and (switch is not False or THINKING[model] == "deepseek_r1")


def _sse(data: str) -> bytes:
    body = f"data: {data}\n\n".encode()
    return f"{len(body):x}\r\n".encode() + body + b"\r\n"  # one HTTP chunk per event


class BrokenDoor:
    api_key = "none"

    def __init__(self):
        self.requests = itertools.count(1)
        self.bodies: list[dict] = []
        self.flaky = itertools.cycle(["whole", "cut"])
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _run(self, started: threading.Event) -> None:
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        body = json.loads(await reader.readexactly(length)) if length else {}
        if head.startswith("GET /v1/models"):
            data = json.dumps({"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "test", "thinking": THINKING.get(m)}
                for m in MODELS]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(data) + data)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            self.bodies.append(body)
            writer.write(self._stream(body["model"], body))
        await writer.drain()
        writer.close()

    def _stream(self, model: str, body: dict) -> bytes:
        n = next(self.requests)
        trace = f"{model} thought {n}" if thinks(model, body) else ""
        events = (_words(model, trace, "reasoning") if trace else b"") + _words(model, f"{model} reply {n}")
        kind = next(self.flaky) if model == "flaky" else model
        if kind == "cut":
            return events  # no terminating chunk: the body ends mid-stream
        if kind == "garbled":
            events += _sse('{"choices": [')
        if kind != "unfinished":
            events += _event(model, None, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                reasoning = 2 * len(trace.split())
                events += _chunk(model, [], usage={"prompt_tokens": 1, "completion_tokens": reasoning + 3,
                                                   "total_tokens": reasoning + 4,
                                                   "completion_tokens_details": {"reasoning_tokens": reasoning}})
            events += _sse("[DONE]")
        return events + b"0\r\n\r\n"
