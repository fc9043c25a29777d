"""The Gradio arena: chat with two models side by side and vote for the better reply.

Battle tab: two anonymous models, drawn favouring pairs with few battles so far, answer every
prompt at once (both streamed); the user votes (A / B / tie / both bad) once both replies are
complete, and only then learns their names. Side-by-side tab: the same with models the user
picks (names known, so those votes are kept apart as source "side-by-side"). Leaderboard tab:
the ratings of the arena votes.

Models are reached only through an OpenAI-compatible API (posttrain's front door by default),
so the arena works against any such endpoint. Per-session state lives on the server (gr.State),
so the browser never holds the hidden model names.
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
from typing import Any, AsyncIterator, Callable

import gradio as gr
import openai
from pydantic import Field

from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.store import Store, utcnow
from posttrain.ui.votes import VOTE_LABELS, load_battles, pair_counts, record_vote

Moderation = Callable[[str], "str | None"]
"""A moderation hook: gets the user's prompt, returns why it is refused (shown to the user), or None."""

BATTLE, SIDE_BY_SIDE = "arena", "side-by-side"


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


def weighted_pair(models: list[str], counts: dict[frozenset[str], int], rng: random.Random) -> list[str]:
    """Two different models, each pair weighted by 1 / (1 + its battles so far) so that new and
    rarely met pairs catch up, in random order (A/B position carries no information)."""
    pairs = list(combinations(models, 2))
    pair = list(rng.choices(pairs, weights=[1 / (1 + counts.get(frozenset(p), 0)) for p in pairs])[0])
    rng.shuffle(pair)
    return pair


@dataclass
class Chat:
    """One browser session's round in one tab (server-side)."""

    mode: str
    models: list[str] = field(default_factory=list)  # [side A, side B]
    conversations: list[list[dict[str, Any]]] = field(default_factory=lambda: [[], []])
    status: str = "empty"  # empty | streaming | ready | failed | voted
    started_at: datetime | None = None
    last_vote: str = ""
    # Prompt times for the rate limit: shared by a session's tabs and kept across new rounds.
    sent: deque = field(default_factory=deque)

    def reset(self) -> None:
        if self.mode == BATTLE:
            self.models = []
        self.conversations = [[], []]
        self.status, self.started_at, self.last_vote = "empty", None, ""

    @property
    def revealed(self) -> bool:
        return self.mode == SIDE_BY_SIDE or self.status == "voted"


def new_session() -> dict[str, Chat]:
    """A browser session's state: one Chat per tab, sharing one rate-limit window."""
    sent: deque = deque()
    return {mode: Chat(mode=mode, sent=sent) for mode in (BATTLE, SIDE_BY_SIDE)}


class Arena:
    """The arena's logic, independent of the widgets: pairing, checks, streaming, voting."""

    def __init__(self, config: ArenaConfig, store: Store, moderation: Moderation | None = None):
        self.config = config
        self.store = store
        self.moderation = moderation or (load_moderation(config.moderation) if config.moderation else None)
        self.client = openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key or "none", max_retries=1)
        self.rng = random.Random()

    async def served_models(self) -> list[str]:
        try:
            served = [m.id async for m in self.client.models.list()]
        except openai.OpenAIError as exc:
            raise PosttrainError(f"cannot list models at {self.config.base_url}: {exc}") from None
        return self.selected(served)

    def selected(self, served: list[str]) -> list[str]:
        """The served models this arena pits: all of them, or the configured ones."""
        if self.config.models:
            missing = sorted(set(self.config.models) - set(served))
            if missing:
                raise PosttrainError(f"not served at {self.config.base_url}: {', '.join(missing)} "
                                     f"(served: {', '.join(served)})")
            return list(self.config.models)
        return served

    async def pick_pair(self) -> list[str]:
        """Two different served models for a new battle."""
        models = await self.served_models()
        if len(models) < 2:
            raise PosttrainError(f"a battle needs two models; {self.config.base_url} serves {models or 'none'}")
        return weighted_pair(models, await asyncio.to_thread(pair_counts, self.store, BATTLE), self.rng)

    def refusal(self, chat: Chat, prompt: str) -> str | None:
        """Why this prompt may not be sent now, or None. Counts it against the rate limit if not."""
        if chat.status == "streaming":
            return "Wait until both replies are complete."
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

    async def stream(self, chat: Chat) -> AsyncIterator[None]:
        """Generate both replies to the conversations (each ending with the user turn) at once;
        yields whenever either reply grew. Ends with status "ready", or "failed" if a side
        errored or the stream was abandoned."""
        histories = [list(conv) for conv in chat.conversations]
        replies = [{"role": "assistant", "content": ""} for _ in histories]
        for conv, reply in zip(chat.conversations, replies):
            conv.append(reply)
        chat.status = "streaming"
        grew: asyncio.Queue = asyncio.Queue()
        errors: list[str] = []

        async def pump(side: int) -> None:
            try:
                stream = await self.client.chat.completions.create(
                    model=chat.models[side], messages=histories[side], stream=True,
                    max_tokens=self.config.max_tokens, temperature=self.config.temperature)
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        replies[side]["content"] += chunk.choices[0].delta.content
                        grew.put_nowait(side)
            except openai.OpenAIError as exc:
                errors.append(str(exc))
                replies[side]["content"] += f"\n\n[the model failed: {type(exc).__name__}]"
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
            for task in tasks:
                task.cancel()
            chat.status = "ready" if finished == len(tasks) and not errors else "failed"

    def vote(self, chat: Chat, vote: str, session_hash: str) -> int:
        """Store the vote (committed before this returns) and reveal the names; the battle id."""
        if chat.status == "voted":
            raise PosttrainError("You already voted on this turn.")
        if chat.status != "ready":
            raise PosttrainError("Voting opens once both replies are complete.")
        battle = record_vote(self.store, session_hash=hashlib.sha256(session_hash.encode()).hexdigest()[:16],
                             model_a=chat.models[0], model_b=chat.models[1], conversation_a=chat.conversations[0],
                             conversation_b=chat.conversations[1], vote=vote, source=chat.mode,
                             created_at=chat.started_at)
        chat.status, chat.last_vote = "voted", vote
        return battle.id

    def leaderboard(self):
        """(table, win-rate figure, battle-count figure) of the anonymous battles."""
        from posttrain.ui.ratings import leaderboard, plots

        battles = load_battles(self.store, BATTLE)
        table = leaderboard(battles, rounds=self.config.leaderboard_rounds)
        if table.empty:
            return table, None, None
        figures = plots(battles, list(table["model"]))
        return table.round(1), figures["win_rate"], figures["battles"]


def first_two(models: list[str]) -> list[str | None]:
    """Default side-by-side picks: the first two models (one model against itself if alone)."""
    return [models[min(i, len(models) - 1)] if models else None for i in range(2)]


def build_app(arena: Arena, models: list[str]) -> gr.Blocks:
    """The web app; `models` are the side-by-side choices until a page load refreshes them."""
    def failure(exc: PosttrainError) -> gr.Error:
        return gr.Error(str(exc), title="Not now", print_exception=False)

    def panel(mode: str, session: gr.State) -> None:
        """The chat-and-vote panel shared by the battle and side-by-side tabs."""
        prefix = "battle" if mode == BATTLE else "side_by_side"
        pickers: list[gr.Dropdown] = []
        if mode == SIDE_BY_SIDE:
            with gr.Row():
                pickers = [gr.Dropdown(label=f"Model {side}", choices=models, value=value, interactive=True)
                           for side, value in zip("AB", first_two(models))]
        with gr.Row():
            chatbots = [gr.Chatbot(label=f"Model {side}", height=420, elem_id=f"{prefix}-chat-{side.lower()}",
                                   buttons=["copy", "copy_all"]) for side in "AB"]
        with gr.Row():
            prompt = gr.Textbox(placeholder="Ask both models anything, then press Enter", show_label=False,
                                scale=6, max_length=arena.config.max_prompt_chars, elem_id=f"{prefix}-prompt")
            send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{prefix}-send")
        with gr.Row():
            votes = {v: gr.Button(label[0].upper() + label[1:], interactive=False, elem_id=f"{prefix}-vote-{v}")
                     for v, label in VOTE_LABELS.items()}
        info = gr.Markdown(elem_id=f"{prefix}-info")
        with gr.Row():
            new_round = gr.Button("New round" if mode == BATTLE else "Clear", elem_id=f"{prefix}-new")
            regenerate = gr.Button("Regenerate", interactive=False, elem_id=f"{prefix}-regenerate")
        outputs = [*chatbots, prompt, *votes.values(), regenerate, info]

        def view(chat: Chat, clear_prompt: bool = False) -> tuple:
            names = chat.models if chat.revealed and chat.models else ["", ""]
            labels = [f"Model {side}" + (f": {name}" if name else "") for side, name in zip("AB", names)]
            if chat.status == "voted" and mode == BATTLE:
                message = (f"**You voted: {VOTE_LABELS[chat.last_vote]}.** Model A was **{chat.models[0]}**, "
                           f"model B was **{chat.models[1]}**. Start a new round to battle again.")
            elif chat.status == "voted":
                message = f"**Saved: {VOTE_LABELS[chat.last_vote]}.** Keep chatting to vote on the next turn."
            else:
                message = {"empty": "", "streaming": "Both models are answering…",
                           "ready": "Which reply is better? Vote, or keep chatting.",
                           "failed": "A model failed: regenerate, or start a new round."}[chat.status]
            can_regenerate = chat.status in ("ready", "failed") or (chat.status == "voted" and mode == SIDE_BY_SIDE)
            return (*[gr.Chatbot(value=conv, label=label) for conv, label in zip(chat.conversations, labels)],
                    gr.Textbox(value="") if clear_prompt else gr.Textbox(),
                    *[gr.Button(interactive=chat.status == "ready") for _ in votes],
                    gr.Button(interactive=can_regenerate), message)

        async def answer(chat: Chat):
            async for _ in arena.stream(chat):
                yield view(chat, clear_prompt=True)
            yield view(chat, clear_prompt=True)

        async def on_send(prompt_text: str, chats: dict[str, Chat], *chosen: str):
            chat = chats[mode]
            if mode == SIDE_BY_SIDE:
                if not all(chosen):
                    raise gr.Error("Pick both models first.", print_exception=False)
                try:
                    served = await arena.served_models()
                except PosttrainError as exc:
                    raise failure(exc) from None
                if unknown := sorted(set(chosen) - set(served)):
                    raise gr.Error(f"Not served: {', '.join(unknown)}.", print_exception=False)
                if list(chosen) != chat.models:
                    chat.reset()
                    chat.models = list(chosen)
            if reason := arena.refusal(chat, prompt_text):
                raise gr.Error(reason, title="Not sent", print_exception=False)
            if not chat.models:
                try:
                    chat.models = await arena.pick_pair()
                except PosttrainError as exc:
                    raise failure(exc) from None
            if chat.status == "empty":
                chat.started_at = utcnow()
            for conv in chat.conversations:
                conv.append({"role": "user", "content": prompt_text})
            async for update in answer(chat):
                yield update

        async def on_regenerate(chats: dict[str, Chat]):
            chat = chats[mode]
            if chat.status not in ("ready", "failed", "voted") or (chat.status == "voted" and mode == BATTLE):
                raise gr.Error("Nothing to regenerate now.", print_exception=False)
            if reason := arena.rate_limited(chat):
                raise gr.Error(reason, title="Not sent", print_exception=False)
            for conv in chat.conversations:
                conv.pop()
            async for update in answer(chat):
                yield update

        def on_vote(vote: str):
            def handler(chats: dict[str, Chat], request: gr.Request):
                try:
                    arena.vote(chats[mode], vote, request.session_hash or "")
                except PosttrainError as exc:
                    raise failure(exc) from None
                return view(chats[mode])
            return handler

        def on_new_round(chats: dict[str, Chat]):
            chat = chats[mode]
            if chat.status == "streaming":
                raise gr.Error("Wait until both replies are complete.", print_exception=False)
            chat.reset()
            return view(chat, clear_prompt=True)

        send.click(on_send, [prompt, session, *pickers], outputs, api_name=f"{prefix}_send")
        prompt.submit(on_send, [prompt, session, *pickers], outputs, api_visibility="private")
        regenerate.click(on_regenerate, session, outputs, api_name=f"{prefix}_regenerate")
        for v, button in votes.items():
            button.click(on_vote(v), session, outputs, api_name=f"{prefix}_vote_{v}")
        new_round.click(on_new_round, session, outputs, api_name=f"{prefix}_new_round")
        for chatbot in chatbots:  # its trash icon: clearing one side's view starts over
            chatbot.clear(on_new_round, session, outputs, api_visibility="private")
        if pickers:
            for picker in pickers:
                picker.change(on_new_round, session, outputs, api_visibility="private")

            async def load_choices():
                try:
                    served = await arena.served_models()
                except PosttrainError as exc:
                    raise failure(exc) from None
                return [gr.Dropdown(choices=served, value=value) for value in first_two(served)]
            demo.load(load_choices, None, pickers, api_visibility="private")

    with gr.Blocks(title="posttrain arena", analytics_enabled=False) as demo:
        session = gr.State(new_session)  # called once per browser session
        gr.Markdown("# posttrain arena\nChat with two models at once and vote for the better answer. "
                    "Votes are stored with a random session id (no IP address) and become training data.")
        with gr.Tab("Battle", id="battle"):
            gr.Markdown("Two anonymous models answer each prompt. Their names appear after you vote.")
            panel(BATTLE, session)
        with gr.Tab("Side by side", id="side-by-side"):
            panel(SIDE_BY_SIDE, session)
        with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
            refresh = gr.Button("Refresh", size="sm")
            table = gr.Dataframe(label="Ratings (anonymous battles; BT with 95% bootstrap interval)",
                                 interactive=False)
            with gr.Row():
                win_plot, count_plot = gr.Plot(label="Win rate"), gr.Plot(label="Battles per pair")
        board_tab.select(arena.leaderboard, None, [table, win_plot, count_plot], api_visibility="private")
        refresh.click(arena.leaderboard, None, [table, win_plot, count_plot], api_name="leaderboard")
    return demo


def serve_arena(config: ArenaConfig, host: str = "127.0.0.1", port: int = 7860, store: Store | None = None,
                moderation: Moderation | None = None) -> None:
    """Run the arena until Ctrl-C."""
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
    demo = build_app(arena, models)
    # Many people stream at once; each event otherwise defaults to one at a time.
    demo.queue(default_concurrency_limit=64)
    try:
        demo.launch(server_name=host, server_port=port, show_error=True, quiet=True,
                    footer_links=["api"], prevent_thread_lock=True)
    except OSError as exc:
        raise PosttrainError(f"cannot serve the arena on {host}:{port}: {exc}") from None
    print(f"posttrain arena: http://{host}:{port} (Ctrl-C stops)", flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
