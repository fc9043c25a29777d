"""A scripted OpenAI-compatible server: a STAND-IN FOR A REMOTE GPT-4 JUDGE (and for answering
models), which cannot run here. Our tiny served models give verdicts only when constrained and at
random, so the paths that need known verdicts (scores per category, pairwise wins, battles) are
checked against this script over real HTTP with the real openai client.

Like OpenAI's API it refuses vLLM's `structured_outputs` (HTTP 400: verdicts are parsed from free
text) and returns `top_logprobs` when asked: at a verdict, the given rating has probability 0.6
and its neighbour (one more, 8 for 9) 0.4; the given letter 0.7, "C" (or "A" when C is given)
0.2, the remaining letter 0.1. Other prompts (a capability probe) get "Sure.".

Answers name the model that wrote them. Asked to think (`chat_template_kwargs: {"enable_thinking":
true}`), an answering model also returns a trace in `reasoning`, as vLLM's reasoning parser
does, and counts THINKING_TOKENS of its COMPLETION_TOKENS as reasoning tokens. Judgments follow fixed rules so tests know the outcome:
- single grading: question 1 gets an unparsable verdict; otherwise the rating is
  (question_id % 9) + 1 on turn 1 and one less (at least 1) on turn 2;
- pairwise: question 2 is always "[[A]]" (position bias: the two orders disagree, so a tie);
  question 3 is unparsable; otherwise the answer written by `PREFERRED` wins.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFERRED = "tiny-qwen3-lora"
JUDGE = "stub-judge"
TRACE = "SECRET-TRACE"  # a thinking answer's trace, which no judge may see
COMPLETION_TOKENS, THINKING_TOKENS = 9, 6


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
                if "structured_outputs" in body:
                    return self._send({"error": {"message": "Unrecognized request argument supplied: "
                                                 "structured_outputs", "type": "invalid_request_error"}}, 400)
                text = stub.reply(body)
                choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                if body["model"] != JUDGE and (body.get("chat_template_kwargs") or {}).get("enable_thinking"):
                    choice["message"]["reasoning"] = f"{TRACE} of {body['model']}"
                    usage |= {"completion_tokens": COMPLETION_TOKENS,
                              "completion_tokens_details": {"reasoning_tokens": THINKING_TOKENS}}
                if body.get("logprobs"):
                    choice["logprobs"] = {"content": token_logprobs(text)}
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [choice], "usage": usage})

            def _send(self, payload, status=200):
                data = json.dumps(payload).encode()
                self.send_response(status)
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
        if qid is None:
            return "Sure."
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


def _question_id(prompt: str) -> int | None:
    if not QUESTION_IDS:
        from posttrain.evaluate.mt_bench_files import load_questions

        QUESTION_IDS.update({q.turns[0][:60]: int(q.question_id) for q in load_questions()})
    return next((qid for start, qid in QUESTION_IDS.items() if start in prompt), None)


def verdict_alternatives(verdict: str) -> dict[str, float]:
    """The stub's probabilities at a verdict token (see the module's docstring)."""
    if verdict.isdigit():
        rating = int(verdict)
        return {verdict: 0.6, str(rating + 1 if rating < 9 else 8): 0.4}
    second = "A" if verdict == "C" else "C"
    return {verdict: 0.7, second: 0.2, ({"A", "B", "C"} - {verdict, second}).pop(): 0.1}


def token_logprobs(text: str) -> list[dict]:
    """OpenAI's `logprobs.content` for a reply split into word-ish tokens, certain everywhere but
    at the token after each `[[`."""
    tokens = re.findall(r"\[\[|\]\]|\d|\w+|\s+|.", text)
    content = []
    for i, token in enumerate(tokens):
        alternatives = verdict_alternatives(token) if i and tokens[i - 1] == "[[" else {token: 1.0}
        top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in alternatives.items()]
        content.append({"token": token, "logprob": math.log(alternatives[token]), "bytes": None, "top_logprobs": top})
    return content
