"""A catalog model behind an OpenAI-compatible server (space/remote.py, space/servers.py, space/openai_server.py): the
no-compile server (the Space's batched engine) and llama-server on the tiny q4_k_m GGUF on a free localhost port,
driven through the `openai` client, no mock."""

import subprocess
import sys
import threading
import time

import pytest

from common.processes import free_port, wait_until_answers
from conftest import ARTIFACTS, REPO
from space.catalog import ModelSpec, load_catalog
from space.openai_server import batched_server_command
from space.remote import RemoteModel
from space.replies import Sampling, UserError
from space.servers import build_llama_server, llama_server_command, server_environment, wait_until_ready

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


def test_the_client_gets_a_timeout_of_its_own_http_library(monkeypatch):
    """openai 3.x sends requests through httpx2, which refuses httpx's Timeout (TypeError at the first request, as
    httpx2 2.17 did); the client is given openai.Timeout, the class of whatever library it is built on."""
    import openai

    from space.remote import CONNECT_TIMEOUT_S, READ_TIMEOUT_S

    monkeypatch.setenv("TINY_KEY", "k")
    client = remote("http://127.0.0.1:9/v1").client()
    assert type(client.timeout) is openai.Timeout
    assert (client.timeout.connect, client.timeout.read) == (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    assert client.max_retries == 0
    # The request the client builds carries it as its library's own timeout (what httpx2 2.17 checks).
    request = client._build_request(openai._models.FinalRequestOptions.construct(method="get", url="/models"))
    assert request.extensions["timeout"] == openai.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S).as_dict()


@pytest.fixture(scope="module")
def openai_server(tiny_gguf, tmp_path_factory):
    """The no-compile OpenAI server (the Space's batched engine, space/openai_server.py) on the tiny GGUF, started the
    way scripts/serve_openai.py --engine llama-cpp-python starts it, with an API key from the environment; yields
    (base_url, its log file)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("openai-server") / "server.log"
    argv = batched_server_command(tiny_gguf, port=port, ctx=1024, alias="tiny", slots=2)
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
    while "client disconnected: answer stopped" not in log_path.read_text() and time.time() < deadline:
        time.sleep(0.2)
    assert "client disconnected: answer stopped" in log_path.read_text()  # the server saw the client go and stopped


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


@pytest.fixture(scope="module")
def llama_server(tiny_gguf, tmp_path_factory):
    """llama.cpp's llama-server, built from the pinned llama-cpp-python's source archive (once per checkout: kept in
    test-artifacts/, ~7 min on 2 cores), on the tiny GGUF with two slots; yields (base_url, its log file)."""
    binary = build_llama_server(root=ARTIFACTS)
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    argv = llama_server_command(binary, tiny_gguf, port=port, slots=2, ctx_per_slot=1024, alias="tiny")
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   env=server_environment("llama-server", None))
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_ready(base_url, process)
        yield base_url, log_path
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_llama_server_answers_two_users_at_once_and_stops_on_request(llama_server):
    base_url, log_path = llama_server
    model = RemoteModel(ModelSpec("tiny (llama-server)", base_url=base_url, model="tiny"))
    results = [None, None]

    def user(index):
        results[index] = list(model.stream([{"role": "user", "content": f"Question {index}?"}],
                                           Sampling(temperature=0.0, max_new_tokens=128), None, time.perf_counter()))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for replies in results:
        assert replies[-1].error is None and replies[-1].text and 0 < replies[-1].tokens <= 128
    slots = {line.split("id ")[1].split()[0] for line in log_path.read_text().splitlines()
             if "print_timing" in line and "eval time" in line and "prompt" not in line}
    assert len(slots) == 2  # the two conversations were given two slots

    cancel, seen = threading.Event(), 0
    for reply in model.stream(HELLO, Sampling(temperature=1.5, max_new_tokens=900), cancel, time.perf_counter()):
        seen += 1
        if seen == 3:
            cancel.set()
    assert reply.finish_reason == "cancelled"
    deadline = time.time() + 30
    while "cancel task" not in log_path.read_text() and time.time() < deadline:
        time.sleep(0.2)
    assert "cancel task" in log_path.read_text()  # llama-server saw the stream close and cancelled the generation


def test_the_engine_serves_a_server_beside_a_local_gguf(openai_server, tiny_gguf, monkeypatch):
    """Chat and compare (local vs remote, interleaved) through the Space's engine; a dead server is one line in
    its own panel while the local model answers."""
    from space.engine import Engine

    monkeypatch.setenv("TINY_KEY", "tiny-secret")
    catalog = [ModelSpec("local", path=str(tiny_gguf)),
               ModelSpec("server", base_url=openai_server[0], model="tiny", api_key_env="TINY_KEY"),
               ModelSpec("dead", base_url=f"http://127.0.0.1:{free_port()}/v1", model="tiny")]
    engine = Engine(catalog, n_ctx=1024)
    assert engine.is_remote("server") and not engine.is_remote("local") and not engine.is_busy("server")
    greedy = Sampling(temperature=0.0, max_new_tokens=16)
    *_, reply = engine.stream_chat("server", "Hello!", [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hey."}], "Be brief.", greedy)
    assert reply.done and reply.error is None and reply.text and reply.ttft_s > 0
    states = list(engine.stream_compare("local", "server", "Hello!", sampling=greedy, mode="interleaved"))
    a, b = states[-1]
    assert a.error is None and b.error is None and a.text and b.text
    assert a.text == b.text  # the same GGUF, greedy, the same template: the same answer either way
    a, b = list(engine.stream_compare("local", "dead", "Hello!", sampling=greedy, mode="interleaved"))[-1]
    assert a.error is None and a.text
    assert b.error.startswith("Could not reach 'dead' at http://127.0.0.1:") and "\n" not in b.error


def test_compare_cli_compares_a_local_gguf_with_a_server(openai_server, tiny_gguf, tmp_path, monkeypatch):
    import json

    from conftest import run_cli

    monkeypatch.setenv("OPENAI_API_KEY", "tiny-secret")  # the openai client's own variable, for a --model URL
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "plain", "prompt": "Name a colour."}) + "\n")
    out = tmp_path / "report"
    result = run_cli("scripts/compare.py", "--model", f"local={tiny_gguf}", "--model",
                     f"server={openai_server[0]}#tiny", "--prompts", str(prompts), "--max-tokens", "16",
                     "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    local, server = json.loads((out / "compare.json").read_text())["models"]
    assert server["source"] == f"{openai_server[0]}#tiny" and server["size_bytes"] is None
    assert server["heldout"]["perplexity"] is None and "OpenAI API" in server["heldout"]["not_scored"]
    assert local["heldout"]["perplexity"] > 1
    answer = server["generation"]["per_prompt"][0]
    assert answer["text"] and answer["error"] is None and answer["ttft_s"] > 0 and 1 <= answer["answer_tokens"] <= 16
    markdown = (out / "compare.md").read_text()
    assert "| | local | server |" in markdown and "| GGUF size | " in markdown

    gone = f"server=http://127.0.0.1:{free_port()}/v1#tiny"
    result = run_cli("scripts/compare.py", "--model", f"local={tiny_gguf}", "--model", gone,
                     "--prompts", str(prompts), "--out", str(tmp_path / "r2"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --model {gone}: Could not reach 'server'")


@pytest.fixture(scope="module")
def space_with_a_server(openai_server, tiny_gguf, tmp_path_factory):
    """`python space/app.py --model TINY --server server=URL#tiny`, the key in OPENAI_API_KEY; yields (url, votes)."""
    import os

    folder = tmp_path_factory.mktemp("space-remote")
    votes, port = folder / "votes.jsonl", free_port()
    log = (folder / "app.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "space/app.py"), "--model", str(tiny_gguf), "--server",
         f"server={openai_server[0]}#tiny", "--host", "127.0.0.1", "--port", str(port), "--votes", str(votes),
         "--n-ctx", "1024", "--stream-interval", "0"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OPENAI_API_KEY": "tiny-secret"})
    url = f"http://127.0.0.1:{port}/"
    wait_until_answers(url, process, timeout=120, log=folder / "app.log")
    yield url, votes
    process.terminate()
    process.wait(timeout=30)


def test_the_space_chats_compares_and_votes_with_a_server(space_with_a_server, tiny_gguf):
    import json

    from gradio_client import Client

    url, votes = space_with_a_server
    local = tiny_gguf.stem
    client = Client(url, verbose=False)
    job = client.submit("Hello there!", "server", "", 0.7, 0.9, 24, api_name="/chat")
    updates = list(job)
    answer, stats = job.result()
    assert len(updates) > 2 and answer and "tok/s" in stats
    chat_a, chat_b, stats_a, stats_b, reveal = client.predict(
        "What is 2 + 2?", local, "server", "", 0.0, 1.0, 16, False, api_name="/compare")
    assert chat_a[-1]["content"] == chat_b[-1]["content"]  # one GGUF, greedy, served here and there
    assert local in stats_a and "server" in stats_b
    assert "Thanks" in client.predict("A", api_name="/vote")
    record = json.loads(votes.read_text().splitlines()[-1])
    assert (record["model_a"], record["model_b"], record["vote"]) == (local, "server", "A")


def test_votes_that_mean_nothing_are_refused(space_with_a_server, tiny_gguf):
    from gradio_client import Client

    url, votes = space_with_a_server
    before = votes.read_text() if votes.exists() else ""
    client = Client(url, verbose=False)
    assert client.predict("A", api_name="/vote") == "Compare two answers first, then vote."
    client.predict("Hi", tiny_gguf.stem, tiny_gguf.stem, "", 0.7, 0.9, 16, True, api_name="/compare")
    assert client.predict("B", api_name="/vote").startswith(f"Both sides were {tiny_gguf.stem}")
    client.predict("   ", tiny_gguf.stem, "server", "", 0.7, 0.9, 16, True, api_name="/compare")
    assert "is an error, so there is nothing to judge" in client.predict("tie", api_name="/vote")
    assert (votes.read_text() if votes.exists() else "") == before  # nothing logged


def test_a_browser_chats_with_the_server_model(space_with_a_server):
    """Debian's Chromium picks the server's model in the Chat tab and watches its answer stream in."""
    import shutil

    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(space_with_a_server[0])
        page.locator("#chat-model input").click()
        page.get_by_role("option", name="server").click()
        assert page.locator("#chat-model input").input_value() == "server"
        page.locator("#chat-input textarea").fill("Hello from the browser!")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "() => (document.querySelector('#chat-stats')?.innerText || '').includes('tok/s')", timeout=60_000)
        bot = page.locator("#chat-bot .message.bot, #chat-bot [data-testid='bot']")
        assert bot.count() and bot.last.inner_text().strip()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-server.png"), full_page=True)
        browser.close()
