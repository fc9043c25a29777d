"""The arena's web app: Gradio widgets wired to the `Arena` (posttrain.ui.arena), which holds
all of the battle and session logic. Each event's `api_name` is public (gradio_client users and
the tests call `/battle_send`, `/battle_vote_b`, ...)."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

import gradio as gr

from posttrain.errors import PosttrainError
from posttrain.ui.arena import BATTLE, MODE, SIDE_BY_SIDE, Arena, Chat, first_two, new_session
from posttrain.ui.votes import VOTE_LABELS


def refused(exc: PosttrainError) -> gr.Error:
    return gr.Error(str(exc), title="Not now", print_exception=False)


def status_message(chat: Chat) -> str:
    """The line under the chat: what happened and what the user can do next."""
    if chat.status == "voted" and chat.mode == BATTLE:
        return (f"**You voted: {VOTE_LABELS[chat.last_vote]}.** Model A was **{chat.models[0]}**, "
                f"model B was **{chat.models[1]}**, both {MODE[chat.thinking]}. Start a new round to battle again.")
    if chat.status == "voted":
        return f"**Saved: {VOTE_LABELS[chat.last_vote]}.** Keep chatting to vote on the next turn."
    if chat.status == "failed":
        failed = " and ".join(f"model {side} ({why})" for side, why in zip("AB", chat.failures) if why)
        return (f"**{failed[0].upper()}{failed[1:]} failed, so this turn cannot be voted on.** "
                "Regenerate, or start a new round.")
    return {"empty": "", "streaming": "Both models are answering…", "voting": "Saving your vote…",
            "ready": "Which reply is better? Vote, or keep chatting."}[chat.status]


def thought(reply: dict[str, Any], thinking_now: bool) -> dict[str, Any]:
    """A reply's trace as Gradio's collapsible "thought" message (metadata with a title): open,
    with a spinner, while the model is still thinking; collapsed ("done") once it answers."""
    n = reply.get("reasoning_tokens", 0)
    tokens = f"{n} token{'s' if n != 1 else ''}"
    title = f"Thinking… ({tokens})" if thinking_now else f"Thought for {tokens}"
    return {"role": "assistant", "content": reply["reasoning"],
            "metadata": {"title": title, "status": "pending" if thinking_now else "done"}}


def chatbot_messages(conversation: list[dict[str, Any]], live: bool) -> list[dict[str, Any]]:
    """A conversation as the Chatbot shows it: a reply that thought is its trace (`thought`)
    and then its answer, apart. `live`: the last reply is still streaming."""
    shown = []
    for i, message in enumerate(conversation):
        if message.get("reasoning"):
            shown.append(thought(message, live and i == len(conversation) - 1 and not message["content"]))
        shown.append({"role": message["role"], "content": message["content"]})
    return shown


def chat_label(chat: Chat, side: str, name: str) -> str:
    """A chatbot's label: the side, the model once revealed, and the round's mode once it began."""
    mode = f" (thinking {'on' if chat.thinking else 'off'})" if chat.models else ""
    return f"Model {side}{mode}" + (f": {name}" if name else "")


class Panel:
    """The chat-and-vote panel shared by the battle and side-by-side tabs: its widgets, and the
    events that pass the tab's Chat to the Arena and show the result."""

    def __init__(self, arena: Arena, mode: str, models: list[str]):
        self.arena, self.mode = arena, mode
        self.prefix = "battle" if mode == BATTLE else "side_by_side"
        self.pickers: list[gr.Dropdown] = []
        if mode == SIDE_BY_SIDE:
            with gr.Row():
                self.pickers = [gr.Dropdown(label=f"Model {side}", choices=models, value=value, interactive=True)
                                for side, value in zip("AB", first_two(models))]
        # One mode per round, for both sides: flipping it starts a new round (see `wire`).
        self.thinking = gr.Checkbox(value=arena.config.thinking, label="Thinking: both models reason before they "
                                    "answer (their traces shown collapsed)", elem_id=f"{self.prefix}-thinking")
        with gr.Row():
            self.chatbots = [gr.Chatbot(label=f"Model {side}", height=420, buttons=["copy", "copy_all"],
                                        elem_id=f"{self.prefix}-chat-{side.lower()}") for side in "AB"]
        with gr.Row():
            self.prompt = gr.Textbox(placeholder="Ask both models anything, then press Enter", show_label=False,
                                     scale=6, max_length=arena.config.max_prompt_chars,
                                     elem_id=f"{self.prefix}-prompt")
            self.send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{self.prefix}-send")
        with gr.Row():
            self.votes = {v: gr.Button(label[0].upper() + label[1:], interactive=False,
                                       elem_id=f"{self.prefix}-vote-{v}") for v, label in VOTE_LABELS.items()}
        self.info = gr.Markdown(elem_id=f"{self.prefix}-info")
        with gr.Row():
            self.new_round = gr.Button("New round" if mode == BATTLE else "Clear", elem_id=f"{self.prefix}-new")
            self.regenerate = gr.Button("Regenerate", interactive=False, elem_id=f"{self.prefix}-regenerate")
        self.outputs = [*self.chatbots, self.prompt, *self.votes.values(), self.regenerate, self.info]

    def view(self, chat: Chat, clear_prompt: bool = False) -> tuple:
        """The updates of `outputs` that show `chat`."""
        names = chat.models if chat.revealed and chat.models else ["", ""]
        live = chat.status == "streaming"
        return (*[gr.Chatbot(value=chatbot_messages(conv, live), label=chat_label(chat, side, name))
                  for conv, side, name in zip(chat.conversations, "AB", names)],
                gr.Textbox(value="") if clear_prompt else gr.Textbox(),
                *[gr.Button(interactive=chat.status == "ready") for _ in self.votes],
                gr.Button(interactive=chat.status in ("ready", "failed")), status_message(chat))

    async def answer(self, chat: Chat, updates: AsyncIterator[None]):
        # aclosing: a client that leaves closes this handler, and must close the stream with it
        # (cancelling both requests and marking the turn failed) rather than leave it to the GC.
        async with aclosing(updates):
            async for _ in updates:
                yield self.view(chat, clear_prompt=True)
        yield self.view(chat, clear_prompt=True)

    async def on_send(self, prompt: str, chats: dict[str, Chat], *picks):
        chat, thinking = chats[self.mode], picks[-1]  # picks: the two models side by side, then the mode
        try:
            updates = await self.arena.send(chat, prompt, list(picks[:-1]) if self.pickers else None, thinking)
        except PosttrainError as exc:
            raise refused(exc) from None
        async for view in self.answer(chat, updates):
            yield view

    async def on_regenerate(self, chats: dict[str, Chat]):
        chat = chats[self.mode]
        try:
            updates = await self.arena.regenerate(chat)
        except PosttrainError as exc:
            raise refused(exc) from None
        async for view in self.answer(chat, updates):
            yield view

    def on_vote(self, vote: str):
        async def handler(chats: dict[str, Chat], request: gr.Request):
            try:
                await self.arena.vote(chats[self.mode], vote, request.session_hash or "")
            except PosttrainError as exc:
                raise refused(exc) from None
            return self.view(chats[self.mode])
        return handler

    async def on_new_round(self, chats: dict[str, Chat]):
        try:
            self.arena.new_round(chats[self.mode])
        except PosttrainError as exc:
            raise refused(exc) from None
        return self.view(chats[self.mode], clear_prompt=True)

    async def load_choices(self):
        try:
            served = await self.arena.served_models()
        except PosttrainError as exc:
            raise refused(exc) from None
        return [gr.Dropdown(choices=served, value=value) for value in first_two(served)]

    def wire(self, demo: gr.Blocks, session: gr.State) -> None:
        """Attach the events. The handlers are coroutines, so Gradio runs them on its event loop,
        not in worker threads: the Arena relies on that to claim a chat."""
        send_inputs = [self.prompt, session, *self.pickers, self.thinking]
        self.send.click(self.on_send, send_inputs, self.outputs, api_name=f"{self.prefix}_send")
        self.prompt.submit(self.on_send, send_inputs, self.outputs, api_visibility="private")
        self.regenerate.click(self.on_regenerate, session, self.outputs, api_name=f"{self.prefix}_regenerate")
        for v, button in self.votes.items():
            button.click(self.on_vote(v), session, self.outputs, api_name=f"{self.prefix}_vote_{v}")
        self.new_round.click(self.on_new_round, session, self.outputs, api_name=f"{self.prefix}_new_round")
        for chatbot in self.chatbots:  # its trash icon: clearing one side's view starts over
            chatbot.clear(self.on_new_round, session, self.outputs, api_visibility="private")
        for picker in [*self.pickers, self.thinking]:
            picker.change(self.on_new_round, session, self.outputs, api_visibility="private")
        if self.pickers:
            demo.load(self.load_choices, None, self.pickers, api_visibility="private")


def build_app(arena: Arena, models: list[str]) -> gr.Blocks:
    """The web app; `models` are the side-by-side choices until a page load refreshes them."""
    with gr.Blocks(title="posttrain arena", analytics_enabled=False) as demo:
        session = gr.State(new_session)  # called once per browser session
        logged = (" Your prompts and the models' replies are logged by the API as training data too."
                  if arena.config.requests_logged else "")
        gr.Markdown("# posttrain arena\nChat with two models at once and vote for the better answer. "
                    "Votes are stored with a random session id (no IP address) and become training data." + logged)
        with gr.Tab("Battle", id="battle"):
            gr.Markdown("Two anonymous models answer each prompt. Their names appear after you vote.")
            Panel(arena, BATTLE, models).wire(demo, session)
        with gr.Tab("Side by side", id="side-by-side"):
            Panel(arena, SIDE_BY_SIDE, models).wire(demo, session)
        with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
            with gr.Row():
                # Battles run in one mode; a thinking model's rating with and without it can differ.
                mode = gr.Radio([("All battles", "all"), ("Thinking on", "on"), ("Thinking off", "off")], value="all",
                                label="Mode", elem_id="leaderboard-mode", scale=4)
                refresh = gr.Button("Refresh", size="sm", scale=1)
            # Widths of ratings.DISPLAY_COLUMNS: room for long model names, none wasted on numbers.
            table = gr.Dataframe(label="Ratings of the anonymous battles", interactive=False,
                                 elem_id="leaderboard-table", column_widths=["8%", "40%", "11%", "14%", "11%", "16%"])
            notes = gr.Markdown(elem_id="leaderboard-notes")
            with gr.Row():
                win_plot, count_plot = gr.Plot(label="Win rate"), gr.Plot(label="Battles per pair")
        board = [table, notes, win_plot, count_plot]
        # The public one first: Gradio names the others after the function, and a later event
        # asking for "leaderboard" would get "leaderboard_2".
        refresh.click(arena.leaderboard, mode, board, api_name="leaderboard")
        board_tab.select(arena.leaderboard, mode, board, api_visibility="private")
        mode.change(arena.leaderboard, mode, board, api_visibility="private")
    return demo
