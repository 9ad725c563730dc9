"""An OpenAI-compatible server over the Space's own batched engine: the no-compile way to serve a GGUF to many clients
at once (scripts/serve_openai.py --engine llama-cpp-python starts it).

    python -m space.openai_server --model exports/1b/Llama-3.2-1B-FineTome-Q4_K_M.gguf --port 8000 --slots 4

llama-cpp-python's own server (`python -m llama_cpp.server`) answers one request at a time; this one answers up to
`--slots` conversations together (space/batching.py), as llama-server does, with the GGUF's own chat template and
the Space's validation. Endpoints: GET /v1/models, POST /v1/chat/completions (stream or not, `stream_options`
include_usage), GET /health. With $API_KEY set, every /v1 request must send it as a Bearer token (the same variable
llama-cpp-python's server reads: space.servers.server_environment). A client that disconnects mid-answer frees its
slot at the next decoding step.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from common.cli import UsageError, one_line
from common.machine import limit_malloc_arenas, usable_cpus
from space.batching import DEFAULT_SLOTS
from space.catalog import ModelSpec
from space.config import environment_setting
from space.engine import Engine
from space.replies import Sampling

__all__ = ["build_api", "batched_server_command", "main"]

log = logging.getLogger("space.openai_server")


def batched_server_command(model: Path, *, port: int, ctx: int = 4096, host: str = "127.0.0.1",
                           alias: str | None = None, threads: int | None = None, slots: int = DEFAULT_SLOTS) -> list[str]:
    """The command line that serves `model` through this module (what scripts/serve_openai.py runs), to be run from
    the repository's root (`python -m`)."""
    return [sys.executable, "-m", "space.openai_server", "--model", str(model), "--host", host, "--port", str(port),
            "--ctx", str(ctx), "--threads", str(threads or usable_cpus()), "--slots", str(slots),
            "--alias", alias or Path(model).stem]


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _request(body: dict) -> tuple[str, list, str, Sampling] | str:
    """(message, history, system prompt, sampling) from a chat completion request, or the problem in one line."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") for m in messages):
        return "every message needs a role of system, user or assistant"
    system = "\n\n".join(str(m.get("content") or "") for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        return "the last message must be the user's"
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = Sampling(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                        max_new_tokens=max_tokens if max_tokens is not None else 256)
    return turns[-1].get("content"), turns[:-1], system, sampling


def build_api(engine: Engine, alias: str, api_key: str | None = None):
    """The Starlette app serving `engine`'s first model under the name `alias`."""
    from starlette.applications import Starlette
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    label = engine.labels[0]

    def authorized(request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def models(request):
        if not authorized(request):
            return _error(401, "Invalid API key", "authentication_error")
        return JSONResponse({"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "finetome",
                                                         "created": 0}]})

    async def health(request):
        return JSONResponse({"status": "ok", "slots": engine.slots, "busy": engine.is_busy(label)})

    async def chat_completions(request):
        if not authorized(request):
            return _error(401, "Invalid API key", "authentication_error")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if body.get("model") not in (None, alias):
            return _error(404, f"unknown model {one_line(repr(body.get('model')), 60)}; this server has {alias!r}",
                          "not_found_error")
        parsed = _request(body)
        if isinstance(parsed, str):
            return _error(400, parsed)
        message, history, system, sampling = parsed
        cancel = threading.Event()
        stream = engine.stream_chat(label, message, history, system, sampling, cancel=cancel)
        # The first Reply before answering: a request the engine refuses is an HTTP error, not an empty stream.
        first = await run_in_threadpool(next, stream, None)
        if first is not None and first.error:
            stream.close()
            return _error(400 if first.finish_reason == "error" and "try again" not in first.error else 503,
                          first.error)
        created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        def usage(reply) -> dict:
            prompt = reply.prompt_tokens or 0
            return {"prompt_tokens": prompt, "completion_tokens": reply.tokens,
                    "total_tokens": prompt + reply.tokens}

        def replies():
            try:
                if first is not None:
                    yield first
                yield from stream
            finally:
                cancel.set()
                stream.close()

        if not body.get("stream"):
            final = None
            for final in await run_in_threadpool(list, replies()):
                pass
            if final is None or final.error:
                return _error(500, final.error if final else "no answer", "server_error")
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": alias,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text},
                             "finish_reason": final.finish_reason}],
                "usage": usage(final)})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            return "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                          "model": alias, "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": finish_reason}], **extra}) + "\n\n"

        async def events():
            sent, reply = 0, None
            answers = iterate_in_threadpool(replies())
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for reply in answers:
                    if len(reply.text) > sent:
                        yield chunk({"content": reply.text[sent:]})
                        sent = len(reply.text)
                if reply is not None and reply.error:
                    yield "data: " + json.dumps({"error": {"message": reply.error, "type": "server_error"}}) + "\n\n"
                elif reply is not None:
                    yield chunk({}, reply.finish_reason)
                    if include_usage:
                        yield "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                                     "created": created, "model": alias, "choices": [],
                                                     "usage": usage(reply)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if reply is None or not reply.done:
                    log.info("client disconnected: answer stopped after %d characters", sent)
                cancel.set()  # the engine frees the slot at its next step
                await answers.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/models", models), Route("/health", health),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/chat/completions", chat_completions, methods=["POST"])])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m space.openai_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the GGUF to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ctx", type=int, default=4096, help="context tokens per conversation")
    parser.add_argument("--slots", type=int, default=DEFAULT_SLOTS, help="conversations decoded together")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--alias", default=None, help="the model name clients ask for (default: the file's stem)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("space").setLevel(logging.INFO)
    limit_malloc_arenas(2)
    model = Path(args.model)
    alias = args.alias or model.stem
    # Saved conversation states as in the Space (SPACE_CACHE_MB, read by the Space's own rule): clients resend
    # whole conversations, and a slot or a state that spells their start serves it.
    try:
        cache_bytes = environment_setting("cache_mb") * 2**20
    except UsageError as error:
        sys.exit(error.report())
    engine = Engine([ModelSpec(alias, path=str(model))], n_ctx=args.ctx, n_threads=args.threads, slots=args.slots,
                    cache_bytes=cache_bytes)
    engine.get(alias)  # load before listening: /v1/models answers only once the model is ready
    import uvicorn

    uvicorn.run(build_api(engine, alias, os.environ.get("API_KEY") or None), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
