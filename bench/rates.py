"""Decoding speed only from runs that generated exactly the tokens asked.

A model that ends its answer early (the benchmarks' random-weight models can sample end-of-turn after a token or
two) leaves a couple of tokens a few microseconds apart, and dividing them gave 150,012 tok/s. So every speed run
suppresses end-of-generation where the path allows it (`eog_logit_bias` for llama-cpp-python; `generate()` and
transformers' `min_new_tokens` never stop early), and its figures pass through `decoding_rate`, which rejects a
run that fell short, with the reason, instead of dividing it. A path that cannot suppress it (the Space's /chat
API) gets its run rejected and the caller tries another prompt.

    from bench.rates import RejectedRun, decoding_rate
    figures = decoding_rate(times, started, asked=128)   # or RejectedRun("2 tokens of the 128 asked ...")
"""

from __future__ import annotations

__all__ = ["RejectedRun", "decoding_rate", "eog_logit_bias"]


class RejectedRun(RuntimeError):
    """A speed run that gives no decoding rate; its message says why."""


def decoding_rate(times: list[float], started: float, asked: int, tokens: int | None = None) -> dict:
    """{ttft_s, tokens, tokens_per_s} of a streamed run: `times` when each update arrived (`started`: the request),
    `tokens` how many the run generated (default: one per update). Tokens/s counts the tokens after the first over
    the time after the first update. RejectedRun unless the run generated exactly `asked` tokens over two updates
    or more.

    >>> decoding_rate([1.0, 1.5, 2.0], started=0.5, asked=3)
    {'ttft_s': 0.5, 'tokens': 3, 'tokens_per_s': 2.0}
    >>> decoding_rate([1.0, 1.00001], started=0.5, asked=128)
    Traceback (most recent call last):
    bench.rates.RejectedRun: 2 tokens of the 128 asked: the answer ended early, so no decoding speed comes from it
    >>> decoding_rate([1.0], started=0.5, asked=64, tokens=64)
    Traceback (most recent call last):
    bench.rates.RejectedRun: 64 tokens arrived in 1 streamed update: no interval to time decoding over
    """
    tokens = len(times) if tokens is None else tokens
    if tokens != asked:
        raise RejectedRun(f"{tokens} tokens of the {asked} asked: the answer ended early, so no decoding speed "
                          "comes from it")
    if len(times) < 2 or times[-1] <= times[0]:
        raise RejectedRun(f"{tokens} tokens arrived in {len(times)} streamed update{'s' * (len(times) != 1)}: no "
                          "interval to time decoding over")
    return {"ttft_s": times[0] - started, "tokens": tokens, "tokens_per_s": (tokens - 1) / (times[-1] - times[0])}


def eog_logit_bias(llm) -> dict[int, float]:
    """llama-cpp-python's `logit_bias` that keeps every end-of-generation token of `llm`'s vocabulary (llama.cpp's
    own list: end of text, end of turn, end of message, ...) from being sampled, so an answer runs to max_tokens."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {token: float("-inf") for token in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, token)}
