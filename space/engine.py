"""The Space's serving engine: loads catalog models on first use and streams chats and comparisons, many at once:
each model decodes up to `slots` conversations together (space/batching.py: continuous batching in one llama.cpp
context). Pure Python with no Gradio import, so tests (and any script) drive it directly:

    from space.catalog import catalog_from_paths
    from space.engine import Engine
    engine = Engine(catalog_from_paths(["outputs/demo/gguf/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf"]))
    for reply in engine.stream_chat(engine.labels[0], "Hello!"):
        print(reply.text, reply.stats())

A request beyond the model's slots waits in its queue, and its Replies say so (Reply.status, with its place in
line). The rest of the Space's logic lives beside it: the catalog (space/catalog.py), sampling and replies
(space/replies.py), history → messages (space/history.py), the prompt's tokens (space/prompt.py), votes
(space/votes.py).

Memory, per model: the GGUF, its Llama's own context (`n_ctx` tokens, used by compare's measurements through get()),
the batched context (`slots` × `n_ctx` tokens: 4 × 4,096 are 512 MiB for 1B and 1.75 GiB for 3B) and at most
`cache_bytes` of saved conversation states (default 512 MiB; the Space's owner sets it as --cache-mb or
SPACE_CACHE_MB, read by space/config.py, never here). memory_line() reports it for the Space's log.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from common.llama_runtime import gguf_chat_formatter, open_gguf, open_gguf_from_hub
from common.machine import rss_bytes, usable_cpus
from common.cli import one_line
from space.catalog import ModelSpec
from space.history import history_to_messages, prompt_text, trim_history
from space.batching import DEFAULT_PREFILL_CHUNK, DEFAULT_SLOTS, BatchedDecoder, Scheduler
from space.jobs import Done, Piece, Queued, Started
from space.prompt import ChatModel
from space.remote import RemoteModel
from space.replies import Reply, Sampling, UserError

__all__ = ["Engine", "COMPARE_MODES", "DEFAULT_N_CTX", "MAX_MESSAGE_CHARS", "DEFAULT_CACHE_MB", "DEFAULT_SLOTS"]

log = logging.getLogger(__name__)

COMPARE_MODES = ("sequential", "interleaved")
DEFAULT_N_CTX = 4096  # tokens of context per model (space/app.py --n-ctx)
MAX_MESSAGE_CHARS = 8000  # the longest message a user may send
DEFAULT_CACHE_MB = 512  # the bound on saved conversation states, MiB per model (space/app.py --cache-mb)
MAX_CONVERSATIONS = 1000  # conversations whose sampled tokens are kept (a session and a model each)


def _error_reply(message: str) -> Reply:
    return Reply(text="", done=True, finish_reason="error", error=message)


@contextmanager
def _reported(what: str):
    """Unexpected failures inside as a one-line UserError starting with `what`; the traceback goes to the log."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        log.exception(what)
        raise UserError(f"{what}: {one_line(error)}") from error


def _chat_formatter(llm: Llama, label: str) -> Jinja2ChatFormatter:
    """The GGUF's own chat template as a formatter (common.llama_runtime.gguf_chat_formatter); UserError without one."""
    formatter = gguf_chat_formatter(llm)
    if formatter is None:
        raise UserError(f"Model '{label}' has no chat template (tokenizer.chat_template) in its GGUF; "
                        "re-export it with export/to_gguf.py")
    return formatter


class _Either:
    """Set when any of its events is (the user's Stop, or the compare's consumer gone)."""

    def __init__(self, *events: threading.Event | None):
        self.events = [event for event in events if event is not None]

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)


class Engine:
    """Loads catalog models on first use, keeps them loaded, and streams chats and comparisons."""

    def __init__(self, catalog: list[ModelSpec], n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
                 max_message_chars: int = MAX_MESSAGE_CHARS, cache_bytes: int = DEFAULT_CACHE_MB * 2**20,
                 loader: Callable[[ModelSpec], Llama] | None = None, drop_step: int = 4, seed: int | None = None,
                 slots: int = DEFAULT_SLOTS, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_queue: int = 64):
        """
        n_ctx: tokens of context per conversation (each slot's).
        n_threads: llama.cpp threads for generation and prompt processing; default: the CPUs this process may
            use (its affinity: a Space container sees the host's cores in os.cpu_count(), and more threads
            than usable cores make llama.cpp several times slower).
        cache_bytes: per model, the most RAM its saved conversation states may hold, least recently used evicted
            first (0 disables them): a conversation whose slot another one took resumes from its state instead of
            re-reading its prompt. The engine reads no environment: the Space passes its owner's --cache-mb.
        loader: builds a Llama from a ModelSpec (tests); default: from_pretrained or model_path.
        drop_step: a conversation too long for the context loses its oldest exchanges this many at a time
            (see trim_history), so that only one turn in `drop_step` re-reads the whole prompt.
        seed: the first sampling seed; every answer draws its own from one generator per model, so the same
            requests in the same order get the same answers (scripts/compare.py).
        slots: conversations each model decodes together (space/batching.py); more wait in line.
        prefill_chunk: prompt tokens read per decoding step, so that a long prompt never stalls the answers
            being written.
        max_queue: requests that may wait for a model's slot; more are answered "try again" at once.
        """
        if not catalog:
            raise UserError("the model catalog is empty; add a model to space/models.yaml or pass --model PATH")
        if len({spec.label for spec in catalog}) < len(catalog):
            raise UserError("the model catalog repeats a label; labels must be unique")
        self.catalog = {spec.label: spec for spec in catalog}
        self.labels = list(self.catalog)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or usable_cpus()
        self.max_message_chars = max_message_chars
        self.cache_bytes = max(0, cache_bytes)
        self.drop_step = max(1, drop_step)
        self.seed = seed
        self.slots, self.prefill_chunk, self.max_queue = max(1, slots), max(1, prefill_chunk), max(0, max_queue)
        self._loader = loader or self._load_llama
        self._models: dict[str, ChatModel] = {}
        self._decoders: dict[str, BatchedDecoder] = {}
        self._seeds: dict[str, random.Random] = {}
        # One thread decodes for every model (space/batching.py): the models never split the CPUs between them.
        self._scheduler = Scheduler()
        # The tokens each conversation's turns produced, by (session, label): its next turn continues from them.
        self._conversations: OrderedDict[tuple, tuple[array, dict[int, bytes]]] = OrderedDict()
        self._conversations_lock = threading.Lock()
        # Models behind an OpenAI-compatible server (space/remote.py): the server queues or batches.
        self._remote = {spec.label: RemoteModel(spec) for spec in catalog if spec.is_remote}
        self._loading = threading.Lock()

    # -------------------------------------------------------------- models
    def _load_llama(self, spec: ModelSpec) -> Llama:
        settings = dict(n_ctx=self.n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads)
        if self.seed is not None:
            settings["seed"] = self.seed
        if spec.path:
            return open_gguf(spec.path, **settings)
        return open_gguf_from_hub(spec.repo_id, spec.filename, **settings)  # into the huggingface_hub cache

    def _check_label(self, label) -> str:
        if not isinstance(label, str) or label not in self.catalog:
            raise UserError(f"Unknown model '{one_line(label, 80)}'; choose one of: {', '.join(self.labels)}")
        return label

    def capacity(self) -> int:
        """Answers this engine writes at once: every local model's slots, and a few per server's model."""
        return sum(4 if label in self._remote else self.slots for label in self.labels)

    def memory_line(self) -> str:
        """This process's RSS, each loaded model's saved conversation states against the bound and its slots, for the
        Space's log: 'memory: RSS 3,120 MiB; saved prompt states (at most 512 MiB per model): 1B 96 MiB in 3, 3B 0 MiB
        in 0; slots: 1B 2/4 busy, 0 waiting, 3B 0/4 busy, 0 waiting'."""
        decoders = list(self._decoders.items())
        caches = ", ".join(f"{label} {decoder.states_bytes / 2**20:,.0f} MiB in {len(decoder.states)}"
                           for label, decoder in decoders)
        slots = ", ".join(f"{label} {decoder.busy_slots()}/{decoder.n_slots} busy, {len(decoder.waiting)} waiting"
                          for label, decoder in decoders)
        rss = rss_bytes()
        return (f"memory: RSS {'unknown' if rss is None else f'{rss / 2**20:,.0f}'} MiB; saved prompt states "
                f"(at most {self.cache_bytes / 2**20:,.0f} MiB per model): {caches or 'none'}"
                + (f"; slots: {slots}" if slots else ""))

    def is_remote(self, label: str) -> bool:
        """Whether this catalog model is served elsewhere, over the OpenAI API (no GGUF loaded here)."""
        return label in self._remote

    def _model(self, label) -> ChatModel:
        label = self._check_label(label)
        if label in self._remote:
            raise UserError(f"Model '{label}' is served by {self._remote[label].spec.base_url}; it has no GGUF here")
        model = self._models.get(label)
        if model is None:
            with self._loading:  # one load at a time; a second caller finds the model loaded
                model = self._models.get(label)
                if model is None:
                    llm = self._loader(self.catalog[label])
                    model = ChatModel(llm, _chat_formatter(llm, label))
                    # Render with this same formatter whatever chat_format Llama guessed from the template,
                    # so that get()'s create_chat_completion (compare's measurements) reads the same prompts.
                    llm.chat_handler = model.formatter.to_chat_handler()
                    self._decoders[label] = BatchedDecoder(
                        llm, slots=self.slots, n_ctx=self.n_ctx, n_threads=self.n_threads,
                        prefill_chunk=self.prefill_chunk, cache_bytes=self.cache_bytes, max_queue=self.max_queue,
                        scheduler=self._scheduler, label=label)
                    self._seeds[label] = random.Random(self.seed)
                    self._models[label] = model
        return model

    def get(self, label: str) -> Llama:
        """The loaded model for a catalog label (loaded on first use, then kept); UserError for any other label.
        Its own context is not the one the Space serves from (decoder()): it is free for measurements."""
        return self._model(label).llm

    def decoder(self, label: str) -> BatchedDecoder:
        """The model's batched decoder (its slots, queue and saved states), loading the model if needed."""
        self._model(label)
        return self._decoders[label]

    def chat_formatter(self, label: str) -> Jinja2ChatFormatter:
        """The formatter this model's prompts are rendered with (its GGUF's own chat template), loading it if needed."""
        return self._model(label).formatter

    def is_busy(self, label: str) -> bool:
        """Whether the model is writing an answer or has requests waiting; a server's model never says so."""
        label = self._check_label(label)
        decoder = self._decoders.get(label)
        return decoder is not None and decoder.has_work()

    # -------------------------------------------------------------- one answer
    def _prepare(self, label, message, history, system_prompt,
                 sampling: Sampling | None) -> tuple[ChatModel | RemoteModel, list[dict], Sampling]:
        """Validate a request and build its trimmed messages; UserError for anything the user can fix."""
        text = prompt_text(message, "message")
        if not text:
            raise UserError("Your message is empty; type something to send.")
        if len(text) > self.max_message_chars:
            raise UserError(f"Your message is {len(text):,} characters, over the limit of "
                            f"{self.max_message_chars:,}; shorten it.")
        system = prompt_text(system_prompt, "system prompt")
        sampling = (sampling if isinstance(sampling, Sampling) else Sampling()).clamped()
        # At most half the context for the answer, so a long answer never pushes out the whole conversation.
        sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, self.n_ctx // 2))
        messages = ([{"role": "system", "content": system}] if system else []) + history_to_messages(history)
        messages.append({"role": "user", "content": text})
        if self._check_label(label) in self._remote:  # the server applies its template and its context limit
            return self._remote[label], messages, sampling
        with _reported(f"Could not load model '{label}'"):  # a download or load failure
            model = self._model(label)
        with _reported(f"Could not build the prompt for '{label}'"):  # e.g. a template's raise_exception()
            messages = trim_history(messages, model.count_tokens, self.n_ctx, sampling.max_new_tokens,
                                    self.drop_step)
        return model, messages, sampling

    def _known(self, key: tuple | None) -> list[list[int]]:
        """Token sequences a prompt may continue from: the conversation's own, then the model's slots and states."""
        with self._conversations_lock:
            own = self._conversations.get(key) if key is not None and key[0] is not None else None
            if own is not None:
                self._conversations.move_to_end(key)
        return ([own] if own else []) + self._decoders[key[1]].known_tokens()

    def _remember(self, key: tuple | None, tokens: list[int], streamed: dict[int, bytes]) -> None:
        if key is None or key[0] is None:
            return
        with self._conversations_lock:
            # 4 bytes a token (a list of Python ints takes ~36): 1,000 full 4,096-token conversations are 16 MiB.
            self._conversations[key] = (array("i", tokens), streamed)
            self._conversations.move_to_end(key)
            while len(self._conversations) > MAX_CONVERSATIONS:
                self._conversations.popitem(last=False)

    def _generate(self, label: str, model: ChatModel | RemoteModel, messages: list[dict], sampling: Sampling,
                  cancel, started: float, name: str, session: str | None = None) -> Iterator[Reply]:
        """Stream one answer, ending with a done Reply (an error one if llama.cpp or the server fails)."""
        if isinstance(model, RemoteModel):
            yield from model.stream(messages, sampling, cancel, started)
            return
        reply, key = Reply(text=""), (session, label)
        decoder = self._decoders[label]
        try:
            # The prompt continues from the tokens the conversation's turns produced (its own record, or a slot or
            # state that holds them) wherever they spell the same text: the sampled tokens are kept, and the slot
            # holding them reads only what is new (space/prompt.py, space/batching.py).
            tokens, rendered, streamed = model.continue_from(messages, self._known(key))
            job = decoder.submit(tokens, sampling, self._seeds[label].getrandbits(32),
                                 stop_tokens=model.stop_tokens(), stop_strings=model.stop_strings(rendered),
                                 cancel=cancel)
            events = job.events(self._scheduler)
            try:
                for event in events:
                    if isinstance(event, Piece):
                        reply.add(event.text, started, event.tokens)
                        yield replace(reply)  # a snapshot: consumers may keep earlier states
                    elif isinstance(event, Queued):
                        reply.status = (f"{name[:1].upper()}{name[1:]} is answering {decoder.n_slots} other "
                                        f"conversation{'s' if decoder.n_slots != 1 else ''}; you are number "
                                        f"{event.position} in line.")
                        yield replace(reply)
                    elif isinstance(event, Started):
                        waited, reply.status = reply.status, None
                        reply.prompt_tokens, reply.prompt_read = len(tokens), event.read
                        if waited:
                            yield replace(reply)  # the wait is over: no status while the prompt is read
                    elif isinstance(event, Done):
                        reply.finish_reason, reply.error = event.finish_reason, event.error
            finally:
                events.close()  # a stopped or abandoned answer frees its slot at the next step
            reply.token_times = tuple(job.sampled_at)
            if reply.finish_reason in ("stop", "length"):
                streamed.update({len(tokens) + position: data for position, token in enumerate(job.generated)
                                 if (data := job.streamed.get(position, model.streamed_as(token))) is not None})
                self._remember(key, tokens + job.generated, streamed)
        except Exception as error:
            log.exception("generation with %r failed", label)
            reply.finish_reason, reply.error = "error", f"Generation failed on '{label}': {one_line(error)}"
        if reply.error and not reply.error.startswith(("Generation failed", "Model ")):
            reply.error = f"Generation failed on '{label}': {reply.error}"
        reply.done, reply.status = True, None
        yield reply

    def stream_chat(self, label: str, message: str, history: list | None = None, system_prompt: str = "",
                    sampling: Sampling = Sampling(), cancel: threading.Event | None = None,
                    session: str | None = None) -> Iterator[Reply]:
        """Stream the model's answer to `message` after `history` (Gradio 6 messages) as growing Replies.

        Mistakes (empty, too long or invalid message, bad sampling numbers, unknown model, ...) come back as one
        final Reply with a one-line `error`, never as exceptions. While the model's slots are all taken, Replies
        with a `status` ("Model 3B is answering 4 other conversations; you are number 2 in line.") come first. The
        answer ends, and frees its slot, as soon as it is done, `cancel` is set, or the generator is closed or
        garbage-collected (Stop button, client gone).

        Time to first token over a conversation: the tokens of each turn (the prompt and the sampled answer) are
        kept by `session` (a Gradio session; without one, any slot or saved state that holds them serves), and
        the slot that holds them in its KV cache reads only the new message; the answer's text, as Gradio sends
        it back, continues from the sampled tokens as far as it spells them (reusable_prefix). Reply.prompt_read
        says how many prompt tokens a turn read. Once a conversation outgrows the context, its oldest exchanges
        go and that turn re-reads it all; drop_step > 1 makes that one turn in drop_step.
        """
        started = time.perf_counter()
        try:
            model, messages, sampling = self._prepare(label, message, history, system_prompt, sampling)
        except UserError as error:
            yield _error_reply(str(error))
            return
        yield from self._generate(label, model, messages, sampling, cancel, started, f"model {label}", session)

    # -------------------------------------------------------------- two answers
    def stream_compare(self, label_a: str, label_b: str, message: str, system_prompt: str = "",
                       sampling: Sampling = Sampling(), mode: str = "interleaved",
                       cancel: threading.Event | None = None) -> Iterator[tuple[Reply, Reply]]:
        """The same message (no history) to two models; yields (reply_a, reply_b) states as both stream.

          "interleaved"  both answers are written at once: the scheduler decodes a token of each per step, so
                         they advance together and neither panel's pace gives its model away in a blind vote;
          "sequential"   A to the end, then B (B's reply stays empty meanwhile).
        Each Reply's ttft_s counts from this call. A side waiting for a slot says so in its status, naming the side
        ("model A"), never the model (blind votes). `cancel` (the Stop button) ends both answers, and frees both
        slots, at once; so does closing this generator.
        """
        started = time.perf_counter()
        if mode not in COMPARE_MODES:
            error = f"Unknown compare mode '{one_line(mode, 40)}'; choose one of: {', '.join(COMPARE_MODES)}"
            yield _error_reply(error), _error_reply(error)
            return
        replies, requests = [], {}  # requests: side (0 = A, 1 = B) → its label, model, messages, sampling
        for side, label in enumerate((label_a, label_b)):
            try:
                requests[side] = (label, *self._prepare(label, message, None, system_prompt, sampling))
                replies.append(Reply(text=""))
            except UserError as error:
                replies.append(_error_reply(str(error)))
        yield tuple(replies)

        gone = threading.Event()  # this generator closed: both answers end
        either = _Either(cancel, gone)
        if mode == "sequential":
            for side, request in requests.items():
                stream = self._generate(*request, either, started, f"model {'AB'[side]}")
                try:
                    for reply in stream:
                        replies[side] = reply
                        yield tuple(replies)
                finally:
                    stream.close()
            return

        # Each side's stream runs in its own thread (a server's answer blocks on the network; a local one on its
        # decoder) and hands its Replies to this one.
        updates: queue.SimpleQueue = queue.SimpleQueue()

        def pump(side: int, request: tuple) -> None:
            try:
                for reply in self._generate(*request, either, started, f"model {'AB'[side]}"):
                    updates.put((side, reply))
            finally:
                updates.put((side, None))

        threads = [threading.Thread(target=pump, args=(side, request), daemon=True, name=f"compare-{'AB'[side]}")
                   for side, request in requests.items()]
        for thread in threads:
            thread.start()
        try:
            running = len(threads)
            while running:
                side, reply = updates.get()
                if reply is None:
                    running -= 1
                    continue
                replies[side] = reply
                yield tuple(replies)
        finally:
            gone.set()
            for thread in threads:  # both answers have ended (their slots are free) when this returns
                thread.join(10)
