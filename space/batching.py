"""Continuous batching: every model answers many conversations at once, in one llama.cpp context with a sequence
per slot, driven by one scheduler thread for all the models of the Space.

    scheduler = Scheduler()
    decoder = BatchedDecoder(llm, slots=4, n_ctx=4096, scheduler=scheduler)   # llm: an opened Llama (its weights)
    job = decoder.submit(prompt_tokens, Sampling(temperature=0), stop_tokens={eot})
    for event in job.events(): ...    # Queued(position) / Started(read, cached) / Piece(text) / Done(reason, error)

What llama.cpp's own server does (tools/server: update_slots), on the low-level API of the pinned
llama-cpp-python: each scheduler step builds one llama_batch holding the next token of every answer being
written plus at most `prefill_chunk` tokens of prompts being read (oldest first, so a long prompt is read over
several steps and never stalls the answers being written), decodes it with one llama_decode, and samples every
sequence with its own sampler chain (temperature, top_p, seed). A slot keeps its conversation's tokens in its
sequence of the KV cache after the answer ends, so the next turn of that conversation reads only what is new; a
new request takes the free slot whose tokens share the longest prefix with its prompt (least recently used on a
tie), and a slot's conversation about to be overwritten is copied to a RAM cache of sequence states (bounded by
`cache_bytes`, least recently used evicted first) from which a later turn is restored.

One thread decodes for every model, model after model: on a 2-vCPU Space the 1B and 3B models never split the
cores between two llama_decode calls, and a compare's two answers advance together, a token of each per step.
ctypes releases the GIL during llama_decode, so Gradio's threads stream tokens meanwhile.

The KV cache is split per sequence (kv_unified off): each slot owns `n_ctx` cells, so no conversation can take
another's room and llama_decode never runs out of KV space mid-answer; an answer that reaches its slot's end stops
with finish reason "length".
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import llama_cpp

from common.llama_runtime import token_piece
from space.jobs import Done, Job, Piece, Queued, Started, common_prefix
from space.replies import Sampling

__all__ = ["BatchedDecoder", "Scheduler", "DEFAULT_SLOTS", "DEFAULT_PREFILL_CHUNK"]

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 4  # conversations decoded together per model (space/app.py --slots; docs/benchmarks.md)
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens read per step across all new prompts
_MIN_SAVED_TOKENS = 16  # a slot's conversation shorter than this is not worth a saved state
_TOP_K, _MIN_P = 40, 0.05  # llama-cpp-python's create_completion defaults, kept so answers sample as before


# ---------------------------------------------------------------- the scheduler: one thread for all models
class Scheduler:
    """One thread that steps every decoder with work, one after another, until none has any."""

    def __init__(self):
        self._decoders: list[BatchedDecoder] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, decoder: BatchedDecoder) -> None:
        with self._wake:
            self._decoders.append(decoder)

    def is_current_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def notify(self) -> None:
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                busy = [decoder for decoder in self._decoders if decoder.has_work()]
                if not busy:
                    self._wake.wait(timeout=1.0)
                    continue
            for decoder in busy:
                try:
                    decoder.step()
                except Exception:  # a bug here must not kill the Space's only decoding thread
                    log.exception("batched decoding failed")
                    decoder.fail_all("the model's decoder failed; try again")


# ---------------------------------------------------------------- one model's context and slots
@dataclass
class _Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what its sequence of the KV cache holds, in order
    job: Job | None = None
    used: float = 0.0  # when it was last given a job (least recently used reuse)


class BatchedDecoder:
    """One model's batched context: `slots` sequences of `n_ctx` tokens each, fed by the scheduler."""

    def __init__(self, llm, slots: int = DEFAULT_SLOTS, n_ctx: int = 4096, n_threads: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cache_bytes: int = 0, max_queue: int = 64,
                 scheduler: Scheduler | None = None, label: str = "model"):
        self.llm, self.label = llm, label
        self.n_slots, self.n_ctx, self.prefill_chunk = max(1, slots), n_ctx, max(1, prefill_chunk)
        self.cache_bytes, self.max_queue = max(0, cache_bytes), max(0, max_queue)
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * self.n_slots
        params.n_seq_max = self.n_slots
        params.n_batch = params.n_ubatch = self.prefill_chunk + self.n_slots
        params.kv_unified = False  # each slot its own n_ctx cells: no conversation takes another's room
        params.n_threads = params.n_threads_batch = n_threads or llm.n_threads
        params.no_perf = True
        # As llama-cpp-python's Llama (flash_attn=False) and so the previous engine and compare's get(): the same
        # greedy answers. llama.cpp's own default (auto) turns it on for CPUs; measured side by side in
        # docs/benchmarks.md ("N users at once") against llama-server, which uses that default.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if self.ctx is None:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {label}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = params.n_batch
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [_Slot(seq) for seq in range(self.n_slots)]
        self.waiting: deque[Job] = deque()
        self.states: OrderedDict[tuple, bytes] = OrderedDict()  # saved sequence states by their tokens, LRU first
        self.states_bytes = 0
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()  # submit (any thread) vs. the scheduler's admission
        self._shown_positions: dict[Job, int] = {}
        self.scheduler = scheduler or Scheduler()
        self.scheduler.add(self)
        self.steps = 0

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------ tokens
    def piece(self, token: int) -> bytes:
        """The token's text as bytes (control tokens: empty), cached."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = token_piece(self.llm, token, special=False)
        return text

    def known_tokens(self) -> list[list[int]]:
        """Token sequences this model can resume from: its slots' and its saved states' (a snapshot)."""
        with self._lock:
            return [list(slot.tokens) for slot in self.slots if slot.tokens] + [list(key) for key in self.states]

    # ------------------------------------------------------------ requests
    def submit(self, tokens: list[int], sampling: Sampling, seed: int, stop_tokens=frozenset(),
               stop_strings=(), cancel: threading.Event | None = None) -> Job:
        """Queue one answer to `tokens`; its events arrive through job.events()."""
        job = Job(list(tokens), sampling, seed, frozenset(stop_tokens) | self._eog_tokens(),
                  tuple(s for s in stop_strings if s), cancel)
        if not job.tokens:
            return self._refuse(job, "the prompt is empty")
        if len(job.tokens) >= self.n_ctx:
            return self._refuse(job, f"the prompt is {len(job.tokens):,} tokens, over this model's context of "
                                     f"{self.n_ctx:,}; shorten the conversation")
        with self._lock:
            if len(self.waiting) >= self.max_queue and not self._free_slot_exists():
                return self._refuse(job, f"Model {self.label} is answering {self.n_slots} conversations and "
                                         f"{len(self.waiting)} more are waiting; try again in a minute.")
            self.waiting.append(job)
        self.scheduler.notify()
        return job

    def _refuse(self, job: Job, error: str) -> Job:
        job.finished = True
        job.ended.set()
        job.emit(Done("error", error))
        return job

    def _free_slot_exists(self) -> bool:
        return any(slot.job is None for slot in self.slots)

    def _eog_tokens(self) -> frozenset[int]:
        if not hasattr(self, "_eog"):
            self._eog = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        return self._eog

    def has_work(self) -> bool:
        return bool(self.waiting) or any(slot.job is not None for slot in self.slots)

    def busy_slots(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    def fail_all(self, message: str) -> None:
        with self._lock:
            jobs = [slot.job for slot in self.slots if slot.job] + list(self.waiting)
            self.waiting.clear()
        for slot in self.slots:
            self._forget(slot)
        for job in jobs:
            self._finish(job, "error", message)

    # ------------------------------------------------------------ one step
    def step(self) -> None:
        self._reap()
        self._admit()
        entries = self._fill_batch()
        if not entries:
            return
        code = llama_cpp.llama_decode(self.ctx, self.batch)
        self.steps += 1
        if code != 0:
            self._decode_failed(code, [job for job, *_ in entries])
            return
        for job, tokens, last, logits in entries:
            slot = self.slots[job.slot]
            slot.tokens.extend(tokens)
            if job.pending is not None:
                job.pending = None
            else:
                job.fed += len(tokens)
            if logits and not job.finished:
                self._sample(job, last)

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.stopped():
                self._finish(slot.job, "cancelled")
        with self._lock:
            for job in [job for job in self.waiting if job.stopped()]:
                self.waiting.remove(job)
                self._finish(job, "cancelled")

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and self._free_slot_exists():
                job = self.waiting.popleft()
                self._shown_positions.pop(job, None)
                self._place(job)
            for position, job in enumerate(self.waiting, 1):
                if self._shown_positions.get(job) != position:
                    self._shown_positions[job] = position
                    job.emit(Queued(position))

    def _place(self, job: Job) -> None:
        """Give `job` the free slot that holds most of its prompt (or restore a saved state into one)."""
        free = [slot for slot in self.slots if slot.job is None]
        best = max(free, key=lambda slot: (common_prefix(slot.tokens, job.tokens), -slot.used))
        kept = common_prefix(best.tokens, job.tokens)
        saved_key, saved_kept = self._best_state(job.tokens)
        if saved_kept > kept:  # a saved state holds more of this prompt: the least recently used free slot takes it
            best = min(free, key=lambda slot: slot.used)
            self.states.move_to_end(saved_key)  # not the one evicted to make room for the slot's conversation
            self._save(best, ())
            kept = min(saved_kept, self._restore(best, saved_key))
        else:
            self._save(best, job.tokens)
        kept = min(kept, len(job.tokens) - 1)  # the last prompt token is read again: its logits start the answer
        llama_cpp.llama_memory_seq_rm(self.memory, best.seq, kept, -1)
        del best.tokens[kept:]
        best.job, best.used = job, time.monotonic()
        job.slot, job.fed = best.seq, kept
        job._sampler = self._sampler(job.sampling, job.seed)
        job.emit(Started(read=len(job.tokens) - kept, cached=kept))

    def _fill_batch(self) -> list[tuple[Job, list[int], int, bool]]:
        """The batch: each answer's next token, then prompt chunks (oldest job first) up to prefill_chunk.
        One entry per job: (job, its tokens in the batch, the batch index of the last, whether that one has logits)."""
        entries, n = [], 0
        for slot in self.slots:
            job = slot.job
            if job is not None and job.pending is not None:
                self._add(n, job.pending, len(slot.tokens), slot.seq, True)
                entries.append((job, [job.pending], n, True))
                n += 1
        budget = self.prefill_chunk
        for slot in sorted((slot for slot in self.slots if slot.job is not None), key=lambda slot: slot.used):
            job = slot.job
            left = len(job.tokens) - job.fed
            if job.pending is not None or left <= 0 or budget <= 0:
                continue
            tokens = job.tokens[job.fed:job.fed + min(left, budget)]
            for i, token in enumerate(tokens):
                self._add(n + i, token, job.fed + i, slot.seq, len(tokens) == left and i == len(tokens) - 1)
            n += len(tokens)
            entries.append((job, tokens, n - 1, len(tokens) == left))
            budget -= len(tokens)
        self.batch.n_tokens = n
        return entries

    def _add(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self.batch
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def _decode_failed(self, code: int, jobs: list[Job]) -> None:
        """llama_decode refused the batch: its jobs end with one line; their sequences are cleared, so no neighbour
        ever reads a half-written cache (1: no KV room, which per-slot caches should never meet; <0: an error)."""
        log.error("llama_decode returned %d for %s with %d sequences", code, self.label, len(jobs))
        for job in jobs:
            slot = self.slots[job.slot]
            self._forget(slot)
            self._finish(job, "error", f"Generation failed on '{self.label}': llama_decode returned {code}")

    def _forget(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        slot.tokens.clear()

    # ------------------------------------------------------------ sampling
    def _sampler(self, sampling: Sampling, seed: int):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if sampling.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            for sampler in (llama_cpp.llama_sampler_init_top_k(_TOP_K),
                            llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
                            llama_cpp.llama_sampler_init_min_p(_MIN_P, 1),
                            llama_cpp.llama_sampler_init_temp(sampling.temperature),
                            llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)):
                llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

    def sample_token(self, job: Job, index: int) -> int:
        """The job's next token from the logits at batch position `index` (its own sampler chain)."""
        return llama_cpp.llama_sampler_sample(job._sampler, self.ctx, index)

    def _sample(self, job: Job, index: int) -> None:
        token = self.sample_token(job, index)
        job.sampled_at.append(time.perf_counter())
        if token in job.stop_tokens:
            self._finish(job, "stop")
            return
        job.generated.append(token)
        job.pending = token
        job._unsent += 1
        text = job._held + job._utf8.feed(self.piece(token))
        job._held = ""
        for stop in job.stop_strings:
            if (at := text.find(stop)) >= 0:
                self._send(job, text[:at])
                self._finish(job, "stop", flush=False)
                return
        hold = max((n for stop in job.stop_strings for n in range(1, len(stop))
                    if text.endswith(stop[:n])), default=0)
        text, job._held = (text[:-hold], text[-hold:]) if hold else (text, "")
        self._send(job, text)
        slot = self.slots[job.slot]
        if len(job.generated) >= job.sampling.max_new_tokens or len(slot.tokens) + 1 >= self.n_ctx:
            self._finish(job, "length")

    def _send(self, job: Job, text: str) -> None:
        """Stream `text` for the tokens sampled since the last piece, noting where it is not those tokens' own
        pieces (job.streamed): the earlier ones streamed nothing, the last one all of it."""
        if not text:
            return  # bytes held back (half a character, the start of a stop string): they come with a later token
        last = len(job.generated) - 1
        group = range(max(0, last - job._unsent + 1), last + 1)
        data = text.encode("utf-8")
        if data != b"".join(self.piece(job.generated[position]) for position in group):
            for position in group:
                job.streamed[position] = data if position == last else b""
        job.emit(Piece(text, max(1, job._unsent)))
        job._unsent = 0

    def _finish(self, job: Job, reason: str, error: str | None = None, flush: bool = True) -> None:
        if job.finished:
            return
        job.finished = True
        rest = job._held + job._utf8.flush()
        if rest and flush and error is None and job.generated:
            if job._unsent:
                self._send(job, rest)
            else:  # held back from tokens already streamed in part: the rest of the last one's text
                last = len(job.generated) - 1
                job.streamed[last] = job.streamed.get(last, b"") + rest.encode("utf-8")
                job.emit(Piece(rest, 0))
        if job._sampler is not None:
            llama_cpp.llama_sampler_free(job._sampler)
            job._sampler = None
        if job.slot is not None and self.slots[job.slot].job is job:
            self.slots[job.slot].job = None  # its tokens stay: the conversation's next turn resumes from them
        job.ended.set()
        job.emit(Done(reason, error))

    # ------------------------------------------------------------ saved states (RAM)
    def _best_state(self, tokens: list[int]) -> tuple[tuple | None, int]:
        best, kept = None, 0
        for key in self.states:
            n = common_prefix(key, tokens)
            if n > kept:
                best, kept = key, n
        return best, kept

    def _save(self, slot: _Slot, incoming: list[int]) -> None:
        """Copy the slot's conversation to the RAM cache before `incoming` overwrites most of it."""
        if (self.cache_bytes <= 0 or len(slot.tokens) < _MIN_SAVED_TOKENS
                or common_prefix(slot.tokens, incoming) >= len(slot.tokens) - _MIN_SAVED_TOKENS):
            return
        key = tuple(slot.tokens)
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq)
        if size <= 0 or size > self.cache_bytes:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, buffer, size, slot.seq)
        if written <= 0:
            return
        for older in [k for k in self.states if len(k) <= len(key) and key[: len(k)] == k]:
            self._drop_state(older)  # the longer state serves every prompt the shorter one did
        self.states[key] = bytes(buffer)[:written]
        self.states_bytes += written
        while self.states_bytes > self.cache_bytes:
            self._drop_state(next(iter(self.states)))

    def _restore(self, slot: _Slot, key: tuple) -> int:
        """Load a saved state (kept in the cache, now the most recently used) into the slot's sequence; how many
        tokens the slot then holds (0 if llama.cpp refused it)."""
        data = self.states[key]
        self.states.move_to_end(key)
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buffer, len(data), slot.seq) == 0:
            slot.tokens.clear()
            return 0
        slot.tokens[:] = key
        return len(key)

    def _drop_state(self, key: tuple) -> None:
        self.states_bytes -= len(self.states.pop(key))

