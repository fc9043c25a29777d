"""A real HTTP relay in front of an OpenAI-compatible server that the test controls: it passes
GETs and the first `let_through` POSTs on, then holds every later POST until `release()` and
answers it 503 without passing it on (the upstream never sees it). With `hang_up=True` it
closes the connection of every later POST instead, unanswered: an endpoint gone mid-run.

Tests that interrupt a run "in the middle" use it so the middle lasts until they act: a run
that would otherwise finish before the signal arrives (a fast machine) waits at the relay,
with exactly `let_through` requests answered.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class HeldRelay:
    def __init__(self, upstream: str, let_through: int, hang_up: bool = False):
        self.upstream = upstream.rstrip("/")
        self.let_through = let_through
        self.posts = 0
        self.holding = threading.Event()  # set once a POST waits at the relay
        self._released = threading.Event()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._pass_on("GET", None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    relay.posts += 1
                    held = relay.posts > relay.let_through
                if not held:
                    return self._pass_on("POST", body)
                if hang_up:
                    self.close_connection = True
                    return
                relay.holding.set()
                relay._released.wait()
                self._answer(503, b'{"error": {"message": "held by the test relay", "type": "service_unavailable"}}')

            def _pass_on(self, method: str, body: bytes | None):
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                reply = httpx.request(method, relay.upstream + self.path.removeprefix("/v1"), content=body,
                                      headers=headers, timeout=300)
                self._answer(reply.status_code, reply.content, reply.headers.get("content-type"))

            def _answer(self, status: int, content: bytes, content_type: str | None = None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type or "application/json")
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:  # the client was interrupted and hung up: nothing to answer
                    pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
