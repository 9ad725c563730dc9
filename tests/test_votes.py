"""The vote log (space/votes.py): what it refuses and how it writes; which compares may be voted on is
tests/test_round.py's."""

import threading

import pytest

from space.replies import UserError
from space.votes import VoteLog


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
