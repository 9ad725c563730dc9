#!/usr/bin/env python
"""Serve a GGUF over the OpenAI API, for the Space (or any OpenAI client) to talk to.

    python scripts/serve_openai.py exports/1b/Llama-3.2-1B-FineTome-Q4_K_M.gguf --port 8080 --slots 4
    python scripts/serve_openai.py MODEL.gguf --engine llama-cpp-python --port 8000   # no compile, batched too
    python scripts/serve_openai.py --build                                             # build llama-server only

The default engine is llama.cpp's own llama-server, built once per machine (CMake, CPU only) from the llama.cpp
release the installed llama-cpp-python was compiled from, and cached. `--engine llama-cpp-python` needs no compile: it
serves through the Space's own batched engine (space/openai_server.py on the installed llama-cpp-python). Both decode
`--slots` conversations together.
The Space then points a catalog entry at it: {"label": "1B", "base_url": "http://HOST:8080/v1", "model": ALIAS}.
`--api-key-env VAR` makes the server require the key held in $VAR (clients send it; it is never printed).
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.cli import EXIT_INTERRUPTED, UsageError, UsageParser, report_problem  # noqa: E402
from common.llama_runtime import LlamaSetupError  # noqa: E402
from space.openai_server import batched_server_command  # noqa: E402
from space.servers import build_llama_server, llama_server_command, server_environment  # noqa: E402


def parse_args(argv=None):
    parser = UsageParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="the GGUF to serve")
    parser.add_argument("--engine", choices=("llama-server", "llama-cpp-python"), default="llama-server")
    parser.add_argument("--build", action="store_true", help="build llama-server (if not yet built) and exit")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--slots", type=int, default=4, help="conversations decoded together")
    parser.add_argument("--ctx", type=int, default=4096, help="context tokens per conversation")
    parser.add_argument("--alias", help="the model name clients ask for (default: the file's stem)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the usable CPUs)")
    parser.add_argument("--api-key-env", help="require the API key held in this environment variable")
    return parser.parse_args(argv)


def usage_problems(args) -> list[str]:
    if args.build:
        return []
    if not args.model:
        return ["give the GGUF to serve (or --build to only build llama-server)"]
    problems = [f"{flag} {value}: must be >= 1" for flag, value in
                (("--slots", args.slots), ("--ctx", args.ctx), ("--port", args.port)) if value < 1]
    if not Path(args.model).expanduser().is_file():
        problems.append(f"{args.model!r}: no such file; give the path of a .gguf file (export/to_gguf.py writes them)")
    return problems


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if problems := usage_problems(args):
            raise UsageError(problems)
    except UsageError as error:
        return error.report()
    if args.build:
        try:
            print(build_llama_server())
        except LlamaSetupError as error:
            return report_problem(error)
        return 0
    model = Path(args.model).expanduser()
    try:
        if args.engine == "llama-server":
            argv = llama_server_command(build_llama_server(), model, port=args.port, slots=args.slots,
                                        ctx_per_slot=args.ctx, host=args.host, alias=args.alias,
                                        threads=args.threads)
        else:
            argv = batched_server_command(model, port=args.port, ctx=args.ctx, host=args.host, alias=args.alias,
                                          threads=args.threads, slots=args.slots)
        env = server_environment(args.engine, args.api_key_env)
    except LlamaSetupError as error:
        return report_problem(error)
    print(f"serving {model.name} as {args.alias or model.stem!r} at http://{args.host}:{args.port}/v1 "
          f"({args.engine})", flush=True)
    try:
        return subprocess.run(argv, cwd=REPO, env=env).returncode
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
