"""llama.cpp's own llama-server for a GGUF, built from the llama.cpp release the installed llama-cpp-python was
compiled from, for the Space (or anything) to talk to over the OpenAI API.

    from space.servers import build_llama_server, llama_server_command
    binary = build_llama_server()                 # once per machine: CMake, CPU only, cached (common/llama_tools.py)
    argv = llama_server_command(binary, "1b-Q4_K_M.gguf", port=8080, slots=4)

llama-server gives each of `slots` conversations its own part of the context and decodes them together in one batch
(continuous batching), taking llama.cpp's AMX safe path where common.llama_runtime chooses it (--no-repack, which turns off
the extra buffer types). The no-compile server with the same batching is the Space's own engine behind the same API
(space/openai_server.py).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from common.llama_runtime import LlamaSetupError
from common.llama_tools import CMAKE_OPTIONS, build_llama_tools, safe_path_args, tools_dir
from common.machine import usable_cpus
from common.processes import ServerNotReady, wait_until_answers

__all__ = ["build_llama_server", "llama_server_binary", "llama_server_command", "server_environment",
           "wait_until_ready", "CMAKE_OPTIONS"]


def llama_server_binary(root: Path | None = None) -> Path:
    """Where the built llama-server lives: with llama.cpp's other tools, one folder per llama-cpp-python version and
    machine, under `root` (the project's cache)."""
    return tools_dir(root) / "llama-server"


def build_llama_server(log: Callable[[str], None] = print, jobs: int | None = None, root: Path | None = None) -> Path:
    """llama-server, built once (with llama.cpp's other tools, one CMake build: common/llama_tools.py) from the source
    archive's vendor/llama.cpp and cached; later calls return it."""
    folder = build_llama_tools(log=log, jobs=jobs, root=root,
                               without="; or use --engine llama-cpp-python, which needs no compile")
    return folder / "llama-server"


def llama_server_command(binary: Path, model: Path, *, port: int, slots: int = 4, ctx_per_slot: int = 4096,
                         host: str = "127.0.0.1", alias: str | None = None, threads: int | None = None) -> list[str]:
    """llama-server's argv: `slots` conversations at once, each with `ctx_per_slot` tokens, the GGUF's own chat
    template (--jinja), llama.cpp's AMX safe path where common.llama_runtime takes it.

    >>> llama_server_command(Path("llama-server"), Path("m.gguf"), port=8080, slots=2, ctx_per_slot=1024,
    ...                      threads=2)[:12]
    ['llama-server', '--model', 'm.gguf', '--host', '127.0.0.1', '--port', '8080', '--parallel', '2', '--ctx-size', '2048', '--threads']
    """
    threads = threads or usable_cpus()
    argv = [str(binary), "--model", str(model), "--host", host, "--port", str(port), "--parallel", str(slots),
            "--ctx-size", str(slots * ctx_per_slot), "--threads", str(threads), "--threads-batch", str(threads),
            "--jinja", "--cont-batching", "--alias", alias or Path(model).stem, "--no-webui"]
    return argv + safe_path_args()


def server_environment(engine: str, api_key_env: str | None) -> dict[str, str]:
    """The environment a server starts with: the key held in $`api_key_env`, when one is named, under the name that
    server reads (LLAMA_API_KEY for llama-server, API_KEY for space/openai_server.py), never on its command line."""
    env = dict(os.environ)
    if api_key_env:
        if not os.environ.get(api_key_env):
            raise LlamaSetupError(f"--api-key-env {api_key_env}: that environment variable is empty; set it to the "
                                  "key clients must send")
        env["LLAMA_API_KEY" if engine == "llama-server" else "API_KEY"] = os.environ[api_key_env]
    return env


def wait_until_ready(base_url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `base_url`/models until the server answers (a 401 counts: it wants a key; a 503 does not: llama-server
    is still loading the model); LlamaSetupError when it exits or the time runs out."""
    try:
        wait_until_answers(f"{base_url.rstrip('/')}/models", process, timeout)
    except ServerNotReady as error:
        raise LlamaSetupError(str(error)) from None
