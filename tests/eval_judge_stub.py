"""A scripted OpenAI-compatible server: a STAND-IN FOR A REMOTE GPT-4 JUDGE (and for answering
models), which cannot run here. Our tiny served models only produce unparsable verdicts, so the
paths that need well-formed ones (scores per category, pairwise wins, battles) are checked
against this script over real HTTP with the real openai client.

Answers name the model that wrote them. Judgments follow fixed rules so tests know the outcome:
- single grading: question 1 gets an unparsable verdict; otherwise the rating is
  (question_id % 9) + 1 on turn 1 and one less (at least 1) on turn 2;
- pairwise: question 2 is always "[[A]]" (position bias: the two orders disagree, so a tie);
  question 3 is unparsable; otherwise the answer written by `PREFERRED` wins.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFERRED = "tiny-qwen3-lora"
JUDGE = "stub-judge"


class JudgeStub:
    def __init__(self, models: list[str]):
        self.models = [*models, JUDGE]
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": m, "object": "model"} for m in stub.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": stub.reply(body)}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, body: dict) -> str:
        messages = body["messages"]
        if body["model"] != JUDGE:
            return f"Answer by {body['model']} to: {messages[-1]['content'][:40]}"
        prompt = messages[-1]["content"]
        qid = _question_id(prompt)
        second_turn = "### User:" in prompt
        if "[[A]]" not in messages[0]["content"] + prompt:  # single grading
            if qid == 1:
                return "The answer is fine, I think."
            rating = max(1, qid % 9 + 1 - (1 if second_turn else 0))
            return f"Reasonable. Rating: [[{rating}]]"
        if qid == 2:
            return "[[A]]"
        if qid == 3:
            return "Both are equally good, hard to say."
        a_part = prompt.split("Assistant B", 1)[0]
        return "[[A]]" if f"Answer by {PREFERRED} " in a_part else "[[B]]"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


QUESTION_IDS = {}  # first words of each of our questions -> question_id, filled on first use


def _question_id(prompt: str) -> int:
    if not QUESTION_IDS:
        from posttrain.evaluate.mt_bench_files import load_questions

        QUESTION_IDS.update({q.turns[0][:60]: int(q.question_id) for q in load_questions()})
    return next(qid for start, qid in QUESTION_IDS.items() if start in prompt)
