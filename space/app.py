"""Chat with, and compare, the FineTome fine-tunes of Llama-3.2 1B and 3B: q4_k_m GGUFs on a CPU Space.

    python space/app.py                                  # the catalog in models.yaml (or $SPACE_MODELS)
    python space/app.py --model exports/tiny/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf --port 7861
    python space/app.py --model X-Q4_K_M.gguf --share    # also a public *.gradio.live link (Colab, a laptop)

The same file is the Space's app_file (space/app.py there too: the Space's tree mirrors the repo's). The UI is
thin: every decision (templating, trimming, batching, validation, sampling bounds) is made by the space package's
pure modules (space.engine.Engine and its neighbours), which the tests drive without a browser.
API: `/chat` (one streamed turn), `/compare` (the same message to two models), `/vote` (after a compare),
`/stop_chat` and `/stop_compare` (the Stop buttons: end the session's answers at their next token),
`/leaderboard` (the arena ratings of the votes so far, space.leaderboard and compare.ratings).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

# `python space/app.py` puts space/ on sys.path, not the folder above it that holds the space and common packages
# (the repo here, the Space's root there: scripts/deploy_space.py uploads the same layout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import UsageError, UsageParser  # noqa: E402
from common.llama import LlamaSetupError, extra_buffers  # noqa: E402
from common.machine import cpu_budget, limit_malloc_arenas  # noqa: E402
from compare.ratings import PAIR_HEADERS, RATING_HEADERS, pair_rows, rating_rows, summary  # noqa: E402
from space.catalog import catalog_from_paths, catalog_from_servers, load_catalog  # noqa: E402
from space.engine import COMPARE_MODES, DEFAULT_N_CTX, DEFAULT_SLOTS, Engine  # noqa: E402
from space.history import prompt_text  # noqa: E402
from space.leaderboard import VoteSources, fair_pair, load_report, report_caption, report_headlines  # noqa: E402
from space.replies import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P,  # noqa: E402
                           MAX_NEW_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE, Sampling, UserError, _one_line,
                           throttled)
from space.sessions import Stops, flag, rejected, shown_message  # noqa: E402
from space.votes import VOTES, VoteLog, unique_vote_file, vote_problem  # noqa: E402

STREAM_INTERVAL = 0.1  # seconds between streamed updates (see space.replies.throttled); 0 = one update per token
STOPPED = "Stopped: compare again to vote."  # the reveal line of a stopped compare (cut answers get no vote)
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


def build_app(engine: Engine, votes: VoteLog, compare_mode: str = "interleaved",
              stream_interval: float = STREAM_INTERVAL, examples: list[str] | None = None, report: dict | None = None,
              sources: VoteSources | None = None) -> gr.Blocks:
    """`examples`: the chat's clickable examples, shown before the built-in EXAMPLES (none repeated); `report`:
    compare's report (space.leaderboard.load_report), whose headline figures the Leaderboard shows; `sources`: the
    votes it rates (default: the vote log's file, and its Hub dataset if it has one)."""
    examples = list(dict.fromkeys([*(examples or []), *EXAMPLES]))
    labels = engine.labels
    second = labels[1] if len(labels) > 1 else labels[0]
    sources = sources or VoteSources(votes.path, votes.hub_repo_id)

    def sampling_controls(tab: str):
        return (
            gr.Textbox("", label="System prompt", lines=2, placeholder="Optional, e.g. 'Answer in one sentence.'",
                       elem_id=f"{tab}-system"),
            gr.Slider(*TEMPERATURE_RANGE, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                      elem_id=f"{tab}-temperature"),
            gr.Slider(*TOP_P_RANGE, value=DEFAULT_TOP_P, step=0.05, label="top_p", elem_id=f"{tab}-top-p"),
            gr.Slider(*MAX_NEW_TOKENS_RANGE, value=DEFAULT_MAX_NEW_TOKENS, step=16, label="Max new tokens",
                      elem_id=f"{tab}-max-new-tokens"),
        )

    stops = Stops()

    def stop_chat(request: gr.Request):  # gr.Request is injected by its annotation
        """/stop_chat: ends this session's chat answer at its next token (the Stop button)."""
        stops.stop(request, "chat")

    def stop_compare(request: gr.Request):
        """/stop_compare: ends both answers of this session's compare at their next token and frees both models.
        The compare it stopped is marked stopped at once (its cut answers cannot be voted on): Gradio may cancel
        the compare event before its last update says so."""
        state = stops.stop(request, "compare")
        if isinstance(state, dict) and not state.get("finished"):
            return STOPPED, {**state, "stopped": True}
        return gr.skip(), gr.skip()

    def answer(message, history, model, system_prompt, temperature, top_p, max_new_tokens, request, endpoint):
        """The chat's streamed Replies, stoppable by the chat's Stop button; one log line if it is refused."""
        reply = None
        with stops.running(request, "chat") as cancel:
            # The session's earlier turns keep their sampled tokens in the engine: the next turn reads only what is new.
            for reply in throttled(engine.stream_chat(model, message, history, system_prompt,
                                                      _sampling(temperature, top_p, max_new_tokens), cancel=cancel,
                                                      session=getattr(request, "session_hash", None)),
                                   stream_interval):
                yield reply
        if reply is not None and reply.error:
            rejected(endpoint, reply.error)

    def chat(message, history, model, system_prompt, temperature, top_p, max_new_tokens, request: gr.Request):
        """The Chat tab (gr.ChatInterface keeps the conversation in the browser)."""
        for reply in answer(message, history, model, system_prompt, temperature, top_p, max_new_tokens, request,
                            "chat"):
            yield (reply.error or reply.text), reply.stats()

    def api_chat(message, history, model, system_prompt, temperature, top_p, max_new_tokens,
                 request: gr.Request):
        """/chat: one streamed turn after this API session's conversation so far (`history`, kept here). Its inputs
        come unprocessed (preprocess=False): the engine checks every value and answers a bad one in one line."""
        history = history if isinstance(history, list) else []
        reply = None
        for reply in answer(message, history, model, system_prompt, temperature, top_p, max_new_tokens, request,
                            "/chat"):
            yield (reply.error or reply.text), history, reply.stats()
        if reply is not None and reply.done and not reply.error and reply.text:
            turn = [{"role": "user", "content": prompt_text(message, "message")},
                    {"role": "assistant", "content": reply.text}]
            yield reply.text, [*history, *turn], reply.stats()

    def compare(message, model_a, model_b, system_prompt, temperature, top_p, max_new_tokens, blind, random_pair,
                request: gr.Request):
        """Both answers streamed; in blind mode the sides are shuffled and the names hidden until the vote, and with
        `random_pair` (more than two models) the pair is drawn fairly instead of taken from the dropdowns. Inputs
        come unprocessed (preprocess=False): the engine checks the message, models and numbers, flag() the boxes."""
        shown_user = {"role": "user", "content": shown_message(message)}
        try:
            blind, random_pair = flag(blind, "Blind"), flag(random_pair, "Random pair")
        except UserError as error:
            rejected("/compare", str(error))
            answer = [shown_user, {"role": "assistant", "content": str(error)}]
            yield answer, answer, "", "", str(error), {}
            return
        sides = [model_a, model_b]
        if blind and random_pair and len(labels) > 2:
            sides = fair_pair(labels)
        elif blind:
            random.shuffle(sides)
        shown = ("Model A", "Model B") if blind else tuple(sides)
        # finished: set only once both answers have ended, so a vote sent mid-stream (or after Stop) is refused.
        state = {"models": sides, "message": message, "answers": ["", ""], "blind": bool(blind), "voted": False,
                 "finished": False, "errors": [False, False]}
        reveal = "Blind: vote to see which model is which." if blind else f"A = {sides[0]}, B = {sides[1]}"
        writing = "Both answers are being written: vote when they are done."
        update, errors, stopped = None, [], False
        with stops.running(request, "compare", state) as cancel:
            for reply_a, reply_b in throttled(engine.stream_compare(sides[0], sides[1], message, system_prompt,
                                                                    _sampling(temperature, top_p, max_new_tokens),
                                                                    mode=compare_mode, cancel=cancel),
                                              stream_interval):
                state["answers"] = [reply_a.error or reply_a.text, reply_b.error or reply_b.text]
                state["errors"] = [reply_a.error is not None, reply_b.error is not None]
                errors = [reply.error for reply in (reply_a, reply_b) if reply.error]
                stopped = "cancelled" in (reply_a.finish_reason, reply_b.finish_reason)
                update = (
                    [shown_user, {"role": "assistant", "content": state["answers"][0]}],
                    [shown_user, {"role": "assistant", "content": state["answers"][1]}],
                    f"**{shown[0]}** · {reply_a.stats()}", f"**{shown[1]}** · {reply_b.stats()}",
                    writing, state,
                )
                yield update
        if errors:
            rejected("/compare", "; ".join(dict.fromkeys(errors)))
        if update is not None:  # a stopped compare has cut answers: it ends, but it cannot be voted on
            state = {**state, "finished": not stopped, "stopped": stopped}
            yield (*update[:-2], STOPPED if stopped else reveal, state)

    def vote(choice, state):
        """A vote on this session's last compare (`state`); `choice` comes unprocessed: checked here."""
        if not isinstance(choice, str) or choice not in VOTES:
            problem = f"Unknown vote '{_one_line(choice, 40)}'; choose one of: {', '.join(VOTES)}."
        elif isinstance(state, dict) and state.get("voted"):
            problem = f"Already voted: A = {state['models'][0]}, B = {state['models'][1]}."
        else:
            problem = vote_problem(state if isinstance(state, dict) else None)
        if problem is None:
            try:
                votes.record(state["models"][0], state["models"][1], choice, state["message"],
                             state["answers"][0], state["answers"][1], state["blind"])
            except UserError as e:
                problem = str(e)
        if problem is not None:
            rejected("/vote", problem)
            return problem
        state["voted"] = True
        return f"Thanks! You voted **{choice}**. A = **{state['models'][0]}**, B = **{state['models'][1]}**."

    def show_leaderboard():
        """The summary, the ratings and pairs tables, and the chart (points above or below 1000 per rated model)."""
        board, note = sources.leaderboard()
        text = (summary(board) if board.ratings else "No votes yet: compare two models blind and vote.") + (
            f"\n\n{note}" if note else "")
        rated = [row for row in board.ratings if row.rating is not None]
        chart = pd.DataFrame({"model": [row.model for row in rated], "points": [row.rating - 1000 for row in rated]})
        return (text, pd.DataFrame(rating_rows(board), columns=RATING_HEADERS),
                pd.DataFrame(pair_rows(board), columns=PAIR_HEADERS), chart)

    with gr.Blocks(title="Llama-3.2 FineTome chat") as app:
        gr.Markdown(f"# Llama-3.2 FineTome: 1B vs 3B on CPU\n{DESCRIPTION}")
        with gr.Tab("Chat"):
            model = gr.Dropdown(labels, value=labels[0], label="Model", elem_id="chat-model")
            stats = gr.Markdown("", elem_id="chat-stats")
            with gr.Accordion("Settings", open=False):
                system_prompt, temperature, top_p, max_new_tokens = sampling_controls("chat")
            chat_input = gr.Textbox(placeholder="Type a message and press Enter", elem_id="chat-input",
                                    show_label=False, submit_btn=True, stop_btn=True)
            chat_settings = [model, system_prompt, temperature, top_p, max_new_tokens]
            gr.ChatInterface(
                chat,
                chatbot=gr.Chatbot(elem_id="chat-bot", height=420),
                textbox=chat_input,
                additional_inputs=chat_settings,
                additional_outputs=[stats],
                examples=[[text] for text in examples],
                cache_examples=False,  # examples run on click, never at start-up
                api_name="chat_tab", api_visibility="private",  # the API's /chat is api_chat below
                fill_height=False,
            )
            # Beside the ChatInterface's own Stop (which cancels its event): the engine stops at the next token.
            chat_input.stop(stop_chat, None, None, queue=False, api_name="stop_chat")
            api_message, api_answer, api_history = gr.Textbox(visible=False), gr.Textbox(visible=False), gr.State([])
            gr.Button(visible=False).click(api_chat, [api_message, api_history, *chat_settings],
                                           [api_answer, api_history, stats], api_name="chat", preprocess=False)
        with gr.Tab("Compare"):
            with gr.Row():
                model_a = gr.Dropdown(labels, value=labels[0], label="Model A", elem_id="compare-a")
                model_b = gr.Dropdown(labels, value=second, label="Model B", elem_id="compare-b")
                blind = gr.Checkbox(True, label="Blind (hide names until you vote)", elem_id="compare-blind")
                # As the Arena: blind pairs drawn so that each pair is voted on equally often; untick to choose.
                random_pair = gr.Checkbox(len(labels) > 2, label="Random pair (blind mode; each pair equally often)",
                                          visible=len(labels) > 2, elem_id="compare-random")
            with gr.Accordion("Settings (the same for both)", open=False):
                c_system, c_temperature, c_top_p, c_max_new_tokens = sampling_controls("compare")
            message = gr.Textbox(label="Message", placeholder="Ask both models the same thing",
                                 elem_id="compare-message")
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
            state = gr.State({})
            with gr.Row():
                vote_buttons = [gr.Button(f"{choice}" if choice in ("tie", "both bad") else f"{choice} is better",
                                          elem_id=f"vote-{choice.replace(' ', '-')}") for choice in VOTES]
            gr.Markdown(votes.notice(), elem_id="vote-notice")
            inputs = [message, model_a, model_b, c_system, c_temperature, c_top_p, c_max_new_tokens, blind, random_pair]
            outputs = [chat_a, chat_b, stats_a, stats_b, reveal, state]
            # Unprocessed inputs (preprocess=False): compare() and the engine check every value themselves.
            runs = [send.click(compare, inputs, outputs, api_name="compare", preprocess=False),
                    message.submit(compare, inputs, outputs, api_name=False, preprocess=False)]
            # Stop: the engine ends both answers at their next token and frees both models (the cancel event);
            # Gradio cancels the event, which stops the updates.
            stop.click(stop_compare, None, [reveal, state], cancels=runs, queue=False, api_name="stop_compare")
            for button, choice in zip(vote_buttons, VOTES):
                # Each button votes its own choice; the API takes the choice as an argument.
                button.click(lambda s, c=choice: vote(c, s), [state], [reveal], api_name=False, preprocess=False)
            api_choice = gr.Textbox(visible=False)
            api_vote = gr.Button(visible=False)
            api_vote.click(vote, [api_choice, state], [reveal], api_name="vote", preprocess=False)
        with gr.Tab("Leaderboard", elem_id="leaderboard-tab") as leaderboard_tab:
            gr.Markdown(ARENA)
            board_summary = gr.Markdown("", elem_id="leaderboard-summary")
            board_table = gr.Dataframe(headers=RATING_HEADERS, interactive=False, elem_id="leaderboard-table")
            board_chart = gr.BarPlot(x="model", y="points", y_title="Rating - 1000", height=240, sort="-y",
                                     label="Rating above or below 1000 (intervals in the table)",
                                     elem_id="leaderboard-chart")
            pair_table = gr.Dataframe(headers=PAIR_HEADERS, interactive=False, label="Pairs",
                                      elem_id="leaderboard-pairs")
            refresh = gr.Button("Refresh", elem_id="leaderboard-refresh")
            if report:
                headers, rows = report_headlines(report)
                gr.Markdown(f"### Measured, beside the votes\n{report_caption(report)}")
                gr.Dataframe(pd.DataFrame(rows, columns=headers), interactive=False, elem_id="report-table")
            board = [board_summary, board_table, pair_table, board_chart]
            refresh.click(show_leaderboard, None, board, api_name="leaderboard")
            for event in (leaderboard_tab.select, gr.Timer(LEADERBOARD_EVERY_S).tick):
                event(show_leaderboard, None, board, api_name=False, show_progress="hidden")
        app.load(show_leaderboard, None, board, api_name=False, show_progress="hidden")
    return app


def _setting(kind, least, variable: str):
    """argparse's type for a number the owner sets by flag or environment variable (string defaults go through it
    too): a bad value stops the start-up with one line naming the value, the variable and what fits.

    >>> _setting(int, 1, "SPACE_MAX_SESSIONS")("200")
    200
    >>> _setting(int, 1, "SPACE_MAX_SESSIONS")("1G")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: '1G' is not a whole number >= 1 (the flag, or SPACE_MAX_SESSIONS in the environment)
    """
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < least:
            kind_name = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{_one_line(repr(text), 40)} is not a {kind_name} >= {least} (the flag, "
                                             f"or {variable} in the environment)")
        return value
    return parse


def parse_args(argv=None):
    """The flags (and the owner's SPACE_* variables); a mistake is one `error:` line and exit 2 (common.cli)."""
    parser = UsageParser(prog="python space/app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="a local GGUF to serve (repeatable; label from the file name) instead of the catalog")
    parser.add_argument("--server", action="append", default=[], metavar="LABEL=URL#MODEL",
                        help="an OpenAI-compatible server to serve beside the --model files (repeatable), e.g. "
                             "1B=http://10.0.0.5:8080/v1#llama-1b; its key, if it needs one, in OPENAI_API_KEY")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))
    parser.add_argument("--share", action="store_true",
                        help="also serve through a public Gradio share link (https://*.gradio.live, valid for a week "
                             "while this process runs): the free way to let others chat from Colab or a laptop")
    parser.add_argument("--port", type=_setting(int, 0, "GRADIO_SERVER_PORT"),
                        default=os.environ.get("GRADIO_SERVER_PORT", "7860"))
    parser.add_argument("--n-ctx", type=_setting(int, 256, "SPACE_N_CTX"),
                        default=os.environ.get("SPACE_N_CTX", str(DEFAULT_N_CTX)))
    parser.add_argument("--votes", default=os.environ.get("SPACE_VOTES_PATH", "votes/votes.jsonl"),
                        help="where blind votes are appended (JSON lines)")
    parser.add_argument("--votes-repo", default=os.environ.get("SPACE_VOTES_REPO"),
                        help="a Hub dataset the vote log is pushed to every 10 minutes, and whose votes the "
                             "Leaderboard also rates (optional)")
    parser.add_argument("--report", default=os.environ.get("SPACE_REPORT") or None, metavar="PATH",
                        help="compare's report (compare.json, or the folder scripts/compare.py --out wrote) whose "
                             "headline figures the Leaderboard shows beside the votes (optional; SPACE_REPORT)")
    parser.add_argument("--slots", type=_setting(int, 1, "SPACE_SLOTS"),
                        default=os.environ.get("SPACE_SLOTS", str(DEFAULT_SLOTS)),
                        help="conversations each model answers at once (continuous batching); more wait in line. "
                             "Each slot holds --n-ctx tokens of KV cache (4 x 4096: 512 MiB for 1B, 1.75 GiB for 3B)")
    parser.add_argument("--cache-mb", type=_setting(int, 0, "SPACE_CACHE_MB"),
                        default=os.environ.get("SPACE_CACHE_MB", "512"),
                        help="RAM per model for saved conversation states (least recently used evicted first; 0 "
                             "turns it off): 2 models x 512 MiB fit a 16 GB cpu-basic Space beside a 1B and a 3B")
    parser.add_argument("--max-sessions", type=_setting(int, 1, "SPACE_MAX_SESSIONS"),
                        default=os.environ.get("SPACE_MAX_SESSIONS", "1000"),
                        help="visitors' sessions kept in memory (Gradio keeps ~0.2 MiB of state per session); the "
                             "least recently active is dropped first, and with it its API conversation and its "
                             "compare not yet voted on")
    parser.add_argument("--memory-log-interval", type=_setting(float, 0, "SPACE_MEMORY_LOG_INTERVAL"),
                        default=os.environ.get("SPACE_MEMORY_LOG_INTERVAL", "600"),
                        help="seconds between memory lines in the log (RSS, caches); 0 = none")
    parser.add_argument("--compare-mode", default=os.environ.get("SPACE_COMPARE_MODE", "interleaved"),
                        choices=COMPARE_MODES)
    parser.add_argument("--stream-interval", type=_setting(float, 0, "SPACE_STREAM_INTERVAL"),
                        default=os.environ.get("SPACE_STREAM_INTERVAL", str(STREAM_INTERVAL)),
                        help="seconds between streamed updates (0 = every token; each update costs the CPU that "
                             "generation uses)")
    parser.add_argument("--example", action="append", metavar="TEXT",
                        default=[line for line in os.environ.get("SPACE_EXAMPLES", "").splitlines() if line.strip()],
                        help="a chat example shown before the built-in ones (repeatable; SPACE_EXAMPLES holds one "
                             "per line); the demo passes the questions its model was taught")
    try:
        return parser.parse_args(argv)
    except UsageError as error:
        sys.exit(error.report())


def main(argv=None) -> None:
    args = parse_args(argv)
    # One line per event in the Space's log: our loggers at INFO (rejected requests), the libraries' at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("space").setLevel(logging.INFO)
    limit_malloc_arenas(2)  # before Gradio's threads: without it RSS creeps up with every request (common.machine)
    try:
        catalog = (catalog_from_paths(args.model) if args.model else []) + catalog_from_servers(args.server)
        catalog = catalog or load_catalog()
        print(extra_buffers().describe(), flush=True)  # which llama.cpp path every model here takes, and why
        print(f"llama.cpp {cpu_budget().describe()}", flush=True)  # a container's quota can be below its cores
        report = load_report(args.report) if args.report else None
        engine = Engine(catalog, n_ctx=args.n_ctx, cache_bytes=args.cache_mb * 2**20, slots=args.slots)
    except (UserError, LlamaSetupError) as e:
        sys.exit(f"error: {e}")
    votes_path = Path(args.votes)
    if args.votes_repo:  # pushed to the Hub: one file per process, so a restarted Space never overwrites votes
        votes_path = unique_vote_file(votes_path.parent)
    votes = VoteLog(votes_path, hub_repo_id=args.votes_repo)
    app = build_app(engine, votes, compare_mode=args.compare_mode, stream_interval=args.stream_interval,
                    examples=args.example, report=report)
    # As many requests at once as the engine answers at once (every model's slots): Gradio's queue never holds back
    # what a free slot could serve, and what waits beyond them waits in the engine's line, which says where it is.
    app.queue(default_concurrency_limit=engine.capacity())
    if args.memory_log_interval > 0:
        threading.Thread(target=_log_memory, args=(engine, args.memory_log_interval), daemon=True).start()
    # share None, not False, without --share: Gradio's own default (GRADIO_SHARE, or a link in a hosted notebook).
    app.launch(server_name=args.host, server_port=args.port, show_error=True, share=args.share or None,
               state_session_capacity=args.max_sessions)


def _log_memory(engine: Engine, interval: float) -> None:
    """A memory line every `interval` seconds: what a Space owner watches to size --cache-mb."""
    while True:
        print(engine.memory_line(), flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
