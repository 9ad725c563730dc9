"""The Space's serving engine: loads catalog models on first use and streams chats and comparisons, one
generation per model at a time. Pure Python with no Gradio import, so tests (and any script) drive it directly:

    from space.catalog import catalog_from_paths
    from space.engine import Engine
    engine = Engine(catalog_from_paths(["outputs/demo/gguf/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf"]))
    for reply in engine.stream_chat(engine.labels[0], "Hello!"):
        print(reply.text, reply.stats())

A `llama_cpp.Llama` holds one context (one KV cache) and is not safe for concurrent use, so every model has
one lock and at most one generation at a time; the Space runs on 2 vCPUs, where two generations at once
would only split the same cores anyway. The rest of the Space's logic lives beside it: the catalog
(space/catalog.py), sampling and replies (space/replies.py), history → messages (space/history.py), votes
(space/votes.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from llama_cpp import Llama, LlamaRAMCache
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from common.llama import gguf_chat_formatter, open_gguf, open_gguf_from_hub
from common.machine import rss_bytes, usable_cpus
from space.catalog import ModelSpec
from space.history import flatten_content, history_to_messages, reusable_prefix, trim_history
from space.remote import RemoteModel
from space.replies import Reply, Sampling, UserError, _one_line

__all__ = ["Engine", "COMPARE_MODES", "DEFAULT_N_CTX", "MAX_MESSAGE_CHARS"]

log = logging.getLogger(__name__)

COMPARE_MODES = ("sequential", "interleaved")
DEFAULT_N_CTX = 4096  # tokens of context per model (space/app.py --n-ctx)
MAX_MESSAGE_CHARS = 8000  # the longest message a user may send


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


class _StateCache(LlamaRAMCache):
    """llama-cpp-python's RAM cache of prompt states, without a logits copy nobody reads, and without
    states that a newer one extends.

    Llama.save_state copies `scores`: up to n_batch × n_vocab float32, 250 MiB for Llama 3's vocabulary,
    that LlamaRAMCache leaves out of its capacity and Llama.load_state copies back, which makes every cache hit
    slow. With logits_all=False (our case) sampling reads llama.cpp's own logits, never these: one row
    is kept, which load_state broadcasts back, and a hit costs a small fraction of what it did (the figures:
    README.md's serve section). Each answer saves its conversation's state, whose tokens extend that
    conversation's previous one; the longer state serves any prompt at least as well, so the shorter is dropped
    rather than left to fill the capacity (32 KiB per token for 1B, 112 KiB for 3B).
    """

    def __setitem__(self, key, value):
        key = tuple(key)
        for older in [k for k in self.cache_state if len(k) <= len(key) and key[: len(k)] == k]:
            del self.cache_state[older]
        value.scores = value.scores[-1:].copy()
        super().__setitem__(key, value)


_CONTROL = b"\xff"  # before a control token's bytes where prompts are matched with the context (never in UTF-8)
_MARK = " \ue000{}\ue001 "  # stands for message i's content while the template renders; spaces show whether it trims


@dataclass
class _Model:
    """A loaded model and the chat formatter its GGUF's template makes."""

    llm: Llama
    formatter: Jinja2ChatFormatter

    def segments(self, messages: list[dict]) -> tuple[list[tuple[bytes, bool]], object]:
        """The prompt as (bytes, special) parts, and the formatter's response (stop strings and tokens).

        The template's own text is tokenized with its markers as special tokens (<|start_header_id|>, <|eot_id|>);
        what users and the system prompt wrote is tokenized as text, so `<|eot_id|>` typed in a message is ten
        characters, not the end of a turn, and nobody can forge a turn of the conversation. The template renders
        a mark in place of each content, and the content goes where its mark landed, trimmed when the template
        trims (Llama 3's does).
        """
        marked = [{**message, "content": _MARK.format(i)} for i, message in enumerate(messages)]
        rendered = self.formatter(messages=marked)
        text, parts, position = rendered.prompt, [], 0
        for i, message in enumerate(messages):
            mark, content = _MARK.format(i), str(message["content"])
            at = text.find(mark, position)
            if at < 0:  # the template trimmed the mark's spaces: it trims contents
                mark, content = mark.strip(), content.strip()
                at = text.find(mark, position)
            if at < 0:
                raise UserError(f"The model's chat template does not show message {i + 1} as written; this Space "
                                "cannot serve it safely (re-export it with export/to_gguf.py)")
            parts += [(text[position:at], True), (content, False)]
            position = at + len(mark)
        parts.append((text[position:], True))
        return [(part.encode("utf-8"), special) for part, special in parts if part], rendered

    def _tokenize(self, parts: list[tuple[bytes, bool]], skip: int = 0) -> list[int]:
        """The parts' tokens, from byte `skip` of their marked form on (see _marked; the template writes
        <|begin_of_text|> itself: no BOS added)."""
        tokens, start = [], 0
        for data, special in parts:
            if start + len(data) > skip:
                rest = data[max(0, skip - start):].replace(_CONTROL, b"")
                tokens += self.llm.tokenize(rest, add_bos=False, special=special)
            start += len(data)
        return tokens

    def _marked(self, parts: list[tuple[bytes, bool]]) -> list[tuple[bytes, bool]]:
        """The parts with _CONTROL before each control token the template's own text holds, as _piece spells them,
        so that prefix reuse matches a control token only with a control token, never with the same characters
        typed by a user (no UTF-8 text holds the byte 0xFF)."""
        return [(b"".join(self._piece(token) for token in self.llm.tokenize(data, add_bos=False, special=True))
                 if special else data, special) for data, special in parts]

    def prompt_tokens(self, messages: list[dict]) -> tuple[list[int], object]:
        """The prompt's tokens, and the formatter's response (stop strings and tokens), continuing from the tokens
        already in the model's context wherever they spell the same text, control tokens as control tokens (see
        reusable_prefix)."""
        parts, rendered = self.segments(messages)
        marked = self._marked(parts)
        context = [int(token) for token in self.llm.input_ids[: self.llm.n_tokens]]  # the tokens in the context
        kept, offset = reusable_prefix(context, self._piece, b"".join(data for data, _ in marked))
        return context[:kept] + self._tokenize(marked, offset), rendered

    def _piece(self, token: int) -> bytes:
        """The token's bytes; a control token's (<|eot_id|>, ...) after _CONTROL."""
        text = self.llm.detokenize([token], special=True)
        if text and not self.llm.detokenize([token], special=False):
            return _CONTROL + text
        return text

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the prompt exactly as it is generated from (see segments)."""
        return len(self._tokenize(self.segments(messages)[0]))


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
                 max_message_chars: int = MAX_MESSAGE_CHARS, cache_bytes: int = 512 * 2**20,
                 loader: Callable[[ModelSpec], Llama] | None = None, drop_step: int = 4, seed: int | None = None):
        """
        n_threads: llama.cpp threads for generation and prompt processing; default: the CPUs this process may
            use (its affinity: a Space container sees the host's cores in os.cpu_count(), and more threads
            than usable cores make llama.cpp several times slower).
        cache_bytes: per model, RAM for saved prompt states (0 disables it) so that users taking turns on
            one model each resume their conversation instead of re-reading it (see stream_chat).
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
        self.cache_bytes = cache_bytes
        self.drop_step = max(1, drop_step)
        self.seed = seed
        self._loader = loader or self._load_llama
        self._models: dict[str, _Model] = {}
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
        """This process's RSS and each loaded model's prompt-state cache against its bound, for the Space's log."""
        caches = ", ".join(f"{label} {model.llm.cache.cache_size / 2**20:.0f} MiB" for label, model in
                           list(self._models.items()) if model.llm.cache is not None) or "none loaded"
        rss = rss_bytes()
        return (f"memory: RSS {'unknown' if rss is None else f'{rss / 2**20:,.0f}'} MiB; prompt-state caches "
                f"(bound {self.cache_bytes / 2**20:.0f} MiB each): {caches}")

    def is_remote(self, label: str) -> bool:
        """Whether this catalog model is served elsewhere, over the OpenAI API (no GGUF loaded here)."""
        return label in self._remote

    def _model(self, label) -> _Model:
        label = self._check_label(label)
        if label in self._remote:
            raise UserError(f"Model '{label}' is served by {self._remote[label].spec.base_url}; it has no GGUF here")
        model = self._models.get(label)
        if model is None:
            with self._loading:  # one load at a time; a second caller finds the model loaded
                model = self._models.get(label)
                if model is None:
                    llm = self._loader(self.catalog[label])
                    model = _Model(llm, _chat_formatter(llm, label))
                    # Render with this same formatter whatever chat_format Llama guessed from the template,
                    # so count_tokens measures exactly the prompt that is generated from.
                    llm.chat_handler = model.formatter.to_chat_handler()
                    if self.cache_bytes > 0:
                        llm.set_cache(_StateCache(self.cache_bytes))
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

    @contextmanager
    def _holding(self, labels: list[str], cancel: threading.Event | None):
        """Hold the models' locks (yields True), or give up when `cancel` is set while waiting (yields False).

        Several locks are taken in catalog order, so two comparisons of the same pair in opposite order
        cannot each hold one model and wait forever for the other.
        """
        locks = [self._locks[label] for label in sorted(set(labels) - set(self._remote), key=self.labels.index)]
        held = []
        try:
            for lock in locks:
                while not lock.acquire(timeout=-1 if cancel is None else 0.1):
                    if cancel.is_set():
                        yield False
                        return
                held.append(lock)
            yield True
        finally:
            for lock in reversed(held):
                lock.release()

    # -------------------------------------------------------------- one answer
    def _prepare(self, label, message, history, system_prompt: str,
                 sampling: Sampling) -> tuple[_Model | RemoteModel, list[dict], Sampling]:
        """Validate a request and build its trimmed messages; UserError for anything the user can fix."""
        text = message if isinstance(message, str) else flatten_content(message)
        if not text.strip():
            raise UserError("Your message is empty; type something to send.")
        if len(text) > self.max_message_chars:
            raise UserError(f"Your message is {len(text):,} characters, over the limit of "
                            f"{self.max_message_chars:,}; shorten it.")
        sampling = sampling.clamped() if isinstance(sampling, Sampling) else Sampling()
        # At most half the context for the answer, so a long answer never pushes out the whole conversation.
        sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, self.n_ctx // 2))
        system = system_prompt.strip() if isinstance(system_prompt, str) else ""
        messages = ([{"role": "system", "content": system}] if system else []) + history_to_messages(history)
        messages.append({"role": "user", "content": text.strip()})
        if self._check_label(label) in self._remote:  # the server applies its template and its context limit
            return self._remote[label], messages, sampling
        with _reported(f"Could not load model '{label}'"):  # a download or load failure
            model = self._model(label)
        with _reported(f"Could not build the prompt for '{label}'"):  # e.g. a template's raise_exception()
            messages = trim_history(messages, model.count_tokens, self.n_ctx, sampling.max_new_tokens,
                                    self.drop_step)
        return model, messages, sampling

    def _generate(self, label: str, model: _Model | RemoteModel, messages: list[dict], sampling: Sampling,
                  cancel: threading.Event | None, started: float) -> Iterator[Reply]:
        """Stream one answer, ending with a done Reply (an error one if llama.cpp or the server fails).

        The caller holds the model's lock for as long as this generator runs (a server's model has none).
        """
        if isinstance(model, RemoteModel):
            yield from model.stream(messages, sampling, cancel, started)
            return
        reply = Reply(text="")
        first_token_at = None
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
                        now = time.perf_counter()
                        if first_token_at is None:
                            first_token_at, reply.ttft_s = now, now - started
                        reply.text += piece
                        reply.tokens += 1
                        if reply.tokens > 1:
                            reply.tokens_per_s = (reply.tokens - 1) / (now - first_token_at)
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

    def _locked_answer(self, label: str, model: _Model, messages: list[dict], sampling: Sampling,
                       cancel: threading.Event | None, started: float) -> Iterator[Reply]:
        """One answer under its model's lock (taken here, when iteration starts, not when this is called)."""
        with self._holding([label], cancel) as held:
            if held:
                yield from self._generate(label, model, messages, sampling, cancel, started)
            else:
                yield Reply(text="", done=True, finish_reason="cancelled")

    def stream_chat(self, label: str, message: str, history: list | None = None, system_prompt: str = "",
                    sampling: Sampling = Sampling(), cancel: threading.Event | None = None) -> Iterator[Reply]:
        """Stream the model's answer to `message` after `history` (Gradio 6 messages) as growing Replies.

        Mistakes (empty or too long message, unknown model, ...) come back as one final Reply with `error`,
        never as exceptions. The model's lock is taken when iteration starts and released as soon as the
        answer ends, `cancel` is set, or the generator is closed or garbage-collected (Stop button, client
        gone); `cancel` also ends the wait for a busy model.

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
        yield from self._locked_answer(label, model, messages, sampling, cancel, started)

    # -------------------------------------------------------------- two answers
    def stream_compare(self, label_a: str, label_b: str, message: str, system_prompt: str = "",
                       sampling: Sampling = Sampling(), mode: str = "sequential",
                       cancel: threading.Event | None = None) -> Iterator[tuple[Reply, Reply]]:
        """The same message (no history) to two models; yields (reply_a, reply_b) states as both stream.

        Both answers share the 2 vCPUs, so they never compute at the same time:
          "sequential"   A to the end, then B (B's reply stays empty meanwhile);
          "interleaved"  one token of A, one of B, advanced in turn in this thread, both models' locks held.
        The same label twice is always sequential: one Llama has one KV cache, and its lock is not reentrant.
        Each Reply's ttft_s counts from this call, so B's includes the wait for A in sequential mode.

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
                for reply in self._locked_answer(*request, cancel, started):
                    replies[side] = reply
                    yield tuple(replies)
            return

        with self._holding([label_a, label_b], cancel) as held:
            if not held:
                yield tuple(Reply(text="", done=True, finish_reason="cancelled") for _ in replies)
                return
            streams = {side: self._generate(*request, cancel, started) for side, request in requests.items()}
            try:
                while streams:
                    for side in list(streams):  # one token of each answer in turn
                        reply = next(streams[side], None)
                        if reply is None:
                            del streams[side]
                            continue
                        replies[side] = reply
                        yield tuple(replies)
            finally:
                for stream in streams.values():  # closed (stream by stream) before the locks are released
                    stream.close()


