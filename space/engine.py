"""The Space's serving engine: loads catalog models on first use and streams chats and comparisons, one
generation per model at a time. Pure Python with no Gradio import, so tests (and any script) drive it directly:

    from space.catalog import catalog_from_paths
    from space.engine import Engine
    engine = Engine(catalog_from_paths(["outputs/demo/gguf/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf"]))
    for reply in engine.stream_chat(engine.labels[0], "Hello!"):
        print(reply.text, reply.stats())

A `llama_cpp.Llama` holds one context (one KV cache) and is not safe for concurrent use, so every model has
one lock and at most one generation at a time; the Space runs on 2 vCPUs, where two generations at once
would only split the same cores anyway. A request waiting for a busy model says so (Reply.status). The rest of
the Space's logic lives beside it: the catalog (space/catalog.py), sampling and replies (space/replies.py),
history → messages (space/history.py), the prompt's tokens and the saved prompt states (space/prompt.py), votes
(space/votes.py).

Memory: the models, their contexts, and per model at most `cache_bytes` of saved prompt states ($SPACE_CACHE_MB
MiB, default 512). With a 1B and a 3B model that is the GGUFs (about 0.8 and 2.0 GB), their 4,096-token KV caches
(128 and 448 MiB) and at most 2 × 512 MiB of states: a fraction of a cpu-basic Space's 16 GB. memory_line() reports
it for the Space's log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from common.llama import gguf_chat_formatter, open_gguf, open_gguf_from_hub
from common.machine import rss_bytes, usable_cpus
from space.catalog import ModelSpec
from space.history import history_to_messages, prompt_text, trim_history
from space.prompt import ChatModel, StateCache
from space.remote import RemoteModel
from space.replies import Reply, Sampling, UserError, _one_line

__all__ = ["Engine", "COMPARE_MODES", "DEFAULT_N_CTX", "MAX_MESSAGE_CHARS", "CACHE_MB_ENV", "DEFAULT_CACHE_MB",
           "cache_bytes_from_env"]

log = logging.getLogger(__name__)

COMPARE_MODES = ("sequential", "interleaved")
DEFAULT_N_CTX = 4096  # tokens of context per model (space/app.py --n-ctx)
MAX_MESSAGE_CHARS = 8000  # the longest message a user may send
CACHE_MB_ENV = "SPACE_CACHE_MB"  # the owner's bound on saved prompt states, MiB per model
DEFAULT_CACHE_MB = 512
_WAIT_POLL_S = 0.1  # how often a request waiting for a busy model checks its cancel event


def cache_bytes_from_env() -> int:
    """The prompt-state cache bound per model, in bytes, from $SPACE_CACHE_MB (MiB; 0 turns the cache off)."""
    setting = os.environ.get(CACHE_MB_ENV, "").strip() or str(DEFAULT_CACHE_MB)
    if not setting.isdigit():
        raise UserError(f"{CACHE_MB_ENV}={setting!r}: expected a whole number of MiB, e.g. {DEFAULT_CACHE_MB} "
                        "(0 turns the prompt-state cache off)")
    return int(setting) * 2**20


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
        raise UserError(f"{what}: {_one_line(error)}") from error


def _chat_formatter(llm: Llama, label: str) -> Jinja2ChatFormatter:
    """The GGUF's own chat template as a formatter (common.llama.gguf_chat_formatter); UserError without one."""
    formatter = gguf_chat_formatter(llm)
    if formatter is None:
        raise UserError(f"Model '{label}' has no chat template (tokenizer.chat_template) in its GGUF; "
                        "re-export it with export/to_gguf.py")
    return formatter


class Engine:
    """Loads catalog models on first use, keeps them loaded, and streams chats and comparisons."""

    def __init__(self, catalog: list[ModelSpec], n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
                 max_message_chars: int = MAX_MESSAGE_CHARS, cache_bytes: int | None = None,
                 loader: Callable[[ModelSpec], Llama] | None = None, drop_step: int = 4, seed: int | None = None):
        """
        n_threads: llama.cpp threads for generation and prompt processing; default: the CPUs this process may
            use (its affinity: a Space container sees the host's cores in os.cpu_count(), and more threads
            than usable cores make llama.cpp several times slower).
        cache_bytes: per model, the most RAM its saved prompt states may hold, least recently used evicted first
            (0 disables them; default: cache_bytes_from_env()), so that users taking turns on one model each resume
            their conversation instead of re-reading it (see stream_chat).
        loader: builds a Llama from a ModelSpec (tests); default: from_pretrained or model_path.
        drop_step: a conversation too long for the context loses its oldest exchanges this many at a time
            (see trim_history), so that only one turn in `drop_step` re-reads the whole prompt.
        seed: each Llama's sampling seed (default: llama-cpp-python's). Every answer draws its own seed from the
            previous one, so the same requests in the same order get the same answers (scripts/compare.py).
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
        self.cache_bytes = cache_bytes_from_env() if cache_bytes is None else max(0, cache_bytes)
        self.drop_step = max(1, drop_step)
        self.seed = seed
        self._loader = loader or self._load_llama
        self._models: dict[str, ChatModel] = {}
        # Models behind an OpenAI-compatible server (space/remote.py): no lock here, the server queues or batches.
        self._remote = {spec.label: RemoteModel(spec) for spec in catalog if spec.is_remote}
        # threading.Lock, not RLock: Gradio may resume a generator on another worker thread than the one that
        # acquired, and only a plain Lock may be released from any thread. It is not reentrant, hence the
        # care below wherever one caller needs two models (stream_compare).
        self._locks = {label: threading.Lock() for label in self.labels}
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
            raise UserError(f"Unknown model '{_one_line(label, 80)}'; choose one of: {', '.join(self.labels)}")
        return label

    def memory_line(self) -> str:
        """This process's RSS and each loaded model's saved prompt states against the bound, for the Space's log:
        'memory: RSS 3,120 MiB; saved prompt states (at most 512 MiB per model): 1B 96 MiB in 3, 3B 0 MiB in 0'."""
        caches = ", ".join(f"{label} {cache.cache_size / 2**20:,.0f} MiB in {len(cache.cache_state)}"
                           for label, cache in [(label, model.llm.cache) for label, model in list(self._models.items())]
                           if cache is not None)
        rss = rss_bytes()
        return (f"memory: RSS {'unknown' if rss is None else f'{rss / 2**20:,.0f}'} MiB; saved prompt states "
                f"(at most {self.cache_bytes / 2**20:,.0f} MiB per model): {caches or 'none'}")

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
                    # so count_tokens measures exactly the prompt that is generated from.
                    llm.chat_handler = model.formatter.to_chat_handler()
                    if self.cache_bytes > 0:
                        llm.set_cache(StateCache(self.cache_bytes, llm))
                    self._models[label] = model
        return model

    def get(self, label: str) -> Llama:
        """The loaded model for a catalog label (loaded on first use, then kept); UserError for any other label."""
        return self._model(label).llm

    def chat_formatter(self, label: str) -> Jinja2ChatFormatter:
        """The formatter this model's prompts are rendered with (its GGUF's own chat template), loading it if needed."""
        return self._model(label).formatter

    def is_busy(self, label: str) -> bool:
        """Whether a generation holds this model now (others wait for it); a server's model never does."""
        return label not in self._remote and self._locks[self._check_label(label)].locked()

    def _wait(self, label: str, name: str, cancel: threading.Event | None, held: list[str]) -> Iterator[str]:
        """Take the model's lock and add its label to `held` (the caller releases it: _release); while another
        request holds the model, yield why this one waits, at once and then every second. Gives up, holding
        nothing, once `cancel` is set. A server's model has no lock: it is held at once."""
        lock = None if label in self._remote else self._locks[label]
        started, shown = time.perf_counter(), -1
        while not (cancel is not None and cancel.is_set()):
            if lock is None or lock.acquire(timeout=0 if shown < 0 else _WAIT_POLL_S):
                held.append(label)
                return
            if (waited := int(time.perf_counter() - started)) > shown:
                shown = waited
                yield f"{name[:1].upper()}{name[1:]} is answering another request; waiting for it ({waited} s)."

    def _release(self, held: list[str], label: str | None = None) -> None:
        """Release `label`'s lock (default: every lock in `held`, newest first) and drop it from `held`."""
        for held_label in [label] if label else held[::-1]:
            held.remove(held_label)
            if held_label not in self._remote:
                self._locks[held_label].release()

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

    def _generate(self, label: str, model: ChatModel | RemoteModel, messages: list[dict], sampling: Sampling,
                  cancel: threading.Event | None, started: float) -> Iterator[Reply]:
        """Stream one answer, ending with a done Reply (an error one if llama.cpp or the server fails).

        The caller holds the model's lock for as long as this generator runs (a server's model has none).
        """
        if isinstance(model, RemoteModel):
            yield from model.stream(messages, sampling, cancel, started)
            return
        reply = Reply(text="")
        try:
            # No reset between calls: create_completion keeps the KV cache of the longest common prefix of this
            # prompt and the model's previous one, and the prompt continues from the context's own tokens as far
            # as they spell the same text, so a conversation's next turn reads only what is new. The rest is what
            # create_chat_completion does with this formatter (its chat handler), minus the chat-chunk wrapping.
            tokens, rendered = model.prompt_tokens(messages)
            stream = model.llm.create_completion(
                tokens, stream=True, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens, stop=rendered.stop,
                stopping_criteria=rendered.stopping_criteria)
            try:
                for chunk in stream:
                    if cancel is not None and cancel.is_set():
                        reply.finish_reason = "cancelled"
                        break
                    choice = chunk["choices"][0]
                    piece = choice["text"]
                    if piece:
                        reply.add(piece, started)
                        yield replace(reply)  # a snapshot: consumers may keep earlier states
                    if choice["finish_reason"]:
                        reply.finish_reason = choice["finish_reason"]
            finally:
                stream.close()  # a stopped or abandoned answer ends here, before the caller releases the lock
        except Exception as error:
            log.exception("generation with %r failed", label)
            reply.finish_reason, reply.error = "error", f"Generation failed on '{label}': {_one_line(error)}"
        reply.done = True
        yield reply

    def _locked_answer(self, label: str, model: ChatModel | RemoteModel, messages: list[dict], sampling: Sampling,
                       cancel: threading.Event | None, started: float, name: str) -> Iterator[Reply]:
        """One answer under its model's lock (taken here, when iteration starts, not when this is called), with
        a status Reply while another request holds the model."""
        held, waited = [], False
        try:
            for status in self._wait(label, name, cancel, held):
                waited = True
                yield Reply(text="", status=status)
            if held:
                if waited:
                    yield Reply(text="")  # the wait is over: no status while the prompt is read
                yield from self._generate(label, model, messages, sampling, cancel, started)
            else:
                yield Reply(text="", done=True, finish_reason="cancelled")
        finally:
            self._release(held)

    def stream_chat(self, label: str, message: str, history: list | None = None, system_prompt: str = "",
                    sampling: Sampling = Sampling(), cancel: threading.Event | None = None) -> Iterator[Reply]:
        """Stream the model's answer to `message` after `history` (Gradio 6 messages) as growing Replies.

        Mistakes (empty, too long or invalid message, bad sampling numbers, unknown model, ...) come back as one
        final Reply with a one-line `error`, never as exceptions. While another request holds the model, Replies
        with a `status` ("Model 3B is answering another request; waiting for it (3 s).") come first. The model's lock is
        taken when iteration starts and released as soon as the answer ends, `cancel` is set, or the generator is
        closed or garbage-collected (Stop button, client gone); `cancel` also ends the wait for a busy model.

        Time to first token over a conversation: the Llama keeps the KV cache of its previous prompt and
        answer, so a turn reads only what changed since: the new message, and the previous answer only from
        where its text (as Gradio sends it back) stops spelling the sampled tokens (reusable_prefix), instead of
        re-reading the whole conversation every turn. When users take turns on one model, the context holds the
        other user's conversation; the state cache (cache_bytes) then restores this one's, at no cost to a
        single conversation. Once a conversation outgrows the context, its oldest exchanges go and the prompt
        changes right after the system message, so that turn re-reads it all; drop_step > 1 makes that one turn
        in drop_step. The figures: README.md's serve section and docs/benchmarks.md ("Through the Space");
        scripts/bench.py measures the whole conversation.
        """
        started = time.perf_counter()
        try:
            model, messages, sampling = self._prepare(label, message, history, system_prompt, sampling)
        except UserError as error:
            yield _error_reply(str(error))
            return
        yield from self._locked_answer(label, model, messages, sampling, cancel, started, f"model {label}")

    # -------------------------------------------------------------- two answers
    def stream_compare(self, label_a: str, label_b: str, message: str, system_prompt: str = "",
                       sampling: Sampling = Sampling(), mode: str = "sequential",
                       cancel: threading.Event | None = None) -> Iterator[tuple[Reply, Reply]]:
        """The same message (no history) to two models; yields (reply_a, reply_b) states as both stream.

        Both answers share the 2 vCPUs, so they never compute at the same time:
          "sequential"   A to the end, then B (B's reply stays empty meanwhile);
          "interleaved"  one token of A, one of B, advanced in turn in this thread, each model's lock held until
                         its own answer ends.
        The same label twice is always sequential: one Llama has one KV cache, and its lock is not reentrant.
        Each Reply's ttft_s counts from this call, so B's includes the wait for A in sequential mode. A side
        waiting for a model another request holds says so in its status, naming the side ("model A"), never the
        model (blind votes). `cancel` (the Stop button) ends both answers, and frees both models, at once.

        Both modes finish together within measurement noise, so interleaved is the better experience: both
        answers start at once at above reading speed, and in a blind vote neither panel's timing gives its
        model away (sequentially, B sits empty for as long as A takes, which tells 1B from 3B). The figures,
        measured with 1B- and 3B-shaped models on 2 cores: README.md's serve section.
        """
        started = time.perf_counter()
        if mode not in COMPARE_MODES:
            error = f"Unknown compare mode '{_one_line(mode, 40)}'; choose one of: {', '.join(COMPARE_MODES)}"
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

        if mode == "sequential" or label_a == label_b or len(requests) < 2:
            for side, request in requests.items():
                for reply in self._locked_answer(*request, cancel, started, f"model {'AB'[side]}"):
                    replies[side] = reply
                    yield tuple(replies)
            return

        held, streams = [], {}
        try:
            for side in sorted(requests, key=lambda side: self.labels.index(requests[side][0])):  # catalog order:
                # two comparisons of the same pair in opposite order never each hold one model and wait for the other
                for status in self._wait(requests[side][0], f"model {'AB'[side]}", cancel, held):
                    replies[side] = Reply(text="", status=status)
                    yield tuple(replies)
            if len(held) < 2:
                yield tuple(Reply(text="", done=True, finish_reason="cancelled") for _ in replies)
                return
            if any(reply.status for reply in replies):
                replies = [Reply(text=""), Reply(text="")]  # the wait is over: no status while the prompts are read
                yield tuple(replies)
            streams = {side: self._generate(*request, cancel, started) for side, request in requests.items()}
            while streams:
                for side in list(streams):  # one token of each answer in turn
                    reply = next(streams[side], None)
                    if reply is None:
                        del streams[side]
                        self._release(held, requests[side][0])  # its answer is over: others may use the model
                        continue
                    replies[side] = reply
                    yield tuple(replies)
        finally:
            for stream in streams.values():  # closed (stream by stream) before the locks are released
                stream.close()
            self._release(held)
