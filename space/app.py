"""Chat with, and compare, the FineTome fine-tunes of Llama-3.2 1B and 3B: q4_k_m GGUFs on a CPU Space.

    python space/app.py                                  # the catalog in models.yaml (or $SPACE_MODELS)
    SPACE_SLOTS=2 python space/app.py --n-ctx 2048       # settings: flag > SPACE_* variable > default (space.config)
    python space/app.py --model exports/tiny/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf --port 7861
    python space/app.py --model X-Q4_K_M.gguf --share    # also a public *.gradio.live link (Colab, a laptop)

The same file is the Space's app_file (space/app.py there too: the Space's tree mirrors the repo's). The UI is
thin: every decision (templating, trimming, batching, validation, sampling bounds, what a compare may be voted on)
is made by the space package's pure modules (space.engine.Engine, space.round.CompareRound and their neighbours),
which the tests drive without a browser; the settings are space.config.SpaceConfig.
API: `/chat` (one streamed turn), `/compare` (the same message to two models), `/vote` (after a compare),
`/stop_chat` and `/stop_compare` (the Stop buttons: end the session's answers at their next token),
`/leaderboard` (the arena ratings of the votes so far, space.leaderboard and space.ratings).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

# `python space/app.py` puts space/ on sys.path, not the folder above it that holds the space and common packages
# (the repo here, the Space's root there: scripts/deploy_space.py uploads the same layout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import UsageError  # noqa: E402
from common.llama_runtime import LlamaSetupError, extra_buffers  # noqa: E402
from common.machine import cpu_budget, limit_malloc_arenas  # noqa: E402
from space.ratings import PAIR_HEADERS, RATING_HEADERS, pair_rows, rating_rows, summary  # noqa: E402
from space.catalog import CATALOG_ENV, catalog_from_paths, catalog_from_servers, load_catalog  # noqa: E402
from space.config import STREAM_INTERVAL, SpaceConfig, config_from_args  # noqa: E402
from space.engine import Engine  # noqa: E402
from space.history import prompt_text  # noqa: E402
from space.leaderboard import VoteSources, load_report, report_caption, report_headlines  # noqa: E402
from space.replies import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P,  # noqa: E402
                           MAX_NEW_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE, Sampling, UserError, throttled)
from space.round import VOTES, CompareRound  # noqa: E402
from space.sessions import Stops, rejected  # noqa: E402
from space.votes import VoteLog, unique_vote_file  # noqa: E402

LEADERBOARD_EVERY_S = 60  # the Leaderboard tab refreshes itself this often (and on its button, and when opened)
EXAMPLES = [
    "Explain what a LoRA adapter is in two sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Give me three tips for a first 10 km run.",
    "Translate 'Where is the train station?' into French and Spanish.",
]
DESCRIPTION = (
    "Llama-3.2 Instruct fine-tuned on [FineTome-100k](https://huggingface.co/datasets/mlabonne/FineTome-100k) "
    "with LoRA, merged and quantized to **q4_k_m GGUF**, served on CPU by llama.cpp. "
    "**Chat** with one model, or **Compare** two on the same message (blind, if you like) and vote; the "
    "**Leaderboard** rates the models from the votes."
)
ARENA = (
    "Ratings from the blind votes of the Compare tab, fitted as Chatbot Arena fits them (a Bradley–Terry model on "
    "Elo's scale, around 1000): 100 points apart means the better-rated model wins 64% of the votes. The 95% "
    "interval comes from 1000 refits on the votes resampled: it is wide while the votes are few."
)


def _sampling(temperature, top_p, max_new_tokens) -> Sampling:
    return Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)


def _sampling_controls(tab: str):
    """The system prompt and the sampling sliders, their bounds and defaults from space.replies."""
    return (
        gr.Textbox("", label="System prompt", lines=2, placeholder="Optional, e.g. 'Answer in one sentence.'",
                   elem_id=f"{tab}-system"),
        gr.Slider(*TEMPERATURE_RANGE, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                  elem_id=f"{tab}-temperature"),
        gr.Slider(*TOP_P_RANGE, value=DEFAULT_TOP_P, step=0.05, label="top_p", elem_id=f"{tab}-top-p"),
        gr.Slider(*MAX_NEW_TOKENS_RANGE, value=DEFAULT_MAX_NEW_TOKENS, step=16, label="Max new tokens",
                  elem_id=f"{tab}-max-new-tokens"),
    )


class ChatHandlers:
    """The Chat tab's endpoints: its streamed turns, the API's /chat, and its Stop (/stop_chat)."""

    def __init__(self, engine: Engine, stops: Stops, stream_interval: float):
        self.engine, self.stops, self.stream_interval = engine, stops, stream_interval

    def stop(self, request: gr.Request):  # gr.Request is injected by its annotation
        """/stop_chat: ends this session's chat answer at its next token (the Stop button)."""
        self.stops.stop(request, "chat")

    def _answer(self, message, history, model, system_prompt, temperature, top_p, max_new_tokens, request, endpoint):
        """The chat's streamed Replies, stoppable by the chat's Stop button; one log line if it is refused."""
        reply = None
        with self.stops.running(request, "chat") as cancel:
            # The session's earlier turns keep their sampled tokens in the engine: the next turn reads only what is new.
            replies = self.engine.stream_chat(model, message, history, system_prompt,
                                              _sampling(temperature, top_p, max_new_tokens), cancel=cancel,
                                              session=getattr(request, "session_hash", None))
            for reply in throttled(replies, self.stream_interval):
                yield reply
        if reply is not None and reply.error:
            rejected(endpoint, reply.error)

    def tab(self, message, history, model, system_prompt, temperature, top_p, max_new_tokens, request: gr.Request):
        """The Chat tab (gr.ChatInterface keeps the conversation in the browser)."""
        for reply in self._answer(message, history, model, system_prompt, temperature, top_p, max_new_tokens,
                                  request, "chat"):
            yield (reply.error or reply.text), reply.stats()

    def api(self, message, history, model, system_prompt, temperature, top_p, max_new_tokens, request: gr.Request):
        """/chat: one streamed turn after this API session's conversation so far (`history`, kept here). Its inputs
        come unprocessed (preprocess=False): the engine checks every value and answers a bad one in one line."""
        history = history if isinstance(history, list) else []
        reply = None
        for reply in self._answer(message, history, model, system_prompt, temperature, top_p, max_new_tokens,
                                  request, "/chat"):
            yield (reply.error or reply.text), history, reply.stats()
        if reply is not None and reply.done and not reply.error and reply.text:
            turn = [{"role": "user", "content": prompt_text(message, "message")},
                    {"role": "assistant", "content": reply.text}]
            yield reply.text, [*history, *turn], reply.stats()


class CompareHandlers:
    """The Compare tab's endpoints over a session's CompareRound (space/round.py, kept in a gr.State): /compare
    streams a round, Stop (/stop_compare) stops it, /vote records a vote on it."""

    def __init__(self, engine: Engine, votes: VoteLog, stops: Stops, mode: str, stream_interval: float):
        self.engine, self.votes, self.stops = engine, votes, stops
        self.mode, self.stream_interval = mode, stream_interval

    def compare(self, message, model_a, model_b, system_prompt, temperature, top_p, max_new_tokens, blind,
                random_pair, request: gr.Request):
        """Both answers streamed, with the round as the State; blind, the names stay hidden until the vote. Inputs
        come unprocessed (preprocess=False): the engine checks the message, models and numbers, the round the
        boxes."""
        try:
            round_ = CompareRound.start(message, model_a, model_b, blind, random_pair, self.engine.labels)
        except UserError as error:
            rejected("/compare", str(error))
            refused = CompareRound(message=message, answers=[str(error)] * 2)  # no models: nothing to vote on
            yield (*refused.panels(), "", "", str(error), refused)
            return
        shown, update = round_.shown, None
        with self.stops.running(request, "compare", round_) as cancel:  # what Stop acts on: this round
            replies = self.engine.stream_compare(*round_.models, message, system_prompt,
                                                 _sampling(temperature, top_p, max_new_tokens), mode=self.mode,
                                                 cancel=cancel)
            for reply_a, reply_b in throttled(replies, self.stream_interval):
                round_.update(reply_a, reply_b)
                update = (*round_.panels(), f"**{shown[0]}** · {reply_a.stats()}",
                          f"**{shown[1]}** · {reply_b.stats()}")
                yield (*update, round_.reveal(), round_)
        if failure := round_.failure():
            rejected("/compare", failure)
        if update is not None:
            round_.end()  # finished, or (its answers cut) stopped: never voted on
            yield (*update, round_.reveal(), round_)

    def stop(self, request: gr.Request):
        """/stop_compare: ends both answers of this session's compare at their next token and frees both models. The
        round it stopped is marked stopped at once and becomes the State (its cut answers cannot be voted on):
        Gradio may cancel the compare event before its last update says so, and the State may still hold the
        previous round until this one's first update lands."""
        round_ = self.stops.stop(request, "compare")
        if isinstance(round_, CompareRound) and round_.stop():
            return round_.reveal(), round_
        return gr.skip(), gr.skip()

    def vote(self, choice, round_):
        """A vote on this session's last compare (`round_`, the State); `choice` comes unprocessed: the round
        checks it, and a refused vote is answered, and logged, in one line."""
        try:
            return (round_ if isinstance(round_, CompareRound) else CompareRound()).vote(choice, self.votes)
        except UserError as error:
            rejected("/vote", str(error))
            return str(error)


def show_leaderboard(sources: VoteSources):
    """The summary, the ratings and pairs tables, and the chart (points above or below 1000 per rated model)."""
    board, note = sources.leaderboard()
    text = (summary(board) if board.ratings else "No votes yet: compare two models blind and vote.") + (
        f"\n\n{note}" if note else "")
    rated = [row for row in board.ratings if row.rating is not None]
    chart = pd.DataFrame({"model": [row.model for row in rated], "points": [row.rating - 1000 for row in rated]})
    return (text, pd.DataFrame(rating_rows(board), columns=RATING_HEADERS),
            pd.DataFrame(pair_rows(board), columns=PAIR_HEADERS), chart)


def build_app(engine: Engine, votes: VoteLog, compare_mode: str = "interleaved",
              stream_interval: float = STREAM_INTERVAL, examples: list[str] | None = None, report: dict | None = None,
              sources: VoteSources | None = None) -> gr.Blocks:
    """`examples`: the chat's clickable examples, shown before the built-in EXAMPLES (none repeated); `report`:
    compare's report (space.leaderboard.load_report), whose headline figures the Leaderboard shows; `sources`: the
    votes it rates (default: the vote log's file, and its Hub dataset if it has one)."""
    examples = list(dict.fromkeys([*(examples or []), *EXAMPLES]))
    sources = sources or VoteSources(votes.path, votes.hub_repo_id)
    stops = Stops()  # the Stop buttons' cancel events, by session and tab
    with gr.Blocks(title="Llama-3.2 FineTome chat") as app:
        gr.Markdown(f"# Llama-3.2 FineTome: 1B vs 3B on CPU\n{DESCRIPTION}")
        with gr.Tab("Chat"):
            _chat_tab(ChatHandlers(engine, stops, stream_interval), engine.labels, examples)
        with gr.Tab("Compare"):
            _compare_tab(CompareHandlers(engine, votes, stops, compare_mode, stream_interval), engine.labels,
                         votes.notice())
        with gr.Tab("Leaderboard", elem_id="leaderboard-tab") as leaderboard_tab:
            board = _leaderboard_tab(leaderboard_tab, sources, report)
        app.load(lambda: show_leaderboard(sources), None, board, api_name=False, show_progress="hidden")
    return app


def _chat_tab(handlers: ChatHandlers, labels: list[str], examples: list[str]) -> None:
    model = gr.Dropdown(labels, value=labels[0], label="Model", elem_id="chat-model")
    stats = gr.Markdown("", elem_id="chat-stats")
    with gr.Accordion("Settings", open=False):
        system_prompt, temperature, top_p, max_new_tokens = _sampling_controls("chat")
    chat_input = gr.Textbox(placeholder="Type a message and press Enter", elem_id="chat-input", show_label=False,
                            submit_btn=True, stop_btn=True)
    settings = [model, system_prompt, temperature, top_p, max_new_tokens]
    gr.ChatInterface(
        handlers.tab,
        chatbot=gr.Chatbot(elem_id="chat-bot", height=420),
        textbox=chat_input,
        additional_inputs=settings,
        additional_outputs=[stats],
        examples=[[text] for text in examples],
        cache_examples=False,  # examples run on click, never at start-up
        api_name="chat_tab", api_visibility="private",  # the API's /chat is handlers.api below
        fill_height=False,
    )
    # Beside the ChatInterface's own Stop (which cancels its event): the engine stops at the next token.
    chat_input.stop(handlers.stop, None, None, queue=False, api_name="stop_chat")
    api_message, api_answer, api_history = gr.Textbox(visible=False), gr.Textbox(visible=False), gr.State([])
    gr.Button(visible=False).click(handlers.api, [api_message, api_history, *settings],
                                   [api_answer, api_history, stats], api_name="chat", preprocess=False)


def _compare_tab(handlers: CompareHandlers, labels: list[str], notice: str) -> None:
    with gr.Row():
        model_a = gr.Dropdown(labels, value=labels[0], label="Model A", elem_id="compare-a")
        model_b = gr.Dropdown(labels, value=labels[1] if len(labels) > 1 else labels[0], label="Model B",
                              elem_id="compare-b")
        blind = gr.Checkbox(True, label="Blind (hide names until you vote)", elem_id="compare-blind")
        # As the Arena: blind pairs drawn so that each pair is voted on equally often; untick to choose.
        random_pair = gr.Checkbox(len(labels) > 2, label="Random pair (blind mode; each pair equally often)",
                                  visible=len(labels) > 2, elem_id="compare-random")
    with gr.Accordion("Settings (the same for both)", open=False):
        system_prompt, temperature, top_p, max_new_tokens = _sampling_controls("compare")
    message = gr.Textbox(label="Message", placeholder="Ask both models the same thing", elem_id="compare-message")
    with gr.Row():
        send = gr.Button("Compare", variant="primary", elem_id="compare-send")
        stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    with gr.Row():
        with gr.Column():
            chat_a = gr.Chatbot(label="A", height=320, elem_id="compare-chat-a")
            stats_a = gr.Markdown("", elem_id="compare-stats-a")
        with gr.Column():
            chat_b = gr.Chatbot(label="B", height=320, elem_id="compare-chat-b")
            stats_b = gr.Markdown("", elem_id="compare-stats-b")
    reveal = gr.Markdown("", elem_id="compare-reveal")
    round_ = gr.State(CompareRound())  # the session's last compare (Gradio deep-copies this first value per session)
    with gr.Row():
        vote_buttons = [gr.Button(f"{choice}" if choice in ("tie", "both bad") else f"{choice} is better",
                                  elem_id=f"vote-{choice.replace(' ', '-')}") for choice in VOTES]
    gr.Markdown(notice, elem_id="vote-notice")
    inputs = [message, model_a, model_b, system_prompt, temperature, top_p, max_new_tokens, blind, random_pair]
    outputs = [chat_a, chat_b, stats_a, stats_b, reveal, round_]
    # Unprocessed inputs (preprocess=False): the handlers and the engine check every value themselves.
    runs = [send.click(handlers.compare, inputs, outputs, api_name="compare", preprocess=False),
            message.submit(handlers.compare, inputs, outputs, api_name=False, preprocess=False)]
    # Stop: the engine ends both answers at their next token and frees both models (the cancel event); Gradio
    # cancels the event, which stops the updates.
    stop.click(handlers.stop, None, [reveal, round_], cancels=runs, queue=False, api_name="stop_compare")
    for button, choice in zip(vote_buttons, VOTES):
        # Each button votes its own choice; the API takes the choice as an argument.
        button.click(lambda state, c=choice: handlers.vote(c, state), [round_], [reveal], api_name=False,
                     preprocess=False)
    api_choice, api_vote = gr.Textbox(visible=False), gr.Button(visible=False)
    api_vote.click(handlers.vote, [api_choice, round_], [reveal], api_name="vote", preprocess=False)


def _leaderboard_tab(tab: gr.Tab, sources: VoteSources, report: dict | None) -> list:
    """The Leaderboard's components, refreshed by its button (/leaderboard), when opened and every minute; returns
    the components show_leaderboard() fills."""
    gr.Markdown(ARENA)
    board_summary = gr.Markdown("", elem_id="leaderboard-summary")
    board_table = gr.Dataframe(headers=RATING_HEADERS, interactive=False, elem_id="leaderboard-table")
    board_chart = gr.BarPlot(x="model", y="points", y_title="Rating - 1000", height=240, sort="-y",
                             label="Rating above or below 1000 (intervals in the table)", elem_id="leaderboard-chart")
    pair_table = gr.Dataframe(headers=PAIR_HEADERS, interactive=False, label="Pairs", elem_id="leaderboard-pairs")
    refresh = gr.Button("Refresh", elem_id="leaderboard-refresh")
    if report:
        headers, rows = report_headlines(report)
        gr.Markdown(f"### Measured, beside the votes\n{report_caption(report)}")
        gr.Dataframe(pd.DataFrame(rows, columns=headers), interactive=False, elem_id="report-table")
    board = [board_summary, board_table, pair_table, board_chart]
    refresh.click(lambda: show_leaderboard(sources), None, board, api_name="leaderboard")
    for event in (tab.select, gr.Timer(LEADERBOARD_EVERY_S).tick):
        event(lambda: show_leaderboard(sources), None, board, api_name=False, show_progress="hidden")
    return board


def parse_args(argv=None, environ=None) -> SpaceConfig:
    """The settings (space.config: flag > SPACE_* variable > default); a mistake, or several, is one `error:` line
    each and exit 2 (common.cli)."""
    try:
        return config_from_args(argv, environ, description=__doc__.splitlines()[0])
    except UsageError as error:
        sys.exit(error.report())


def main(argv=None) -> None:
    config = parse_args(argv)
    # One line per event in the Space's log: our loggers at INFO (rejected requests), the libraries' at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("space").setLevel(logging.INFO)
    limit_malloc_arenas(2)  # before Gradio's threads: without it RSS creeps up with every request (common.machine)
    try:
        catalog = (catalog_from_paths(config.model) if config.model else []) + catalog_from_servers(config.server)
        catalog = catalog or load_catalog(env={CATALOG_ENV: config.catalog or ""})
        print(extra_buffers().describe(), flush=True)  # which llama.cpp path every model here takes, and why
        print(f"llama.cpp {cpu_budget().describe()}", flush=True)  # a container's quota can be below its cores
        report = load_report(config.report) if config.report else None
        engine = Engine(catalog, n_ctx=config.n_ctx, cache_bytes=config.cache_bytes, slots=config.slots)
    except (UserError, LlamaSetupError) as e:
        sys.exit(f"error: {e}")
    votes_path = Path(config.votes)
    if config.votes_repo:  # pushed to the Hub: one file per process, so a restarted Space never overwrites votes
        votes_path = unique_vote_file(votes_path.parent)
    votes = VoteLog(votes_path, hub_repo_id=config.votes_repo)
    app = build_app(engine, votes, compare_mode=config.compare_mode, stream_interval=config.stream_interval,
                    examples=config.example, report=report)
    # As many requests at once as the engine answers at once (every model's slots): Gradio's queue never holds back
    # what a free slot could serve, and what waits beyond them waits in the engine's line, which says where it is.
    app.queue(default_concurrency_limit=engine.capacity())
    if config.memory_log_interval > 0:
        threading.Thread(target=_log_memory, args=(engine, config.memory_log_interval), daemon=True).start()
    # share None, not False, without --share: Gradio's own default (GRADIO_SHARE, or a link in a hosted notebook).
    app.launch(server_name=config.host, server_port=config.port, show_error=True, share=config.share or None,
               state_session_capacity=config.max_sessions)


def _log_memory(engine: Engine, interval: float) -> None:
    """A memory line every `interval` seconds: what a Space owner watches to size --cache-mb."""
    while True:
        print(engine.memory_line(), flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
