"""A catalog model served elsewhere, over the OpenAI API: llama.cpp's llama-server, llama-cpp-python's server,
vLLM, TGI, or any OpenAI-compatible endpoint. The engine streams its answers as Replies, like a local GGUF's.

    from space.catalog import ModelSpec
    from space.remote import RemoteModel
    remote = RemoteModel(ModelSpec("1B (server)", base_url="http://127.0.0.1:8080/v1", model="llama-1b"))
    for reply in remote.stream([{"role": "user", "content": "Hi"}], Sampling(), cancel=None, started=0.0):
        print(reply.text)

Why: a model served from another machine takes load off the Space (the in-process engine batches `--slots`
conversations per model on the Space's own CPUs), and several servers behind a load balancer scale out. The `openai` client does the HTTP, the streaming (server-sent events) and the errors; closing its stream
closes the connection, and llama-server stops generating for a client that is gone. The API key, when the entry
names one, is read from that environment variable (a Space secret) and never logged.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import replace

from common.cli import one_line
from space.catalog import ModelSpec
from space.replies import Reply, Sampling

__all__ = ["RemoteModel", "CONNECT_TIMEOUT_S", "READ_TIMEOUT_S"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # an unreachable server is reported in seconds, not minutes
READ_TIMEOUT_S = 120.0  # the longest silence between two streamed pieces (a busy server's queue included)


class RemoteModel:
    """One OpenAI-compatible endpoint and model name; thread-safe (the client pools its connections)."""

    def __init__(self, spec: ModelSpec, client=None):
        self.spec = spec
        self.label = spec.label
        self._client = client
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                from openai import OpenAI, Timeout

                # The entry's own variable, else the client's convention (OPENAI_API_KEY), else none.
                key = os.environ.get(self.spec.api_key_env or "OPENAI_API_KEY", "")
                # max_retries=0: a retried chat would start the answer again behind the user's back.
                # openai.Timeout, never httpx.Timeout: the client re-exports the timeout class of the HTTP library it
                # is built on (httpx2 since openai 3.x), and httpx2 2.17 refuses httpx's class with a TypeError.
                self._client = OpenAI(base_url=self.spec.base_url, api_key=key or "not-needed", max_retries=0,
                                      timeout=Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
            return self._client

    def describe_error(self, error: Exception) -> str:
        """One line for the user naming the server and what went wrong (never the API key)."""
        import openai

        where = f"'{self.label}' at {self.spec.base_url}"
        if isinstance(error, openai.APITimeoutError):
            return f"{where} did not answer in time; check that the server is running and not overloaded."
        if isinstance(error, openai.APIConnectionError):
            return f"Could not reach {where}; check that the server is running and the URL is right."
        if isinstance(error, openai.AuthenticationError):
            key = self.spec.api_key_env or "the entry's api_key_env"
            return f"{where} refused the API key (HTTP 401); set {key} to a key the server accepts."
        if isinstance(error, openai.APIStatusError):
            return f"{where} answered HTTP {error.status_code}: {one_line(error.message, 200)}"
        return f"Generation failed on {where}: {one_line(error, 200)}"

    def stream(self, messages: list[dict], sampling: Sampling, cancel: threading.Event | None,
               started: float) -> Iterator[Reply]:
        """Stream one answer as growing Replies, ending with a done one (an error one if the server fails).

        Tokens are counted as streamed pieces, which llama-server and llama-cpp-python's server send one per token;
        when the server reports usage at the end, its completion-token count replaces the estimate.
        """
        reply = Reply(text="")
        stream = None
        try:
            stream = self.client().chat.completions.create(
                model=self.spec.model, messages=messages, stream=True, temperature=sampling.temperature,
                top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, stream_options={"include_usage": True})
            for chunk in stream:
                if cancel is not None and cancel.is_set():
                    reply.finish_reason = "cancelled"
                    break
                usage = getattr(chunk, "usage", None)
                if usage is not None and usage.completion_tokens:
                    reply.tokens = usage.completion_tokens
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                piece = choice.delta.content if choice.delta else None
                if piece:
                    reply.add(piece, started)
                    yield replace(reply)
                if choice.finish_reason:
                    reply.finish_reason = choice.finish_reason
        except Exception as error:  # the openai client's errors, named for the user; the details go to the log
            log.warning("remote model %r failed: %s", self.label, one_line(error, 300))
            reply.finish_reason, reply.error = "error", self.describe_error(error)
        finally:
            if stream is not None:
                stream.close()  # closes the HTTP response: the server stops generating for this request
        reply.done = True
        yield reply
