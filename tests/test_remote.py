"""A catalog model behind an OpenAI-compatible server (space/remote.py, space/servers.py): a real llama-cpp-python
server on the tiny q4_k_m GGUF on a free localhost port, driven through the `openai` client, no mock."""

import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO, free_port
from space.catalog import ModelSpec, load_catalog
from space.remote import RemoteModel
from space.replies import Sampling, UserError
from space.servers import python_server_command, server_environment, wait_until_ready

HELLO = [{"role": "user", "content": "Hello!"}]


def test_the_serve_script_refuses_bad_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts/serve_openai.py"), str(tmp_path / "no.gguf"),
                             "--slots", "0"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: --slots 0: must be >= 1",
        f"error: '{tmp_path / 'no.gguf'}': no such file; give the path of a .gguf file (export/to_gguf.py writes them)"]


def test_an_empty_key_variable_is_named(monkeypatch):
    monkeypatch.setenv("TINY_KEY", "")
    with pytest.raises(ValueError, match="--api-key-env TINY_KEY: that environment variable is empty"):
        server_environment("llama-server", "TINY_KEY")
    monkeypatch.setenv("TINY_KEY", "s3cret")
    assert server_environment("llama-server", "TINY_KEY")["LLAMA_API_KEY"] == "s3cret"
    assert server_environment("llama-cpp-python", "TINY_KEY")["API_KEY"] == "s3cret"


@pytest.mark.parametrize("entry,problem", [
    ({"label": "R", "base_url": "http://h:8080/v1"}, "base_url and model go together"),
    ({"label": "R", "base_url": "h:8080", "model": "m"}, "base_url 'h:8080' must start with http:// or https://"),
    ({"label": "R", "base_url": "http://h/v1", "model": "m", "path": "x.gguf"}, "give one of repo_id + filename"),
])
def test_catalog_checks_remote_entries(entry, problem):
    with pytest.raises(UserError, match=problem.replace("+", r"\+")):
        load_catalog(env={"SPACE_MODELS": __import__("json").dumps([entry])})


def test_a_remote_entry_loads_from_the_catalog():
    spec, = load_catalog(env={"SPACE_MODELS": '[{"label": "1B (server)", "base_url": "http://10.0.0.5:8080/v1", '
                                              '"model": "llama-1b", "api_key_env": "LLAMA_KEY"}]'})
    assert spec.is_remote and spec.model == "llama-1b" and spec.api_key_env == "LLAMA_KEY"


@pytest.fixture(scope="module")
def openai_server(tiny_gguf, tmp_path_factory):
    """llama-cpp-python's OpenAI server on the tiny GGUF, started the way scripts/serve_openai.py starts it, with
    an API key from the environment; yields (base_url, its log file)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("openai-server") / "server.log"
    argv = python_server_command(tiny_gguf, port=port, ctx=1024, alias="tiny")
    argv[argv.index("--verbose") + 1] = "True"  # the log says when a client went away
    env = {**server_environment("llama-cpp-python", None), "API_KEY": "tiny-secret"}
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_ready(base_url, process)  # a 401 counts
        yield base_url, log_path
    finally:
        process.terminate()
        process.wait(timeout=30)


def remote(base_url, key_env="TINY_KEY"):
    return RemoteModel(ModelSpec("tiny (server)", base_url=base_url, model="tiny", api_key_env=key_env))


def test_a_remote_model_streams_an_answer(openai_server, monkeypatch):
    monkeypatch.setenv("TINY_KEY", "tiny-secret")
    replies = list(remote(openai_server[0]).stream(HELLO, Sampling(temperature=0.0, max_new_tokens=24), None,
                                                   time.perf_counter()))
    last = replies[-1]
    assert last.done and last.error is None and last.text and last.finish_reason in ("stop", "length")
    assert 0 < last.tokens <= 24 and last.ttft_s > 0
    assert len(replies) > 2 and all(not r.done for r in replies[:-1])  # streamed, not one block
    again = list(remote(openai_server[0]).stream(HELLO, Sampling(temperature=0.0, max_new_tokens=24), None,
                                                 time.perf_counter()))[-1]
    assert again.text == last.text  # greedy: the same answer


def test_stop_closes_the_stream_and_the_server_stops(openai_server, monkeypatch):
    monkeypatch.setenv("TINY_KEY", "tiny-secret")
    base_url, log_path = openai_server
    cancel, seen = threading.Event(), 0
    for reply in remote(base_url).stream(HELLO, Sampling(temperature=1.5, max_new_tokens=900), cancel,
                                         time.perf_counter()):
        seen += 1
        if seen == 3:
            cancel.set()
    assert reply.done and reply.finish_reason == "cancelled" and reply.tokens < 10
    deadline = time.time() + 30
    while "Disconnected from client" not in log_path.read_text() and time.time() < deadline:
        time.sleep(0.2)
    assert "Disconnected from client" in log_path.read_text()  # the server saw the client go and stopped


def test_a_wrong_key_and_an_unreachable_server_are_one_line_each(openai_server, monkeypatch):
    monkeypatch.setenv("TINY_KEY", "wrong")
    last = list(remote(openai_server[0]).stream(HELLO, Sampling(), None, time.perf_counter()))[-1]
    assert last.error == (f"'tiny (server)' at {openai_server[0]} refused the API key (HTTP 401); set TINY_KEY to a "
                          "key the server accepts.")
    assert "wrong" not in last.error
    gone = f"http://127.0.0.1:{free_port()}/v1"
    last = list(remote(gone).stream(HELLO, Sampling(), None, time.perf_counter()))[-1]
    assert last.error == (f"Could not reach 'tiny (server)' at {gone}; check that the server is running and the URL "
                          "is right.") and last.finish_reason == "error"
