"""The Gradio arena: chat with two models side by side and vote for the better reply.

Battle tab: two anonymous models, drawn favouring pairs with few battles so far, answer every
prompt at once (both streamed); the user votes (A / B / tie / both bad) once both replies are
complete, and only then learns their names. Side-by-side tab: the same with models the user
picks (names known, so those votes are kept apart as source "side-by-side"). Leaderboard tab:
the ratings of the arena votes.

Thinking: both sides of a battle run in one mode, chosen per battle (a toggle; `thinking` in
ArenaConfig is its default) and stored with the vote. A thinking battle pairs only models that
think, one without thinking only models that can answer without (a `deepseek_r1` model always
thinks); side by side, a picked model that cannot run in the chosen mode is refused with what to
do. Which models think is what their model cards say (`thinking`, as posttrain's front door
writes them; a model whose card does not say is taken as not thinking). A reply's trace is kept
apart from its answer, with its length in tokens.

Models are reached only through an OpenAI-compatible API (posttrain's front door by default),
so the arena works against any such endpoint. Per-session state lives on the server (gr.State),
so the browser never holds the hidden model names. This module holds the arena's state and rules,
without Gradio; `posttrain.ui.arena_app` lays them out as widgets.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import random
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import openai
from pydantic import Field

from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.evaluate.modes import request_body
from posttrain.store import Store, utcnow
from posttrain.thinking import FORMATS
from posttrain.ui.ratings import MIN_BATTLES, board_notes, plots, readable, stored_leaderboard
from posttrain.ui.votes import mode_filter, pair_counts, record_vote

if TYPE_CHECKING:  # gradio takes seconds to import; only the web app needs it
    import gradio as gr

Moderation = Callable[[str], "str | None"]
"""A moderation hook: gets the user's prompt, returns why it is refused (shown to the user), or None."""

BATTLE, SIDE_BY_SIDE = "arena", "side-by-side"
MODE = {True: "with thinking on", False: "with thinking off"}


class ArenaConfig(Recipe):
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    models: list[str] = Field(default_factory=list, description="Served models to pit (default: all listed).")
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.7, ge=0)
    max_prompt_chars: int = Field(4000, gt=0)
    prompts_per_minute: int = Field(10, gt=0, description="Per session, counting regenerations.")
    moderation: str | None = Field(None, description="module:function of a Moderation hook.")
    leaderboard_rounds: int = Field(100, ge=0)
    min_battles: int = Field(MIN_BATTLES, ge=0, description="Fewer battles: provisional on the leaderboard.")
    requests_logged: bool = Field(False, description="The API in front logs prompts and replies (said on the page).")
    thinking: bool = Field(False, description="The mode a battle runs in unless the user flips the toggle: "
                           "both sides think (True) or answer directly (False).")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Fields added to every chat request "
                                       "(vLLM's sampling or structured-output parameters, say).")


def load_moderation(spec: str) -> Moderation:
    """Import `package.module:function`."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise PosttrainError(f"--moderation {spec!r}: expected module:function")
    try:
        hook = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PosttrainError(f"--moderation {spec!r}: {exc}") from None
    if not callable(hook):
        raise PosttrainError(f"--moderation {spec!r}: not a function")
    return hook


def runs_in(fmt: str | None, thinking: bool) -> bool:
    """Whether a model with thinking format `fmt` can answer in a mode: one that does not think
    only without thinking, a `deepseek_r1` one only with it, a `qwen3` one either way."""
    return fmt in FORMATS if thinking else fmt != "deepseek_r1"


def cannot_run(model: str, fmt: str | None, thinking: bool) -> str:
    """Why `model` cannot answer in this mode, and what the user can do."""
    if thinking:
        return f"{model} does not think: turn thinking off, or pick a model that thinks."
    return f"{model} always thinks ({fmt} format): turn thinking on, or pick another model."


def weighted_pair(models: list[str], counts: dict[frozenset[str], int], rng: random.Random) -> list[str]:
    """Two different models, each pair weighted by 1 / (1 + its battles so far) so that new and
    rarely met pairs catch up, in random order (A/B position carries no information)."""
    pairs = list(combinations(models, 2))
    pair = list(rng.choices(pairs, weights=[1 / (1 + counts.get(frozenset(p), 0)) for p in pairs])[0])
    rng.shuffle(pair)
    return pair


@dataclass(frozen=True)
class ServedCard:
    """A served model as its card describes it: how it thinks (None: it does not), and whether it
    can answer now (posttrain's cards say `ready: false` while its engine starts or restarts;
    other APIs say nothing, so ready)."""

    thinking: str | None
    ready: bool = True


STARTING = "The models are still starting (an engine warms up for about a minute); try again shortly."

BUSY = ("streaming", "voting")  # an event is changing the chat: others must wait, not interleave


@dataclass
class Chat:
    """One browser session's round in one tab (server-side)."""

    mode: str
    models: list[str] = field(default_factory=list)  # [side A, side B]
    formats: list[str | None] = field(default_factory=lambda: [None, None])  # their thinking formats
    thinking: bool = False  # the mode both sides run in, for the whole round
    conversations: list[list[dict[str, Any]]] = field(default_factory=lambda: [[], []])
    status: str = "empty"  # empty | streaming | ready | failed | voting | voted
    failures: list[str] = field(default_factory=lambda: ["", ""])  # why each side's last reply failed
    # Each side's earlier replies to the current turn (assistant messages, a trace included),
    # replaced by Regenerate: a weak "rejected" against the reply kept, stored with the vote (and
    # only with a vote).
    replaced: list[list[dict[str, Any]]] = field(default_factory=lambda: [[], []])
    started_at: datetime | None = None
    last_vote: str = ""
    # Prompt times for the rate limit: shared by a session's tabs and kept across new rounds.
    sent: deque = field(default_factory=deque)

    def reset(self) -> None:
        if self.mode == BATTLE:
            self.models, self.formats = [], [None, None]
        self.conversations, self.failures, self.replaced = [[], []], ["", ""], [[], []]
        self.status, self.started_at, self.last_vote = "empty", None, ""

    @property
    def revealed(self) -> bool:
        return self.mode == SIDE_BY_SIDE or self.status == "voted"


def new_session() -> dict[str, Chat]:
    """A browser session's state: one Chat per tab, sharing one rate-limit window."""
    sent: deque = deque()
    return {mode: Chat(mode=mode, sent=sent) for mode in (BATTLE, SIDE_BY_SIDE)}


def restart_if_changed(chat: Chat, thinking: bool, chosen: list[str] | None) -> None:
    """Start a new round when the user asks for another mode (or, side by side, other models)
    than the round's, unless replies are streaming: both sides of a round keep one mode, the
    one stored with its votes."""
    other_models = chat.mode == SIDE_BY_SIDE and list(chosen or []) != chat.models
    if (thinking != chat.thinking or other_models) and chat.status not in BUSY:
        chat.reset()
        chat.thinking = thinking
        if chat.mode == SIDE_BY_SIDE:
            chat.models = list(chosen or [])


def add_delta(reply: dict[str, Any], delta: Any) -> bool:
    """Add a streamed delta to `reply`: the answer to `content`, a thinking model's trace (vLLM
    0.32 calls it `reasoning`, older servers `reasoning_content`) to `reasoning`, whose deltas
    count its tokens in `reasoning_tokens` (one per delta, as vLLM streams them) until the usage
    says (`count_reasoning`). Whether the reply grew."""
    extra = delta.model_extra or {}
    trace = extra.get("reasoning") or extra.get("reasoning_content")
    if trace:
        reply["reasoning"] = reply.get("reasoning", "") + trace
        reply["reasoning_tokens"] = reply.get("reasoning_tokens", 0) + 1
    if delta.content:
        reply["content"] += delta.content
    return bool(trace or delta.content)


def count_reasoning(reply: dict[str, Any], usage: Any) -> None:
    """The trace's length from the stream's usage (the last chunk), where the server counts it."""
    details = usage and usage.completion_tokens_details
    if "reasoning" in reply and details and details.reasoning_tokens:
        reply["reasoning_tokens"] = details.reasoning_tokens


class Arena:
    """The arena's logic, independent of the widgets: pairing, checks, streaming, voting. Its
    coroutines run on one event loop and check-and-claim a chat's status with no await in
    between, so two events on one chat (a double click, a script) cannot both pass a check."""

    def __init__(self, config: ArenaConfig, store: Store, moderation: Moderation | None = None):
        self.config = config
        self.store = store
        self.moderation = moderation or (load_moderation(config.moderation) if config.moderation else None)
        self.client = openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key or "none", max_retries=1)
        self.rng = random.Random()

    async def served_models(self) -> list[str]:
        return list(await self.served_cards())

    async def served_cards(self) -> dict[str, ServedCard]:
        """The models this arena pits, each as its model card describes it."""
        try:
            cards = {m.id: ServedCard((m.model_extra or {}).get("thinking"),
                                      (m.model_extra or {}).get("ready") is not False)
                     async for m in self.client.models.list()}
        except openai.OpenAIError as exc:
            raise PosttrainError(f"cannot list models at {self.config.base_url}: {exc}") from None
        return {name: cards[name] for name in self.selected(list(cards))}

    def selected(self, served: list[str]) -> list[str]:
        """The served models this arena pits: all of them, or the configured ones."""
        if self.config.models:
            missing = sorted(set(self.config.models) - set(served))
            if missing:
                raise PosttrainError(f"not served at {self.config.base_url}: {', '.join(missing)} "
                                     f"(served: {', '.join(served)})")
            return list(self.config.models)
        return served

    async def pick_pair(self, cards: dict[str, ServedCard], thinking: bool) -> list[str]:
        """Two different served models that can both answer in this mode and now, for a new
        battle; pairs are weighed by their battles in this mode, the leaderboard's split."""
        models = [name for name, card in cards.items() if runs_in(card.thinking, thinking)]
        ready = [name for name in models if cards[name].ready]
        if len(models) >= 2 > len(ready):
            raise PosttrainError(STARTING)
        models = ready
        if len(models) < 2:
            able = "think" if thinking else "can answer without thinking"
            raise PosttrainError(f"A battle {MODE[thinking]} needs two models that {able}; "
                                 f"{self.config.base_url} serves {', '.join(models) or 'none'}. "
                                 f"Turn thinking {'off' if thinking else 'on'}.")
        counts = await asyncio.to_thread(pair_counts, self.store, BATTLE, thinking)
        return weighted_pair(models, counts, self.rng)

    def refusal(self, chat: Chat, prompt: str) -> str | None:
        """Why this prompt may not be sent now, or None. Counts it against the rate limit if not."""
        if chat.status == "streaming":
            return "Wait until both replies are complete."
        if chat.status == "voting":
            return "Wait until your vote is saved."
        if chat.status == "failed":
            return "A reply failed: regenerate it or start a new round."
        if chat.status == "voted" and chat.mode == BATTLE:
            return "You voted and the names are revealed: start a new round."
        if not prompt.strip():
            return "Type a prompt first."
        if len(prompt) > self.config.max_prompt_chars:
            return f"The prompt is {len(prompt)} characters long; the limit is {self.config.max_prompt_chars}."
        if self.moderation is not None and (reason := self.moderation(prompt)):
            return f"Refused by moderation: {reason}"
        return self.rate_limited(chat)

    def rate_limited(self, chat: Chat) -> str | None:
        now = time.monotonic()
        while chat.sent and now - chat.sent[0] > 60:
            chat.sent.popleft()
        if len(chat.sent) >= self.config.prompts_per_minute:
            wait = 60 - (now - chat.sent[0])
            return f"Rate limit: {self.config.prompts_per_minute} prompts per minute; try again in {wait:.0f} s."
        chat.sent.append(now)
        return None

    async def send(self, chat: Chat, prompt: str, chosen: list[str] | None = None,
                   thinking: bool | None = None) -> AsyncIterator[None]:
        """A new turn: the prompt to both sides; returns the replies' `stream`. Side by side,
        `chosen` are the user's two models. `thinking`: the mode (None: the configured default).
        Another mode, or other models, than the round's start a new round, even if the prompt is
        then refused. Raises PosttrainError if it may not be sent now."""
        thinking = self.config.thinking if thinking is None else bool(thinking)
        cards = await self.served_cards()
        if chat.mode == SIDE_BY_SIDE:
            self.check_picked(chosen or [], cards, thinking)
        restart_if_changed(chat, thinking, chosen)
        if reason := self.refusal(chat, prompt):
            raise PosttrainError(reason)
        before, chat.status = chat.status, "streaming"  # claimed before the next await
        if not chat.models:
            try:
                chat.models = await self.pick_pair(cards, thinking)
            except BaseException:
                chat.status = before
                raise
        # .get: a battle's model no longer listed fails its reply (the API refuses it), not the send.
        chat.formats = [card.thinking if (card := cards.get(name)) else None for name in chat.models]
        if before == "empty":
            chat.started_at = utcnow()
        chat.replaced = [[], []]
        for conv in chat.conversations:
            conv.append({"role": "user", "content": prompt})
        return self.stream(chat)

    @staticmethod
    def check_picked(chosen: list[str], cards: dict[str, ServedCard], thinking: bool) -> None:
        """The side-by-side picks: two served models that can both answer in this mode, and now."""
        if len(chosen) != 2 or not all(chosen):
            raise PosttrainError("Pick both models first.")
        if unknown := sorted(set(chosen) - set(cards)):
            raise PosttrainError(f"Not served: {', '.join(unknown)}.")
        for name in dict.fromkeys(chosen):
            if not runs_in(cards[name].thinking, thinking):
                raise PosttrainError(f"Both models answer {MODE[thinking]}, and " +
                                     cannot_run(name, cards[name].thinking, thinking))
        if starting := [name for name in dict.fromkeys(chosen) if not cards[name].ready]:
            raise PosttrainError(f"{', '.join(starting)} cannot answer yet (its engine is starting or "
                                 f"restarting); try again shortly.")

    async def regenerate(self, chat: Chat) -> AsyncIterator[None]:
        """Both replies to the current turn again (returns their `stream`); the replaced ones that
        had not failed are kept as weak rejected replies for the vote. A voted turn stays voted:
        no second vote on it."""
        if chat.status == "voted":
            raise PosttrainError("You already voted on this turn." + (
                " Start a new round." if chat.mode == BATTLE else " Keep chatting to vote on the next one."))
        if chat.status not in ("ready", "failed"):
            raise PosttrainError("Nothing to regenerate now.")
        if reason := self.rate_limited(chat):
            raise PosttrainError(reason)
        for conv, failure, replaced in zip(chat.conversations, chat.failures, chat.replaced):
            reply = conv.pop()
            if not failure:
                replaced.append(reply)  # with its trace: a pair against a reply that thought is no mode mismatch
        return self.stream(chat)

    async def stream(self, chat: Chat) -> AsyncIterator[None]:
        """Generate both replies to the conversations (each ending with the user turn) at once;
        yields whenever either reply grew. Ends with status "ready", or "failed" if a side failed
        in any way (an API error, a dropped connection, an unreadable chunk, a stream that ends
        before the model finished) or the stream was abandoned: a reply cut short is never voted on."""
        histories = [list(conv) for conv in chat.conversations]
        replies = [{"role": "assistant", "content": ""} for _ in histories]
        for conv, reply in zip(chat.conversations, replies):
            conv.append(reply)
        chat.status, chat.failures = "streaming", ["", ""]
        grew: asyncio.Queue = asyncio.Queue()

        def fail(side: int, why: str) -> None:
            chat.failures[side] = why
            replies[side]["content"] += f"\n\n[the model failed: {why}]"

        async def pump(side: int) -> None:
            try:
                if not await self.generate(chat, side, histories[side], replies[side], grew):
                    fail(side, "the stream ended before the reply was complete")
            except openai.APIStatusError as exc:  # the status only: a message could name a hidden model
                fail(side, f"the API answered {exc.status_code}" + ("; regenerate in a few seconds"
                                                                      if exc.status_code in (429, 503) else ""))
            except Exception as exc:  # whatever broke, this reply is not whole
                fail(side, type(exc).__name__)
            finally:
                grew.put_nowait(None)

        tasks = [asyncio.create_task(pump(side)) for side in range(len(histories))]
        finished = 0
        try:
            while finished < len(tasks):
                finished += await grew.get() is None
                while not grew.empty():  # one UI update for everything that arrived meanwhile
                    finished += grew.get_nowait() is None
                yield
        finally:
            for side, task in enumerate(tasks):
                if not task.done():
                    task.cancel()
                    fail(side, "interrupted")
            chat.status = "failed" if any(chat.failures) else "ready"

    async def generate(self, chat: Chat, side: int, history: list[dict[str, Any]], reply: dict[str, Any],
                       grew: asyncio.Queue) -> bool:
        """Stream one side's reply into `reply` (see `add_delta`) in the round's mode; whether the
        model finished it (a finish reason arrived)."""
        finished = False
        async with await self.client.chat.completions.create(
                model=chat.models[side], messages=[{"role": m["role"], "content": m["content"]} for m in history],
                stream=True, stream_options={"include_usage": True}, max_tokens=self.config.max_tokens,
                temperature=self.config.temperature, extra_body=self.request_fields(chat, side)) as stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    if add_delta(reply, choice.delta):
                        grew.put_nowait(side)
                    finished = finished or choice.finish_reason is not None
                count_reasoning(reply, chunk.usage)
        return finished

    def request_fields(self, chat: Chat, side: int) -> dict[str, Any]:
        """The configured extra fields, plus what puts a thinking model in the round's mode (a model
        that does not think gets none: an API other than posttrain's may refuse fields it does not know)."""
        fields = dict(self.config.extra_body)
        for key, value in request_body(chat.thinking, chat.formats[side]).items():
            fields[key] = {**fields.get(key, {}), **value}  # chat_template_kwargs: merged, not replaced
        return fields

    async def vote(self, chat: Chat, vote: str, session_hash: str) -> int:
        """Store the vote (committed before this returns) and reveal the names; the battle id."""
        if chat.status in ("voting", "voted"):
            raise PosttrainError("You already voted on this turn.")
        if chat.status != "ready":
            raise PosttrainError("Voting opens once both replies are complete.")
        chat.status = "voting"
        write = asyncio.create_task(asyncio.to_thread(
            record_vote, self.store, session_hash=hashlib.sha256(session_hash.encode()).hexdigest()[:16],
            model_a=chat.models[0], model_b=chat.models[1], conversation_a=chat.conversations[0],
            conversation_b=chat.conversations[1], vote=vote, source=chat.mode, created_at=chat.started_at,
            regenerated={side: replies for side, replies in zip("ab", chat.replaced) if replies} or None,
            thinking=chat.thinking))

        def settle(done: asyncio.Task) -> None:
            stored = not done.cancelled() and done.exception() is None
            chat.status, chat.last_vote = ("voted", vote) if stored else ("ready", "")

        # The write finishes even if this event is cancelled (the user left): a stored vote must
        # close the turn, or a retry would store it twice.
        write.add_done_callback(settle)
        return (await asyncio.shield(write)).id

    def new_round(self, chat: Chat) -> None:
        if chat.status in BUSY:
            raise PosttrainError("Wait until both replies are complete.")
        chat.reset()

    def leaderboard(self, mode: str | None = None):
        """(table, how to read it, win-rate figure, battle-count figure) of the anonymous battles,
        those run in one mode if `mode` is "on" or "off"."""
        thinking = mode_filter(mode)
        board, counts = stored_leaderboard(self.store, BATTLE, rounds=self.config.leaderboard_rounds,
                                           min_battles=self.config.min_battles, thinking=thinking)
        if board.empty:
            return readable(board), f"No votes yet{'' if thinking is None else ' ' + MODE[thinking]}.", None, None
        figures = plots(counts, list(board["model"]))
        notes = "\n\n".join(board_notes(board, self.config.min_battles))
        return readable(board), notes, figures["win_rate"], figures["battles"]


def first_two(models: list[str]) -> list[str | None]:
    """Default side-by-side picks: the first two models (one model against itself if alone)."""
    return [models[min(i, len(models) - 1)] if models else None for i in range(2)]


def serve_arena(config: ArenaConfig, host: str = "127.0.0.1", port: int = 7860, store: Store | None = None,
                moderation: Moderation | None = None) -> None:
    """Run the arena until Ctrl-C."""
    demo = open_arena(config, host, port, store, moderation)
    try:
        demo.block_thread()
    finally:
        demo.close()


def open_arena(config: ArenaConfig, host: str = "127.0.0.1", port: int = 7860, store: Store | None = None,
               moderation: Moderation | None = None) -> gr.Blocks:
    """Start the arena's web app in the background; `.block_thread()` waits, `.close()` stops it."""
    from posttrain.registry import Registry

    arena = Arena(config, store or Registry().store, moderation)
    # A synchronous check: the arena's async client must first connect inside Gradio's loop.
    try:
        served = [m.id for m in openai.OpenAI(base_url=config.base_url, api_key=config.api_key or "none",
                                              max_retries=1, timeout=30).models.list()]
    except openai.OpenAIError as exc:
        raise PosttrainError(f"cannot reach the OpenAI API at {config.base_url}: {exc} "
                             f"(start `posttrain serve`, or pass --base-url / --api-key)") from None
    models = arena.selected(served)
    print(f"posttrain arena: {len(models)} models at {config.base_url}: {', '.join(models)}", flush=True)
    from posttrain.ui.arena_app import build_app

    demo = build_app(arena, models)
    # Many people stream at once; each event otherwise defaults to one at a time.
    demo.queue(default_concurrency_limit=64)
    try:
        demo.launch(server_name=host, server_port=port, show_error=True, quiet=True,
                    footer_links=["api"], prevent_thread_lock=True)
    except OSError as exc:
        raise PosttrainError(f"cannot serve the arena on {host}:{port}: {exc}") from None
    print(f"posttrain arena: http://{host}:{port} (Ctrl-C stops)", flush=True)
    return demo
