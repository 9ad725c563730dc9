"""One compare of the Compare tab, as a small typed object with its rules: which model answers on which side (named,
shuffled, or drawn when blind), both answers as they stream, whether the round finished, was stopped or failed, and
whether it may be voted on, and why not. No Gradio: the app keeps a session's CompareRound in a gr.State (Gradio
keeps a State's value as it is, deep-copying only the initial one), and the Stop button and the vote act on it.

    round_ = CompareRound.start("Hi", "1B", "3B", blind=True, random_pair=False, labels=engine.labels)
    for reply_a, reply_b in engine.stream_compare(*round_.models, "Hi"):
        round_.update(reply_a, reply_b)      # round_.panels(), round_.reveal(): what the tab shows
    round_.end()
    round_.vote("A", VoteLog("votes/votes.jsonl"))   # 'Thanks! You voted **A**. A = **3B**, B = **1B**.'
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.cli import one_line
from space.replies import UserError
from space.sessions import flag, shown_message

__all__ = ["VOTES", "CompareRound", "fair_pair", "WRITING", "STOPPED", "BLIND"]

VOTES = ("A", "B", "tie", "both bad")  # the choices a vote may be, in the order the Compare tab shows them
WRITING = "Both answers are being written: vote when they are done."
STOPPED = "Stopped: compare again to vote."  # the reveal line of a stopped compare (cut answers get no vote)
BLIND = "Blind: vote to see which model is which."


def fair_pair(labels: Sequence[str], rng: random.Random | None = None) -> list[str]:
    """Two different models for a blind compare, drawn as Chatbot Arena draws its anonymous battles: each unordered
    pair equally often, either model on side A with even odds (random.sample draws an ordered pair uniformly).

    >>> sorted(fair_pair(["1B", "3B"]))
    ['1B', '3B']
    """
    return (rng or random).sample(list(labels), 2)


@dataclass
class CompareRound:
    """One compare, from its start to its vote. A round with no models is no compare at all (a session's first
    state, or a compare refused before it began): there is nothing to vote on.

    A vote means something only for a finished round of two different models whose both answers are real answers:
    not a round still streaming or stopped (cut answers), not one where either side is an error message or empty,
    not a model against itself (those would skew the leaderboard and store error texts as answers), and once only.

    >>> from space.replies import Reply
    >>> round_ = CompareRound.start("Hi", "1B", "3B", blind=False, random_pair=False, labels=["1B", "3B"])
    >>> round_.update(Reply("Hello"), Reply("Hey")); round_.problem()
    'The answers are still being written: vote when both have finished.'
    >>> round_.update(Reply("Hello!", done=True, finish_reason="stop"), Reply("Hey.", done=True, finish_reason="stop"))
    >>> round_.end(); round_.reveal(), round_.problem()
    ('A = 1B, B = 3B', None)
    """

    models: tuple = ()  # side A's model, then side B's, as sent to the engine (shuffled or drawn when blind)
    message: object = ""  # the message as the user sent it (the vote log records it)
    blind: bool = False
    answers: list = field(default_factory=lambda: ["", ""])  # each side's text so far, or its error message
    errors: list = field(default_factory=lambda: [False, False])  # whether each side's answer is an error message
    finished: bool = False  # both answers came to their end: only now may the round be voted on
    stopped: bool = False  # Stop (or a side's cancel) cut the answers: the round ends, never to be voted on
    voted: bool = False

    @classmethod
    def start(cls, message, model_a, model_b, blind, random_pair, labels: Sequence[str],
              rng: random.Random | None = None) -> CompareRound:
        """A round about to stream. `blind` and `random_pair` are the checkboxes as a client sent them (UserError,
        naming the box, for anything but true, false or unset). Blind, the sides are shuffled; blind with
        `random_pair` and more than two `labels`, the pair is drawn fairly (fair_pair) instead of
        taken from the dropdowns. The models themselves are the engine's to check.

        >>> CompareRound.start("Hi", "1B", "3B", blind=False, random_pair=True, labels=["1B", "3B", "8B"]).models
        ('1B', '3B')
        >>> sorted(CompareRound.start("Hi", "1B", "1B", True, False, ["1B", "3B", "8B"]).models)  # blind: shuffled
        ['1B', '1B']
        >>> len(set(CompareRound.start("Hi", "1B", "1B", True, True, ["1B", "3B", "8B"]).models))  # drawn: two
        2
        >>> CompareRound.start("Hi", "1B", "3B", blind="yes", random_pair=False, labels=["1B", "3B"])
        Traceback (most recent call last):
        space.replies.UserError: Blind must be true or false, not 'yes'.
        """
        blind, random_pair = flag(blind, "Blind"), flag(random_pair, "Random pair")
        rng = rng or random.Random()
        sides = [model_a, model_b]
        if blind and random_pair and len(labels) > 2:
            sides = fair_pair(labels, rng)
        elif blind:
            rng.shuffle(sides)
        return cls(models=tuple(sides), message=message, blind=blind)

    # -------------------------------------------------------------- while it streams
    @property
    def shown(self) -> tuple:
        """The sides' names on screen: 'Model A' and 'Model B' while blind, else the models."""
        return ("Model A", "Model B") if self.blind else tuple(self.models)

    def update(self, reply_a, reply_b) -> None:
        """The answers' newest states (space.replies.Reply): each side's text, or its error message. A side that was
        cancelled (the Stop button) stops the round."""
        replies = (reply_a, reply_b)
        self.answers = [reply.error or reply.text for reply in replies]
        self.errors = [reply.error is not None for reply in replies]
        if any(reply.finish_reason == "cancelled" for reply in replies):
            self.stopped = True

    def stop(self) -> bool:
        """The Stop button: a round not yet finished is stopped at once (Gradio may cancel the compare's event
        before its last update says so); False, and nothing changes, for a round already finished (a late click:
        its vote still counts) or no round at all.

        >>> done = CompareRound(models=("1B", "3B"), finished=True)
        >>> done.stop(), done.stopped, CompareRound().stop()
        (False, False, False)
        """
        if self.finished or not self.models:
            return False
        self.stopped = True
        return True

    def end(self) -> None:
        """Both answers have ended: the round is finished, unless it was stopped (then it ends unfinished: cut answers
        are never voted on). A side that ended in an error still finishes the round (problem() says why it cannot
        be voted on)."""
        self.finished = not self.stopped

    def failure(self) -> str | None:
        """The errors the answers ended in, each once, on one line (for the log); None when both are answers.

        >>> CompareRound(models=("1B", "x"), answers=["Hi", "Unknown model 'x'"], errors=[False, True]).failure()
        "Unknown model 'x'"
        """
        failed = [answer for answer, error in zip(self.answers, self.errors) if error]
        return "; ".join(dict.fromkeys(failed)) or None

    # -------------------------------------------------------------- what the tab shows
    def panels(self) -> tuple[list[dict], list[dict]]:
        """The two chat panels: the user's message (as text) above each side's answer.

        >>> CompareRound(models=("1B", "3B"), message="Hi", answers=["Hello", "Hey"]).panels()[1]
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hey'}]
        """
        user = {"role": "user", "content": shown_message(self.message)}
        return tuple([user, {"role": "assistant", "content": answer}] for answer in self.answers)

    def reveal(self) -> str:
        """The line under the answers: stopped, still being written, or (finished) which model is which, unless
        blind: then only a vote reveals it."""
        if not self.models:
            return ""
        if self.stopped:
            return STOPPED
        if not self.finished:
            return WRITING
        return BLIND if self.blind else f"A = {self.models[0]}, B = {self.models[1]}"

    # -------------------------------------------------------------- the vote
    def problem(self) -> str | None:
        """Why this round cannot be voted on, in one line; None when it can.

        >>> CompareRound(models=("1B", "1B"), answers=["Hi", "Hello"], finished=True).problem()
        'Both sides were 1B: a vote needs two different models; pick another Model B and compare again.'
        >>> CompareRound(models=("1B", "3B"), answers=["Hi", " "], finished=True).problem()
        'Answer B is empty, so there is nothing to judge: compare again.'
        """
        if not self.models:
            return "Compare two answers first, then vote."
        model_a, model_b = self.models
        if model_a == model_b:
            return (f"Both sides were {model_a}: a vote needs two different models; pick another Model B and compare "
                    "again.")
        if self.stopped:
            return "The answers were stopped before their end: compare again to vote."
        if not self.finished:
            return "The answers are still being written: vote when both have finished."
        for side, answer, error in zip("AB", self.answers, self.errors):
            if error or not str(answer).strip():
                what = "an error" if error else "empty"
                return f"Answer {side} is {what}, so there is nothing to judge: compare again."
        return None

    def vote(self, choice, log) -> str:
        """Record `choice` (as a client sent it) in `log` (a space.votes.VoteLog) and return the line that thanks and
        reveals the models; UserError, in one line, when the choice is not one of VOTES, the round was voted on
        already or cannot be voted on (problem()), or the log refuses it.

        >>> class Log:
        ...     def record(self, *vote): print(vote)
        >>> round_ = CompareRound(models=("3B", "1B"), message="Hi", blind=True, answers=["a", "b"], finished=True)
        >>> round_.vote("A", Log())
        ('3B', '1B', 'A', 'Hi', 'a', 'b', True)
        'Thanks! You voted **A**. A = **3B**, B = **1B**.'
        >>> round_.vote("B", Log())
        Traceback (most recent call last):
        space.replies.UserError: Already voted: A = 3B, B = 1B.
        >>> round_.vote("C", Log())
        Traceback (most recent call last):
        space.replies.UserError: Unknown vote 'C'; choose one of: A, B, tie, both bad.
        """
        if not isinstance(choice, str) or choice not in VOTES:
            raise UserError(f"Unknown vote '{one_line(choice, 40)}'; choose one of: {', '.join(VOTES)}.")
        if self.voted:
            raise UserError(f"Already voted: A = {self.models[0]}, B = {self.models[1]}.")
        if problem := self.problem():
            raise UserError(problem)
        log.record(self.models[0], self.models[1], choice, self.message, self.answers[0], self.answers[1],
                   self.blind)
        self.voted = True
        return f"Thanks! You voted **{choice}**. A = **{self.models[0]}**, B = **{self.models[1]}**."
