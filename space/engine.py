"""The Space's serving engine: model catalog, history → prompt, streaming with per-model locks, vote log.

Pure Python with no Gradio import, so tests (and any script) drive it directly:

    from space.engine import Engine, catalog_from_paths
    engine = Engine(catalog_from_paths(["outputs/demo/gguf/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf"]))
    for reply in engine.stream_chat(engine.labels[0], "Hello!"):
        print(reply.text, reply.stats())

A `llama_cpp.Llama` holds one context (one KV cache) and is not safe for concurrent use, so every model has
one lock and at most one generation at a time; the Space runs on 2 vCPUs, where two generations at once
would only split the same cores anyway.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import yaml
from llama_cpp import Llama, LlamaRAMCache
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from common.llama import gguf_chat_formatter, open_gguf, open_gguf_from_hub
from common.machine import usable_cpus

log = logging.getLogger(__name__)

DEFAULT_CATALOG = Path(__file__).with_name("models.yaml")
CATALOG_ENV = "SPACE_MODELS"
COMPARE_MODES = ("sequential", "interleaved")
DEFAULT_N_CTX = 4096  # the context each model gets (space/app.py --n-ctx); an answer may use at most half
MAX_MESSAGE_CHARS = 8000  # the longest message a user may send; longer ones are refused with a message


class UserError(ValueError):
    """A one-line message to show the user as is (what is wrong, with which value, and the fix)."""


def _one_line(text: str, limit: int = 300) -> str:
    """Text collapsed onto one line and cut to `limit` characters (for messages shown in the UI)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class ModelSpec:
    """One model the Space may serve: a Hub repo + filename glob, or a local GGUF path."""

    label: str
    repo_id: str | None = None
    filename: str | None = None  # glob matching exactly one file in repo_id, e.g. "*Q4_K_M.gguf"
    path: str | None = None


_SPEC_KEYS = ("label", "repo_id", "filename", "path")


def _spec_problems(entry, position: int) -> list[str]:
    """What is wrong with one catalog entry (empty when it is valid)."""
    if not isinstance(entry, Mapping):
        return [f"entry {position}: expected a mapping like {{label, repo_id, filename}} or {{label, path}}, "
                f"got {_one_line(repr(entry), 80)}"]
    name = f"entry {position} ({entry['label']!r})" if isinstance(entry.get("label"), str) else f"entry {position}"
    problems = []
    unknown = sorted(str(key) for key in entry if key not in _SPEC_KEYS)
    if unknown:
        problems.append(f"{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_SPEC_KEYS)}")
    for key in _SPEC_KEYS:
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append(f"{name}: {key} must be a non-empty string")
    if not entry.get("label"):
        problems.append(f"{name}: needs a label")
    has_hub = bool(entry.get("repo_id") or entry.get("filename"))
    if has_hub == bool(entry.get("path")):
        problems.append(f"{name}: give either repo_id + filename (a Hub GGUF) or path (a local GGUF), not both")
    elif has_hub and not (entry.get("repo_id") and entry.get("filename")):
        problems.append(f"{name}: repo_id and filename go together (e.g. filename: \"*Q4_K_M.gguf\")")
    return problems


def _catalog_from_entries(entries, source: str) -> list[ModelSpec]:
    """Validated ModelSpecs; every problem of every entry reported at once in one UserError."""
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: expected a non-empty list of models, got {_one_line(repr(entries), 80)}")
    problems = [problem for position, entry in enumerate(entries, 1) for problem in _spec_problems(entry, position)]
    labels = [entry.get("label") for entry in entries if isinstance(entry, Mapping)]
    duplicates = sorted({label for label in labels if isinstance(label, str) and labels.count(label) > 1})
    if duplicates:
        problems.append(f"duplicate label(s) {', '.join(map(repr, duplicates))}; labels must be unique")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))
    return [ModelSpec(**entry) for entry in entries]


def load_catalog(path: Path = DEFAULT_CATALOG, env: Mapping[str, str] = os.environ) -> list[ModelSpec]:
    """The models to serve: $SPACE_MODELS (a JSON list, set by scripts/deploy_space.py) or else the YAML file.

    Both hold the same entries: `{"label", "repo_id", "filename"}` or `{"label", "path"}`.
    """
    if env.get(CATALOG_ENV, "").strip():
        try:
            entries = json.loads(env[CATALOG_ENV])
        except json.JSONDecodeError as error:
            raise UserError(f"{CATALOG_ENV}: not valid JSON ({error}); expected a list like "
                            '[{"label": "1B", "repo_id": "user/repo", "filename": "*Q4_K_M.gguf"}]') from error
        return _catalog_from_entries(entries, CATALOG_ENV)
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path}: cannot read the model catalog ({_one_line(error)})") from error
    if not isinstance(document, Mapping) or "models" not in document:
        raise UserError(f"{path}: expected a top-level `models:` list")
    return _catalog_from_entries(document["models"], str(path))


def catalog_from_paths(paths: Sequence[str]) -> list[ModelSpec]:
    """A catalog of local GGUF files (`app.py --model PATH`, repeatable), labelled by file name.

    >>> catalog_from_paths([__file__, __file__])[1].label
    'engine (2)'
    """
    if not paths:
        raise UserError("--model: give at least one GGUF file")
    missing = [path for path in paths if not Path(path).expanduser().is_file()]
    if missing:
        raise UserError(f"--model: no such file: {', '.join(missing)}; give the path of a .gguf file "
                        "(export/to_gguf.py writes them)")
    specs: list[ModelSpec] = []
    for path in paths:
        stem, label, copy = Path(path).stem, Path(path).stem, 1
        while any(spec.label == label for spec in specs):
            copy += 1
            label = f"{stem} ({copy})"
        specs.append(ModelSpec(label=label, path=str(Path(path).expanduser())))
    return specs


# ---------------------------------------------------------------------- sampling and replies
def _clamp(value, low: float, high: float, default: float) -> float:
    """`value` forced into [low, high]; anything that is not a real number (None, "abc", NaN) gives `default`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return default
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf if value > 0 else -math.inf
    return default if math.isnan(number) else min(max(number, low), high)


@dataclass(frozen=True)
class Sampling:
    """Generation settings, as the UI's sliders (or any API caller) send them."""

    temperature: float = 0.7  # 0 = greedy (deterministic)
    top_p: float = 0.9
    max_new_tokens: int = 256

    def clamped(self) -> Sampling:
        """Safe values whatever was sent: out-of-range numbers clamped, non-numbers replaced by the defaults.

        >>> Sampling(temperature=-5, top_p=7, max_new_tokens=10**9).clamped()
        Sampling(temperature=0.0, top_p=1.0, max_new_tokens=1024)
        >>> Sampling(temperature=float("nan"), top_p="high", max_new_tokens=None).clamped()
        Sampling(temperature=0.7, top_p=0.9, max_new_tokens=256)
        """
        defaults = Sampling()
        return Sampling(
            temperature=_clamp(self.temperature, 0.0, 2.0, defaults.temperature),
            top_p=_clamp(self.top_p, 0.05, 1.0, defaults.top_p),
            max_new_tokens=int(_clamp(self.max_new_tokens, 16, 1024, defaults.max_new_tokens)),
        )


@dataclass
class Reply:
    """One streamed state of an answer: the text so far and live statistics."""

    text: str
    done: bool = False
    ttft_s: float | None = None  # time to first token from the request: loading and waiting for the model included
    # Streamed pieces: one per token, except that llama-cpp-python holds back bytes that are not yet valid
    # UTF-8 (a character split over tokens; random weights can stall it until the end) and sends them as one.
    tokens: int = 0
    tokens_per_s: float | None = None  # decoding speed after the first token
    finish_reason: str | None = None  # "stop" (end of turn), "length", "cancelled", "error"
    error: str | None = None  # a message for the user instead of an answer

    def stats(self) -> str:
        """One line for the UI, empty until the first token.

        >>> Reply("Hi there", ttft_s=0.123, tokens=57, tokens_per_s=34.49).stats()
        'TTFT 0.12 s · 34.5 tok/s · 57 tokens'
        >>> Reply("Hi", ttft_s=0.5, tokens=1).stats()
        'TTFT 0.50 s · 1 token'
        >>> Reply("").stats()
        ''
        """
        if self.ttft_s is None:
            return ""
        parts = [f"TTFT {self.ttft_s:.2f} s"]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        parts.append(f"{self.tokens} token{'s' if self.tokens != 1 else ''}")
        return " · ".join(parts)


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


def throttled(updates: Iterable, interval: float, clock: Callable[[], float] = time.perf_counter) -> Iterator:
    """The first update at once, then at most one every `interval` seconds (the newest), and always the last.

    Every update is diffed, serialised and sent by Gradio, and re-rendered (Markdown) by each browser watching.
    Ten updates a second still read as smooth streaming and send a quarter as many updates as one per token for
    a 1B model at 30-35 tokens/s (32 instead of 127 for 128 tokens). On the server's side the difference is
    within the noise of a 2-core machine (scripts/bench.py: both 90% of raw llama-cpp-python's tokens/s, run to
    run ±10%); the gain is the browsers' and the network's. The first token is never held back.

    >>> ticks = iter([0.0, 0.01, 0.02, 0.15, 0.16, 0.17])
    >>> list(throttled(range(6), 0.1, clock=lambda: next(ticks)))
    [0, 3, 5]
    >>> list(throttled(range(3), 0))
    [0, 1, 2]
    """
    last_sent, pending, waiting = None, None, False
    try:
        for update in updates:
            now = clock()
            if last_sent is None or now - last_sent >= interval:
                yield update
                last_sent, waiting = now, False
            else:
                pending, waiting = update, True
        if waiting:
            yield pending
    finally:
        close = getattr(updates, "close", None)
        if close is not None:
            close()  # a closed consumer (Stop, client gone) ends the generation and frees the model's lock now


# ---------------------------------------------------------------------- Gradio history → messages
def _field(item, name: str):
    """item[name] for dicts, item.name for objects (gr.ChatMessage, Gradio's pydantic message models)."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def flatten_content(content) -> str:
    """The plain text of a Gradio 6 message's content; file, image and component blocks are skipped.

    >>> flatten_content("Hello")
    'Hello'
    >>> flatten_content([{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}])
    'Hello\\nworld'
    >>> flatten_content([{"type": "file", "file": {"path": "/tmp/cat.png"}}, {"type": "text", "text": "What is it?"}])
    'What is it?'
    >>> flatten_content({"type": "text", "text": "one block"})
    'one block'
    >>> flatten_content({"path": "/tmp/cat.png"})
    ''
    >>> flatten_content(None)
    ''
    """
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "\n".join(text for text in map(flatten_content, content) if text)
    text = _field(content, "text")
    if _field(content, "type") in ("text", None) and isinstance(text, str):
        return text
    return ""


def history_to_messages(history) -> list[dict]:
    """Gradio 6 ChatInterface history → `[{"role", "content": str}]` for the chat template.

    Keeps user and assistant messages with text; drops empty ones, other roles, and Gradio "thought"
    messages (a `metadata.title`: tool or status panels the app shows, not part of the answer).

    >>> history_to_messages([
    ...     {"role": "user", "content": [{"type": "text", "text": "Hi"}], "metadata": None},
    ...     {"role": "assistant", "content": "Hello!", "metadata": {"title": "⏱ stats"}},
    ...     {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
    ...     {"role": "system", "content": "ignored"},
    ...     {"role": "user", "content": [{"type": "file", "file": {"path": "a.png"}}]},
    ... ])
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello! How can I help?'}]
    """
    messages = []
    for item in history if isinstance(history, (list, tuple)) else []:
        role, metadata = _field(item, "role"), _field(item, "metadata")
        if role not in ("user", "assistant") or (metadata and _field(metadata, "title")):
            continue
        text = flatten_content(_field(item, "content")).strip()
        if text:
            messages.append({"role": role, "content": text})
    return messages


def trim_history(messages: list[dict], count_tokens: Callable[[list[dict]], int], n_ctx: int,
                 max_new_tokens: int, drop_step: int = 1) -> list[dict]:
    """Drop the oldest exchanges until the prompt and the answer fit in the context.

    `messages` is `[system?] + history + [new user message]`. Whole exchanges go (a user message with the
    answers after it), oldest first, until `count_tokens(messages) + max_new_tokens <= n_ctx`; the system
    message and the new message always stay. With `drop_step` > 1, exchanges go by multiples of that many
    (as many as needed, rounded up), so that the next turns of a full conversation keep the same start.

    >>> chat = [{"role": "system", "content": "Be brief."}] + [
    ...     {"role": role, "content": f"{role} {turn}"} for turn in range(3) for role in ("user", "assistant")
    ... ] + [{"role": "user", "content": "new"}]
    >>> [m["content"] for m in trim_history(chat, len, n_ctx=6, max_new_tokens=1)]
    ['Be brief.', 'user 2', 'assistant 2', 'new']
    >>> [m["content"] for m in trim_history(chat, len, n_ctx=8, max_new_tokens=1, drop_step=2)]
    ['Be brief.', 'user 2', 'assistant 2', 'new']
    """
    start = 1 if messages and messages[0]["role"] == "system" else 0
    head, history, new = messages[:start], messages[start:-1], messages[-1:]
    budget = n_ctx - max_new_tokens

    def fits(first_kept: int) -> bool:
        return count_tokens(head + history[first_kept:] + new) <= budget

    # Where the kept history may begin: its start, at a user message, or nowhere (all dropped).
    starts = [0] + [i for i, message in enumerate(history) if i > 0 and message["role"] == "user"] + [len(history)]
    needed = count_tokens(head + new)
    if needed > budget:
        raise UserError(f"Your message is too long for this model's context ({needed} tokens, limit {budget}); "
                        "shorten it.")
    # Fewer messages never need more tokens, so binary-search the first start that fits: a handful of
    # renders even for a long (or hostile) history.
    low, high = 0, len(starts) - 1
    while low < high:
        middle = (low + high) // 2
        if fits(starts[middle]):
            high = middle
        else:
            low = middle + 1
    dropped = min(-(-low // drop_step) * drop_step, len(starts) - 1)  # low rounded up to a multiple of drop_step
    return head + history[starts[dropped]:] + new


# ---------------------------------------------------------------------- the engine
def reusable_prefix(context: Sequence[int], piece: Callable[[int], bytes], prompt: bytes) -> tuple[int, int]:
    r"""How many of the context's tokens spell the start of `prompt`, and how many of its bytes they spell.

    A conversation's next prompt holds the previous answer as text, re-rendered by the chat template. Tokenized
    afresh, that text often differs from the tokens that were sampled (another split of the same characters,
    a character whose bytes two tokens shared), so prefix matching on tokens would stop at the first difference
    and re-read the whole answer. Matching on the text the context's tokens spell keeps the sampled tokens
    (the model sees exactly what it generated, leading whitespace the template trims included) and reads only
    what is new. The prefix never ends inside a UTF-8 character, so the rest tokenizes as text.

    >>> pieces = {0: b"<s>", 1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"!", 6: b"\xc3", 7: b"\xa9"}
    >>> reusable_prefix([0, 1, 2, 3, 4], pieces.get, b"<s>Hello world, again")
    (5, 14)
    >>> reusable_prefix([0, 1, 2, 5], pieces.get, b"<s>Hello?")    # the context goes another way after "Hello"
    (3, 8)
    >>> reusable_prefix([0, 6, 7], pieces.get, "<s>\u00e9t\u00e9".encode())  # "é" split over two tokens
    (3, 5)
    >>> reusable_prefix([0, 6], pieces.get, "<s>\u00e9".encode())  # not half of a character
    (1, 3)
    >>> reusable_prefix([0, 3, 4], pieces.get, b"<s>world")   # " wor": an answer's first token, its space trimmed
    (3, 8)
    >>> pieces[8] = b"\n"
    >>> reusable_prefix([0, 8, 1, 2], pieces.get, b"<s>Hello")   # a whole token of trimmed whitespace
    (4, 8)
    >>> reusable_prefix([0, 1, 2, 8], pieces.get, b"<s>Hello<eot>")  # but never as the last kept token
    (3, 8)
    """
    offset, steps = 0, []
    for token in context:
        text = piece(token)
        if text and prompt.startswith(text, offset):
            steps.append(len(text))
        elif prompt.startswith(text.lstrip(), offset):
            # The template trims each answer (`| trim`): its leading whitespace stays as it was sampled.
            steps.append(len(text.lstrip()))
        else:
            break
        offset += steps[-1]
    # Never end on whitespace the prompt does not have, nor inside a character.
    while steps and (steps[-1] == 0 or offset < len(prompt) and prompt[offset] & 0xC0 == 0x80):
        offset -= steps.pop()
    return len(steps), offset


class _StateCache(LlamaRAMCache):
    """llama-cpp-python's RAM cache of prompt states, without a logits copy nobody reads, and without
    states that a newer one extends.

    Llama.save_state copies `scores`: up to n_batch × n_vocab float32, 250 MiB for Llama 3's vocabulary,
    that LlamaRAMCache leaves out of its capacity and Llama.load_state copies back (0.6-1.0 s per cache hit,
    measured). With logits_all=False (our case) sampling reads llama.cpp's own logits, never these: one row
    is kept, which load_state broadcasts back (hit: 0.03 s for a 550-token 1B state, 0.08 s for 3B).
    Each answer saves its conversation's state, whose tokens extend that conversation's previous one; the
    longer state serves any prompt at least as well, so the shorter is dropped rather than left to fill
    the capacity (32 KiB per token for 1B, 112 KiB for 3B).
    """

    def __setitem__(self, key, value):
        key = tuple(key)
        for older in [k for k in self.cache_state if len(k) <= len(key) and key[: len(k)] == k]:
            del self.cache_state[older]
        value.scores = value.scores[-1:].copy()
        super().__setitem__(key, value)


@dataclass
class _Model:
    """A loaded model and the chat formatter its GGUF's template makes."""

    llm: Llama
    formatter: Jinja2ChatFormatter

    def prompt_tokens(self, messages: list[dict]) -> tuple[list[int], object]:
        """The prompt's tokens, and the formatter's response (stop strings and tokens), continuing from the tokens
        already in the model's context wherever they spell the same text (see reusable_prefix)."""
        rendered = self.formatter(messages=messages)
        prompt = rendered.prompt.encode("utf-8")
        context = [int(token) for token in self.llm._input_ids]
        kept, offset = reusable_prefix(context, self._piece, prompt)
        rest = self.llm.tokenize(prompt[offset:], add_bos=False, special=True) if offset < len(prompt) else []
        return context[:kept] + rest, rendered

    def _piece(self, token: int) -> bytes:
        return self.llm.detokenize([token], special=True)

    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the prompt exactly as create_chat_completion builds it from `messages`."""
        prompt = self.formatter(messages=messages).prompt
        # The template writes <|begin_of_text|> itself: no BOS added, special tokens parsed (as the handler does).
        return len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))


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

    def _model(self, label) -> _Model:
        label = self._check_label(label)
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
        """Whether a generation holds this model now (others wait for it)."""
        return self._locks[self._check_label(label)].locked()

    @contextmanager
    def _holding(self, labels: list[str], cancel: threading.Event | None):
        """Hold the models' locks (yields True), or give up when `cancel` is set while waiting (yields False).

        Several locks are taken in catalog order, so two comparisons of the same pair in opposite order
        cannot each hold one model and wait forever for the other.
        """
        locks = [self._locks[label] for label in sorted(set(labels), key=self.labels.index)]
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
                 sampling: Sampling) -> tuple[_Model, list[dict], Sampling]:
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
        with _reported(f"Could not load model '{label}'"):  # a download or load failure
            model = self._model(label)
        system = system_prompt.strip() if isinstance(system_prompt, str) else ""
        messages = ([{"role": "system", "content": system}] if system else []) + history_to_messages(history)
        messages.append({"role": "user", "content": text.strip()})
        with _reported(f"Could not build the prompt for '{label}'"):  # e.g. a template's raise_exception()
            messages = trim_history(messages, model.count_tokens, self.n_ctx, sampling.max_new_tokens,
                                    self.drop_step)
        return model, messages, sampling

    def _generate(self, label: str, model: _Model, messages: list[dict], sampling: Sampling,
                  cancel: threading.Event | None, started: float) -> Iterator[Reply]:
        """Stream one answer, ending with a done Reply (an error one if llama.cpp fails).

        The caller holds the model's lock for as long as this generator runs.
        """
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
        where its text (as Gradio sends it back) stops spelling the sampled tokens (reusable_prefix). With
        6 turns of ≈45-token questions and 64-token answers on 2 cores, measured TTFT turn 1 → turn 6 when
        prefixes were still matched by token ids, which re-read each previous answer (100-124 tokens a turn):
          tiny test model:                  0.007 s → 0.018 s   (re-reading everything: 0.008 → 0.067 s)
          random-weight 1B-shaped q4_k_m:   0.38 s → 0.57 s     (re-reading everything: 0.65 → 5.4 s)
        while the prompt grew from 79 to 653 tokens. Matching by text, a 1B-shaped turn 2 read 49 tokens
        instead of 107 (0.38 s instead of 0.84 s); scripts/bench.py measures the whole conversation.
        When users take turns on one model, the context holds the other user's conversation; the state cache
        (cache_bytes) then restores this one's. Two users alternating 6 turns each on the 1B-shaped model:
        turn-6 TTFT 5.3-5.4 s without it, 0.8-1.1 s with it (tiny model: 0.06 s → 0.04 s), and no cost for
        a single conversation (0.38 → 0.51 s with it).
        Once a conversation outgrows the context, its oldest exchanges go and the prompt changes right after
        the system message, so that turn re-reads it all. 1B-shaped, n_ctx=1024, 16 turns: dropping one
        exchange per turn (drop_step=1) made every turn from the 9th on take 7.0 s to first token; with
        drop_step=4, turns 9 and 13 took 4.2 and 3.9 s and the others 0.7-1.1 s.
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

        Measured on 2 cores with random-weight 1B- and 3B-shaped q4_k_m models, 256 new tokens each:
          sequential    first tokens A 0.3-0.4 s, B 11.6 s (A = 1B) or 21.5 s (A = 3B); both done 31-33 s
          interleaved   first tokens of both within 0.6 s, each streaming at 8-9 tok/s; both done 28-32 s
        Both modes finish together within measurement noise, so interleaved is the better experience: both
        answers start at once at above reading speed, and in a blind vote neither panel's timing gives its
        model away (sequentially, B sits empty for as long as A takes, which tells 1B from 3B).
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


# ---------------------------------------------------------------------- votes
VOTES = ("A", "B", "tie", "both bad")


def unique_vote_file(folder: Path) -> Path:
    """A vote file of this process's own in `folder`: a restarted Space starts with an empty local folder,
    and a CommitScheduler pushing a fixed file name would overwrite the votes already on the Hub."""
    return Path(folder) / f"votes-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.jsonl"


def _commit_scheduler(**arguments):
    from huggingface_hub import CommitScheduler  # only Spaces that push votes need the Hub client

    return CommitScheduler(**arguments)


class VoteLog:
    """Compare-tab votes, one JSON line each, optionally pushed to a Hub dataset every few minutes.

    With `hub_repo_id`, huggingface_hub's CommitScheduler uploads the vote file's folder to `votes/` in that
    dataset repo: give the log a folder of its own, and a file name from unique_vote_file().
    """

    def __init__(self, path: Path, hub_repo_id: str | None = None, every_minutes: float = 10,
                 scheduler_factory: Callable[..., object] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.scheduler = None
        self._lock = threading.Lock()
        if hub_repo_id:
            self.scheduler = (scheduler_factory or _commit_scheduler)(
                repo_id=hub_repo_id, repo_type="dataset", folder_path=self.path.parent, path_in_repo="votes",
                every=every_minutes)
            # The scheduler's own lock, as its docs say: it must not read the file while a line is half written.
            self._lock = self.scheduler.lock

    def record(self, model_a: str, model_b: str, vote: str, prompt: str, answer_a: str, answer_b: str,
               blind: bool) -> dict:
        """Append one vote and return it; UserError for a vote other than A, B, tie, both bad."""
        if vote not in VOTES:
            raise UserError(f"Unknown vote '{_one_line(vote, 40)}'; choose one of: {', '.join(VOTES)}")
        entry = dict(timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), model_a=model_a,
                     model_b=model_b, vote=vote, prompt=prompt, answer_a=answer_a, answer_b=answer_b,
                     blind=bool(blind))
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as file:
            file.write(line)
        return entry
