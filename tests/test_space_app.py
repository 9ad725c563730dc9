"""The Space as users and API callers meet it: a real Gradio server on a free localhost port serving the real tiny
q4_k_m GGUF (twice, as two catalog entries), driven with gradio_client and with Debian's Chromium."""

import json
import re

import pytest


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


CHAT_DEFAULTS = dict(model="Tiny-A-Q4_K_M", system_prompt="", temperature=0.7, top_p=0.9, max_new_tokens=32)


def test_chat_streams_and_reports_speed(client):
    job = client.submit("Hello there!", *CHAT_DEFAULTS.values(), api_name="/chat")
    updates = list(job)
    answer, stats = job.result()
    assert len(updates) > 2  # streamed, not returned at once
    assert answer and "tok/s" in stats and "TTFT" in stats


def fresh_chat(server, *args):
    """One /chat call in a new session: the endpoint keeps each session's conversation as its history."""
    from gradio_client import Client

    return Client(server[0], verbose=False).predict(*args, api_name="/chat")


def token_count(stats: str) -> int:
    return int(re.search(r"(\d+) tokens", stats).group(1))


def test_chat_honours_the_sliders(server):
    first = fresh_chat(server, "Count to three.", "Tiny-A-Q4_K_M", "", 0.0, 1.0, 16)
    again = fresh_chat(server, "Count to three.", "Tiny-A-Q4_K_M", "", 0.0, 1.0, 16)
    assert first[0] == again[0]  # temperature 0 is greedy
    assert token_count(first[1]) <= 16  # max new tokens honoured
    longer = fresh_chat(server, "Count to three.", "Tiny-A-Q4_K_M", "", 0.0, 1.0, 64)
    assert token_count(longer[1]) > 16 and longer[0].startswith(first[0])
    sampled = {fresh_chat(server, "Count to three.", "Tiny-A-Q4_K_M", "", 2.0, 1.0, 16)[0] for _ in range(3)}
    assert len(sampled) > 1  # temperature 2 samples


def test_chat_keeps_the_sessions_conversation(client, server):
    greedy = ("Tiny-A-Q4_K_M", "", 0.0, 1.0, 24)
    client.predict("My name is Ada and I like rivers.", *greedy, api_name="/chat")
    in_conversation, _ = client.predict("What is my name?", *greedy, api_name="/chat")
    alone, _ = fresh_chat(server, "What is my name?", *greedy)
    assert in_conversation != alone  # the first turn was part of the second turn's prompt


def test_compare_returns_two_answers_and_a_blind_vote_is_logged(client, server):
    _, votes = server
    chat_a, chat_b, stats_a, stats_b, reveal = client.predict(
        "What is 2 + 2?", "Tiny-A-Q4_K_M", "Tiny-B-Q4_K_M", "", 0.7, 0.9, 24, True, api_name="/compare")
    assert chat_a[-1]["content"] and chat_b[-1]["content"]
    assert "Model A" in stats_a and "Model B" in stats_b and "Tiny-A" not in stats_a + stats_b  # blind
    assert "vote" in reveal.lower()
    result = client.predict("tie", api_name="/vote")
    assert "Tiny-A-Q4_K_M" in result and "Tiny-B-Q4_K_M" in result  # revealed after the vote
    record = json.loads(votes.read_text().splitlines()[-1])
    assert record["vote"] == "tie" and record["blind"] is True
    assert {record["model_a"], record["model_b"]} == {"Tiny-A-Q4_K_M", "Tiny-B-Q4_K_M"}
    assert record["prompt"] == "What is 2 + 2?"


@pytest.mark.parametrize("args", [
    ("Hi", "../../etc/passwd", "", 0.7, 0.9, 32),  # not in the catalog
    ("Hi", "Tiny-A-Q4_K_M", "", -5.0, 0.9, 32),  # temperature below range
    ("Hi", "Tiny-A-Q4_K_M", "", 0.7, 9.0, 32),  # top_p above range
    ("Hi", "Tiny-A-Q4_K_M", "", 0.7, 0.9, 10**9),  # absurd length
    ("x" * 100_000, "Tiny-A-Q4_K_M", "", 0.7, 0.9, 32),  # message over the cap
])
def test_hostile_values_come_back_as_messages_and_the_server_keeps_answering(client, args):
    from gradio_client.exceptions import AppError

    try:
        answer, _ = client.predict(*args, api_name="/chat")
        message = answer
    except AppError as e:  # Gradio's own range/choice validation: a message, not a crash
        message = str(e)
    assert message and "Traceback" not in message
    answer, stats = client.predict("Still there?", *CHAT_DEFAULTS.values(), api_name="/chat")
    assert answer and "tok/s" in stats


def test_blind_votes_update_the_leaderboard_with_counts_and_intervals(client, server):
    from compare.ratings import leaderboard, read_votes

    _, votes = server

    def board():
        summary, ratings, pairs, _ = client.predict(api_name="/leaderboard")
        return summary, {row[1]: row for row in ratings["data"]}, pairs["data"]

    _, before, _ = board()
    for choice in ("A", "B", "A", "tie", "both bad"):
        client.predict("Name a colour.", "Tiny-A-Q4_K_M", "Tiny-B-Q4_K_M", "", 0.7, 0.9, 16, True, api_name="/compare")
        assert client.predict(choice, api_name="/vote").startswith("Thanks!")
    summary, after, pairs = board()

    counted = sum(int(row[4]) for row in after.values()) // 2  # each counted vote is in both models' rows
    assert counted == sum(int(row[4]) for row in before.values()) // 2 + 4  # "both bad" is shown, not counted
    expected = leaderboard(read_votes([votes]))  # the same log, rated here: the tab shows exactly that
    assert f"{expected.counted} vote" in summary and f"{expected.both_bad} both bad" in summary
    for row in expected.ratings:
        rank, model, rating, interval, count, _, record, both_bad = after[row.model]
        assert (int(count), record, int(both_bad)) == (row.votes, f"{row.wins} / {row.ties} / {row.losses}",
                                                       row.both_bad)
        low, high = map(int, re.fullmatch(r"(\d+) – (\d+)", interval).groups())
        assert low <= int(rating) <= high
    assert [row[:3] for row in pairs] == [[expected.pairs[0].model, expected.pairs[0].opponent, str(counted)]]
    assert re.fullmatch(r"\d+% \[\d+% – \d+%\]", pairs[0][-1])


@pytest.fixture(scope="module")
def three_models(tiny_gguf, tmp_path_factory):
    """The app in-process over three catalog entries (the tiny GGUF three times): blind pairs are drawn."""
    from gradio_client import Client

    from space.app import build_app
    from space.catalog import catalog_from_paths
    from space.engine import Engine
    from space.votes import VoteLog

    folder = tmp_path_factory.mktemp("three")
    paths = [folder / f"Tiny-{name}-Q4_K_M.gguf" for name in "XYZ"]
    for path in paths:
        path.symlink_to(tiny_gguf)
    votes = VoteLog(folder / "votes" / "votes.jsonl")
    app = build_app(Engine(catalog_from_paths([str(path) for path in paths]), n_ctx=512), votes, stream_interval=0)
    _, url, _ = app.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield Client(url, verbose=False), votes.path
    app.close()


def test_blind_pairs_of_three_models_are_drawn_and_a_chosen_pair_is_kept(three_models):
    client, votes = three_models
    args = ("Hi", "Tiny-X-Q4_K_M", "Tiny-Y-Q4_K_M", "", 0.7, 0.9, 16)
    for _ in range(9):  # random pair: the default with more than two models
        client.predict(*args, True, api_name="/compare")
        client.predict("tie", api_name="/vote")
    drawn = [json.loads(line) for line in votes.read_text().splitlines()]
    pairs = {frozenset((vote["model_a"], vote["model_b"])) for vote in drawn}
    assert all(len(pair) == 2 for pair in pairs) and len(pairs) >= 2  # all three pairs equally likely: 1 in 6561 fails
    client.predict(*args, True, False, api_name="/compare")  # chosen by hand, still blind
    client.predict("A", api_name="/vote")
    chosen = json.loads(votes.read_text().splitlines()[-1])
    assert {chosen["model_a"], chosen["model_b"]} == {"Tiny-X-Q4_K_M", "Tiny-Y-Q4_K_M"} and chosen["blind"]
