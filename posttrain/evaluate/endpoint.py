"""Talking to OpenAI-compatible endpoints: where the keys come from, a one-line error (not a
retry storm, not a traceback) when a URL is unreachable or does not serve a model, and chat
requests cached so that nothing is asked twice."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from posttrain.errors import PosttrainError


def first_key(*env_vars: str) -> str | None:
    """The first key found in these variables (POSTTRAIN_API_KEY may list several, comma-separated)."""
    for var in env_vars:
        keys = [k.strip() for k in os.environ.get(var, "").split(",") if k.strip()]
        if keys:
            return keys[0]
    return None


def served_models(base_url: str, api_key: str | None, timeout: float = 10.0) -> list[str]:
    """The model names `GET {base_url}/models` lists."""
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
        return [m["id"] for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise PosttrainError(f"{base_url}/models: not an OpenAI-compatible model list") from None


def check_serves(base_url: str, api_key: str | None, *models: str) -> None:
    served = served_models(base_url, api_key)
    missing = [m for m in models if m not in served]
    if missing:
        raise PosttrainError(f"{base_url} does not serve {', '.join(missing)} (it serves: "
                             f"{', '.join(served) or 'nothing'}); e.g. `posttrain serve --models {','.join(missing)}`")


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
    client: Any = field(default=None, repr=False)
    sent: int = 0

    async def chat(self, messages: list[dict[str, str]], gate: asyncio.Semaphore, **params: Any) -> dict[str, Any]:
        """The cached record of this request (`text`, or `error` when the API refused it)."""
        import openai

        key = hashlib.sha256(json.dumps([self.model, self.identity, messages, params], sort_keys=True).encode()).hexdigest()
        if key in self.cache.records:
            return self.cache.records[key]
        async with gate:
            self.sent += 1
            try:
                reply = await self.client.chat.completions.create(model=self.model, messages=messages, **params)
                record = {"key": key, "text": reply.choices[0].message.content or ""}
            except openai.APIConnectionError as exc:
                raise PosttrainError(f"cannot reach {self.base_url}: {exc}") from None
            except openai.BadRequestError as exc:  # deterministic (e.g. too long): cached, not retried
                record = {"key": key, "error": f"HTTP 400: {exc.message}"}
            except openai.APIStatusError as exc:  # server trouble after the client's retries: retry next run
                return {"key": key, "error": f"HTTP {exc.status_code}: {exc.message}"}
        self.cache.put(record)
        return record
