"""Talking to OpenAI-compatible endpoints: where the keys come from, a one-line error (not a
retry storm, not a traceback) when a URL is unreachable or does not serve a model, and chat
requests cached so that nothing is asked twice (with the log-probabilities of a reply's last
tokens, where they were asked for: what a judge's verdict probabilities are read from)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import httpx

from posttrain.errors import PosttrainError

# Log-probabilities are kept for this many final tokens of a reply: a verdict ends the reply (or
# nearly), and a whole reply's top-20 alternatives would make every cached judgment ~100 KB.
LOGPROB_TAIL = 16


def first_key(*env_vars: str) -> str | None:
    """The first key found in these variables (POSTTRAIN_API_KEY may list several, comma-separated)."""
    for var in env_vars:
        keys = [k.strip() for k in os.environ.get(var, "").split(",") if k.strip()]
        if keys:
            return keys[0]
    return None


def judge_key(judge_base_url: str, base_url: str | None, api_key: str | None,
              judge_api_key: str | None) -> str | None:
    """The judge's key: given, else POSTTRAIN_JUDGE_API_KEY, else `api_key` when the judge is
    behind `base_url`, else OPENAI_API_KEY. Our own key never goes to another host."""
    return judge_api_key or first_key("POSTTRAIN_JUDGE_API_KEY") or (
        api_key if base_url and judge_base_url.rstrip("/") == base_url.rstrip("/") else first_key("OPENAI_API_KEY"))


def model_cards(base_url: str, api_key: str | None, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """`GET {base_url}/models` as {model id: its card} (vLLM and our front door put the
    checkpoint folder in `root`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise PosttrainError(f"cannot reach {base_url}: {exc or type(exc).__name__} "
                             f"(is `posttrain serve` running? check --base-url)") from None
    if response.status_code in (401, 403):
        raise PosttrainError(f"{base_url} refused the API key (HTTP {response.status_code}); pass --api-key")
    if response.status_code != 200:
        raise PosttrainError(f"{base_url}/models answered HTTP {response.status_code}: {response.text[:200]}")
    try:
        return {m["id"]: m for m in response.json()["data"]}
    except (ValueError, KeyError, TypeError):
        raise PosttrainError(f"{base_url}/models: not an OpenAI-compatible model list") from None


def served_models(base_url: str, api_key: str | None, timeout: float = 10.0) -> list[str]:
    """The model names `GET {base_url}/models` lists."""
    return list(model_cards(base_url, api_key, timeout))


def check_serves(base_url: str, api_key: str | None, *models: str) -> dict[str, dict[str, Any]]:
    """The model cards of `base_url`, after checking that it serves every one of `models`."""
    cards = model_cards(base_url, api_key)
    missing = [m for m in models if m not in cards]
    if missing:
        raise PosttrainError(f"{base_url} does not serve {', '.join(missing)} (it serves: "
                             f"{', '.join(cards) or 'nothing'}); e.g. `posttrain serve --models {','.join(missing)}`")
    return cards


class RequestCache:
    """Append-only JSONL of finished requests keyed by the hash of the request itself
    (model identity, messages, sampling parameters). Each record is flushed as soon as it
    exists, so an interrupted run loses at most what was in flight; a torn last line is
    ignored on the next read."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                self.records[record["key"]] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def put(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = self.path.open("a")
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        self.records[record["key"]] = record

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


@dataclass
class Endpoint:
    """One model behind an OpenAI-compatible API, with its request cache. `identity` goes
    into every cache key: a re-registered checkpoint under the same name is re-asked."""

    model: str
    base_url: str
    api_key: str | None
    cache: RequestCache
    identity: str = ""
    context: int | None = None  # the model's context length, where its card says (vLLM's do)
    client: Any = field(default=None, repr=False)
    sent: int = 0

    async def chat(self, messages: list[dict[str, str]], gate: asyncio.Semaphore, **params: Any) -> dict[str, Any]:
        """The cached record of this request: `text`, `finish_reason`, `prompt_tokens` (and
        `logprobs`, see `logprob_tail`), or `error` when the API refused it."""
        import openai

        key = hashlib.sha256(json.dumps([self.model, self.identity, messages, params], sort_keys=True).encode()).hexdigest()
        if key in self.cache.records:
            return self.cache.records[key]
        async with gate:
            self.sent += 1
            try:
                reply = await self.client.chat.completions.create(model=self.model, messages=messages, **params)
                record = reply_record(key, reply)
            except openai.APIConnectionError as exc:
                raise PosttrainError(f"cannot reach {self.base_url}: {exc}") from None
            except openai.BadRequestError as exc:  # deterministic (e.g. too long): cached, not retried
                record = {"key": key, "error": f"HTTP 400: {exc.message}"}
            except openai.APIStatusError as exc:  # server trouble after the client's retries: retry next run
                return {"key": key, "error": f"HTTP {exc.status_code}: {exc.message}"}
        self.cache.put(record)
        return record


def reply_record(key: str, reply: Any) -> dict[str, Any]:
    """What is kept of a chat reply. `text` is the answer alone: a thinking model's trace comes
    apart in `reasoning` (vLLM's reasoning parser; 0.32 names it `reasoning`, older servers
    `reasoning_content`), kept with the tokens it spent but never shown to a judge."""
    choice = reply.choices[0]
    usage = reply.usage
    details = getattr(usage, "completion_tokens_details", None)
    record = {"key": key, "text": choice.message.content or "", "finish_reason": choice.finish_reason,
              "prompt_tokens": usage.prompt_tokens if usage else None,
              "completion_tokens": usage.completion_tokens if usage else None,
              "reasoning_tokens": getattr(details, "reasoning_tokens", None)}
    extra = choice.message.model_extra or {}
    if (trace := extra.get("reasoning") or extra.get("reasoning_content")) is not None:
        record["reasoning"] = trace
    if tail := logprob_tail(choice):
        record["logprobs"] = tail
    return record


def logprob_tail(choice: Any) -> list[list[Any]] | None:
    """The last LOGPROB_TAIL tokens of a chat choice as [token, logprob, [[alternative,
    logprob], ...]], or None when the reply carries no log-probabilities."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return [[t.token, t.logprob, [[a.token, a.logprob] for a in t.top_logprobs or []]] for t in content[-LOGPROB_TAIL:]]


@asynccontextmanager
async def connected(endpoints: Iterable[Endpoint]) -> AsyncIterator[None]:
    """One async OpenAI client per (URL, key) for these endpoints, closed on the way out."""
    import openai

    clients = {}
    for endpoint in endpoints:
        key = (endpoint.base_url, endpoint.api_key)
        if key not in clients:
            clients[key] = openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "none",
                                              timeout=600, max_retries=2)
        endpoint.client = clients[key]
    try:
        yield
    finally:
        for client in clients.values():
            await client.close()


async def gather(coroutines: Iterable) -> list:
    """Like asyncio.gather, but the first failure cancels the rest (nothing keeps running
    behind an error or Ctrl-C)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except ExceptionGroup as failures:
        # A PosttrainError (an endpoint gone mid-run) is the user's one-line error, not a group
        # traceback; the other tasks were cancelled because of it.
        ours, _ = failures.split(PosttrainError)
        if ours is None:
            raise
        raise _first_leaf(ours) from None
    return [t.result() for t in tasks]


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
