"""Which compares may be voted on (space/votes.py): only finished ones, of two different models, two real answers."""

import threading

import pytest

from space.replies import UserError
from space.votes import VoteLog, vote_problem

GOOD = {"models": ["1B", "3B"], "answers": ["Paris.", "It is Paris."], "finished": True, "errors": [False, False]}


@pytest.mark.parametrize("change,expected", [
    ({}, None),
    ({"models": ["1B", "1B"]}, "Both sides were 1B: a vote needs two different models"),
    ({"finished": False}, "The answers are still being written: vote when both have finished."),
    ({"errors": [True, False], "answers": ["Your message is empty; type something.", "x"]}, "Answer A is an error"),
    ({"answers": ["Paris.", "  "]}, "Answer B is empty"),
])
def test_only_a_finished_compare_of_two_models_with_two_answers_counts(change, expected):
    problem = vote_problem({**GOOD, **change})
    assert problem is None if expected is None else problem.startswith(expected)


@pytest.mark.parametrize("state", [None, {}, {"models": []}])
def test_no_compare_yet(state):
    assert vote_problem(state) == "Compare two answers first, then vote."


def test_the_log_refuses_a_model_against_itself(tmp_path):
    log = VoteLog(tmp_path / "votes.jsonl")
    with pytest.raises(UserError, match="Both sides were 1B"):
        log.record("1B", "1B", "A", "Hi", "x", "y", blind=True)
    assert not (tmp_path / "votes.jsonl").exists()


def test_the_notice_says_what_a_vote_records_and_where(tmp_path):
    local = VoteLog(tmp_path / "votes.jsonl").notice()
    assert "your message, both answers" in local and "no account" in local and "Hub" not in local
    scheduler = type("Scheduler", (), {"lock": threading.Lock()})
    pushed = VoteLog(tmp_path / "v.jsonl", hub_repo_id="me/votes", scheduler_factory=lambda **_: scheduler).notice()
    assert "Hub dataset me/votes" in pushed
