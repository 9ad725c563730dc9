"""A compare round's rules without Gradio (space/round.py): which sides a blind round draws, what a stopped or failed
round means, and which rounds may be voted on, once; the vote goes to a real vote log."""

import copy
import json
import random
from collections import Counter

import pytest

from space.replies import Reply, UserError
from space.round import BLIND, STOPPED, VOTES, WRITING, CompareRound
from space.votes import VoteLog

LABELS = ["1B", "3B", "8B"]


def written(text: str, reason: str = "stop") -> Reply:
    return Reply(text, done=True, finish_reason=reason)


def finished_round(**fields) -> CompareRound:
    """A round of 1B (A) against 3B (B) whose both answers ended: one a vote counts on."""
    round_ = CompareRound(models=("1B", "3B"), message="Capital of France?", blind=True)
    round_.update(written("Paris."), written("It is Paris."))
    round_.end()
    for name, value in fields.items():
        setattr(round_, name, value)
    return round_


# ---------------------------------------------------------------------- the sides
def test_a_named_round_keeps_the_dropdowns_sides():
    for random_pair in (False, True, None):
        round_ = CompareRound.start("Hi", "3B", "1B", blind=False, random_pair=random_pair, labels=LABELS)
        assert round_.models == ("3B", "1B") and round_.shown == ("3B", "1B") and not round_.blind


def test_a_blind_round_shuffles_the_sides_and_hides_the_names():
    rng = random.Random(0)
    drawn = Counter(CompareRound.start("Hi", "1B", "3B", True, False, LABELS, rng).models for _ in range(200))
    assert set(drawn) == {("1B", "3B"), ("3B", "1B")} and min(drawn.values()) > 60  # either side, about evenly
    assert CompareRound.start("Hi", "1B", "3B", True, False, LABELS).shown == ("Model A", "Model B")


def test_a_blind_random_pair_is_drawn_fairly_from_more_than_two_models():
    rng = random.Random(1)
    drawn = Counter(frozenset(CompareRound.start("Hi", "1B", "1B", True, True, LABELS, rng).models)
                    for _ in range(600))
    assert set(drawn) == {frozenset(pair) for pair in (("1B", "3B"), ("1B", "8B"), ("3B", "8B"))}
    assert min(drawn.values()) > 150  # each of the three pairs about a third of the time
    # Two models: nothing to draw, the dropdowns' pair is shuffled.
    assert sorted(CompareRound.start("Hi", "1B", "1B", True, True, ["1B", "3B"], rng).models) == ["1B", "1B"]


@pytest.mark.parametrize("blind, random_pair, named", [("yes", False, "Blind must be true or false, not 'yes'."),
                                                       (True, 3, "Random pair must be true or false, not 3."),
                                                       ([True], None, "Blind must be true or false")])
def test_a_checkbox_that_is_not_true_or_false_is_refused_naming_it(blind, random_pair, named):
    with pytest.raises(UserError) as refused:
        CompareRound.start("Hi", "1B", "3B", blind, random_pair, LABELS)
    assert str(refused.value).startswith(named) and "\n" not in str(refused.value)


# ---------------------------------------------------------------------- streaming, stopping, failing
def test_a_round_is_written_then_finished_then_revealed_as_its_mode_says():
    for blind, revealed in ((True, BLIND), (False, "A = 1B, B = 3B")):
        round_ = CompareRound(models=("1B", "3B"), message="Hi", blind=blind)
        round_.update(Reply("Hel"), Reply(""))
        assert (round_.reveal(), round_.finished, round_.stopped) == (WRITING, False, False)
        assert round_.panels()[0] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
        round_.update(written("Hello"), written("Hey"))
        round_.end()
        assert (round_.reveal(), round_.finished, round_.failure()) == (revealed, True, None)


def test_stop_cuts_a_round_for_good_and_a_late_stop_changes_nothing():
    round_ = CompareRound(models=("1B", "3B"), message="Hi")
    round_.update(Reply("Once upon"), Reply("There was"))
    assert round_.stop() and round_.reveal() == STOPPED
    round_.update(written("Once upon a", "cancelled"), written("There was", "cancelled"))
    round_.end()  # the streams end after the Stop: the round stays stopped, unfinished
    assert (round_.stopped, round_.finished, round_.reveal()) == (True, False, STOPPED)
    assert round_.problem() == "The answers were stopped before their end: compare again to vote."

    late = finished_round()
    assert late.stop() is False and (late.stopped, late.finished, late.problem()) == (False, True, None)
    assert CompareRound().stop() is False  # no compare yet: nothing to stop


def test_a_side_cancelled_without_the_button_stops_the_round_too():
    round_ = CompareRound(models=("1B", "3B"))
    round_.update(written("Hello"), written("Hey", "cancelled"))
    round_.end()
    assert round_.stopped and not round_.finished and round_.reveal() == STOPPED


def test_a_failed_side_ends_the_round_with_its_error_shown_logged_once_and_no_vote():
    error = "Unknown model 'nope'; choose one of: 1B, 3B"
    failed = Reply("", done=True, finish_reason="error", error=error)
    round_ = CompareRound(models=("nope", "nope"), message="Hi")
    round_.update(failed, failed)
    round_.end()
    assert round_.finished and round_.errors == [True, True] and round_.answers == [error, error]
    assert round_.failure() == error  # the same error once
    one_side = CompareRound(models=("1B", "nope"))
    one_side.update(written("Hello"), failed)
    one_side.end()
    assert one_side.failure() == error and one_side.problem().startswith("Answer B is an error")


# ---------------------------------------------------------------------- the vote
@pytest.mark.parametrize("change, expected", [
    ({}, None),
    ({"models": ()}, "Compare two answers first, then vote."),
    ({"models": ("1B", "1B")}, "Both sides were 1B: a vote needs two different models"),
    ({"finished": False}, "The answers are still being written: vote when both have finished."),
    ({"stopped": True, "finished": False}, "The answers were stopped before their end: compare again to vote."),
    ({"errors": [True, False]}, "Answer A is an error, so there is nothing to judge"),
    ({"answers": ["Paris.", " \n"]}, "Answer B is empty, so there is nothing to judge"),
])
def test_only_a_finished_round_of_two_models_with_two_answers_may_be_voted_on(change, expected):
    problem = finished_round(**change).problem()
    assert problem is None if expected is None else problem.startswith(expected)


def test_a_vote_is_recorded_once_and_reveals_the_models(tmp_path):
    log = VoteLog(tmp_path / "votes.jsonl")
    round_ = finished_round()
    assert round_.vote("tie", log) == "Thanks! You voted **tie**. A = **1B**, B = **3B**."
    record = json.loads(log.path.read_text())
    assert {key: record[key] for key in ("model_a", "model_b", "vote", "prompt", "answer_a", "answer_b", "blind")} == {
        "model_a": "1B", "model_b": "3B", "vote": "tie", "prompt": "Capital of France?", "answer_a": "Paris.",
        "answer_b": "It is Paris.", "blind": True}
    with pytest.raises(UserError, match=r"^Already voted: A = 1B, B = 3B\.$"):
        round_.vote("A", log)
    assert len(log.path.read_text().splitlines()) == 1


@pytest.mark.parametrize("choice", [None, "C", [1], "a", "both-bad"])
def test_a_choice_other_than_the_four_is_refused_in_one_line(choice, tmp_path):
    log = VoteLog(tmp_path / "votes.jsonl")
    round_ = finished_round()
    with pytest.raises(UserError) as refused:
        round_.vote(choice, log)
    assert str(refused.value).endswith(f"; choose one of: {', '.join(VOTES)}.") and not round_.voted
    assert not log.path.exists()


def test_a_round_that_cannot_be_voted_on_records_nothing(tmp_path):
    log = VoteLog(tmp_path / "votes.jsonl")
    for round_ in (CompareRound(), finished_round(finished=False), finished_round(stopped=True)):
        with pytest.raises(UserError):
            round_.vote("A", log)
        assert not round_.voted
    assert not log.path.exists()


def test_a_vote_the_log_refuses_leaves_the_round_open(tmp_path):
    class FullDisk:
        def record(self, *vote):
            raise UserError("The vote log cannot be written (disk full); try again later.")

    round_ = finished_round()
    with pytest.raises(UserError, match="disk full"):
        round_.vote("A", FullDisk())
    assert not round_.voted and round_.vote("A", VoteLog(tmp_path / "votes.jsonl")).startswith("Thanks!")


# ---------------------------------------------------------------------- as Gradio's State keeps it
def test_a_round_deep_copies_as_gradio_copies_a_states_first_value():
    first = CompareRound()
    copied = copy.deepcopy(first)
    assert copied == first and copied is not first and copied.answers is not first.answers
