"""Remote engines: an OpenAI-compatible server that posttrain did not start (vLLM on another
host or behind Ray for multi-node, a Kubernetes service, SGLang's or TensorRT-LLM's OpenAI
server) routed under a name of ours, beside the local engines and treated like them by the
relay, the metrics and the harvest.

posttrain cannot restart a remote: it checks at start that the remote serves the model it was
named for and what it can do (prompt log-probs, which lm-eval's log-likelihood tasks need and
non-vLLM servers often lack), then polls its model list; while that fails, requests for it get
the same OpenAI-shaped 503 as a restarting local engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import urlsplit

import httpx

from posttrain.errors import PosttrainError

log = logging.getLogger("posttrain.serve")


class Upstream:
    """One remote OpenAI-compatible server for one model name of ours."""

    def __init__(self, name: str, url: str, api_key: str | None = None, model: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PosttrainError(f"upstream {name}: {url!r} is not an http(s) URL (e.g. http://gpu-host:8000/v1)")
        self.name = name
        self.url = url.rstrip("/").removesuffix("/v1")  # the relay appends /v1/... itself
        self.api_key = api_key
        self.model = model or name  # the name the remote knows it by
        self.state = "starting"  # ready | unreachable
        self.in_flight = 0
        self.restarts = 0
        self.max_model_len: int | None = None
        self.capabilities: dict[str, bool] = {}

    @property
    def models(self) -> list[str]:
        return [self.name]

    @property
    def label(self) -> str:
        return f"{self.name} at {self.url}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        """Nothing to stop: posttrain did not start it."""

    def status(self) -> dict:
        return {"upstream": self.url, "models": self.models, "state": self.state}

    def card(self, name: str) -> dict:
        return {"root": self.url, "parent": None, "max_model_len": self.max_model_len,
                "capabilities": self.capabilities}

    async def served_models(self, client: httpx.AsyncClient) -> list[dict]:
        reply = await client.get(self.url + "/v1/models", headers=self.headers, timeout=10)
        if reply.status_code in (401, 403):
            raise PosttrainError(f"upstream {self.label} refused its API key (HTTP {reply.status_code})")
        reply.raise_for_status()
        try:
            return [m for m in reply.json()["data"] if isinstance(m, dict)]
        except (ValueError, KeyError, TypeError):
            raise PosttrainError(f"upstream {self.label}: /v1/models is not an OpenAI model list") from None

    async def check(self, client: httpx.AsyncClient) -> None:
        """At start: it answers, serves our model, and what it can do (nothing half-started:
        the front door does not start while an upstream is wrong)."""
        try:
            models = await self.served_models(client)
        except httpx.HTTPError as exc:
            raise PosttrainError(f"cannot reach upstream {self.label}: {exc or type(exc).__name__}") from None
        card = next((m for m in models if m.get("id") == self.model), None)
        if card is None:
            listed = ", ".join(str(m.get("id")) for m in models) or "nothing"
            raise PosttrainError(f"upstream {self.label} does not serve {self.model!r} (it lists: {listed}); "
                                 f"name the remote model with ,model=NAME")
        if isinstance(card.get("max_model_len"), int):
            self.max_model_len = card["max_model_len"]
        self.capabilities = {"prompt_logprobs": await self._has_prompt_logprobs(client)}
        if not self.capabilities["prompt_logprobs"]:
            log.warning("upstream %s returns no prompt log-probs: lm-eval log-likelihood tasks cannot run "
                        "against %s (generation tasks and chat can)", self.label, self.name)
        self.state = "ready"

    async def _has_prompt_logprobs(self, client: httpx.AsyncClient) -> bool:
        probe = {"model": self.model, "prompt": "Hello world", "max_tokens": 1, "echo": True, "logprobs": 1,
                 "temperature": 0}
        try:
            reply = await client.post(self.url + "/v1/completions", json=probe, headers=self.headers, timeout=30)
            logprobs = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return False
        return reply.status_code == 200 and isinstance(logprobs, list) and len(logprobs) > 1

    async def watch(self, client: httpx.AsyncClient, every_s: float = 5.0) -> None:
        """Forever: ready while its model list answers, unreachable while it does not."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.served_models(client)
                state = "ready"
            except (httpx.HTTPError, PosttrainError):
                state = "unreachable"
            if state != self.state:
                log.warning("upstream %s is %s", self.label, state)
                self.state = state


def parse_upstream(spec: str) -> Upstream:
    """`NAME=URL[,key=KEY][,model=REMOTE_NAME]`; `key=env:VAR` reads the key from a variable
    (a key on the command line is visible to every local user in the process list)."""
    name, sep, rest = spec.partition("=")
    url, *options = rest.split(",")
    if not sep or not name.strip() or not url.strip():
        raise PosttrainError(f"--upstream {spec!r}: expected NAME=URL[,key=KEY][,model=REMOTE_NAME]")
    settings: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if key not in ("key", "model") or not sep or not value:
            raise PosttrainError(f"--upstream {spec!r}: unknown option {option!r} (key=KEY, key=env:VAR, model=NAME)")
        settings[key] = value
    api_key = settings.get("key")
    if api_key and api_key.startswith("env:"):
        api_key = os.environ.get(api_key[4:]) or None
        if api_key is None:
            raise PosttrainError(f"--upstream {name}: the variable {settings['key'][4:]} is not set")
    return Upstream(name.strip(), url.strip(), api_key=api_key, model=settings.get("model"))
