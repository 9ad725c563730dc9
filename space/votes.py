"""The Compare tab's votes: one JSON line each, optionally pushed to a Hub dataset by a CommitScheduler.

    from space.votes import VoteLog
    VoteLog("votes/votes.jsonl").record("1B", "3B", "A", "Hi", "Hello!", "Hey.", blind=True)
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from common.cli import one_line
from space.replies import UserError
from space.round import VOTES

__all__ = ["VOTES", "VoteLog", "unique_vote_file"]


def unique_vote_file(folder: Path) -> Path:
    """A vote file of this process's own in `folder`: a restarted Space starts with an empty local folder,
    and a CommitScheduler pushing a fixed file name would overwrite the votes already on the Hub."""
    return Path(folder) / f"votes-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.jsonl"


def _commit_scheduler(**arguments):
    from huggingface_hub import CommitScheduler  # only Spaces that push votes need the Hub client

    return CommitScheduler(**arguments)


class VoteLog:
    """Compare-tab votes, one JSON line each, optionally pushed to a Hub dataset every few minutes.

    With `hub_repo_id`, huggingface_hub's CommitScheduler uploads the vote file's folder to `votes/` in that
    dataset repo: give the log a folder of its own, and a file name from unique_vote_file().
    """

    def __init__(self, path: Path, hub_repo_id: str | None = None, every_minutes: float = 10,
                 scheduler_factory: Callable[..., object] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hub_repo_id = hub_repo_id
        self.scheduler = None
        self._lock = threading.Lock()
        if hub_repo_id:
            self.scheduler = (scheduler_factory or _commit_scheduler)(
                repo_id=hub_repo_id, repo_type="dataset", folder_path=self.path.parent, path_in_repo="votes",
                every=every_minutes)
            # The scheduler's own lock, as its docs say: it must not read the file while a line is half written.
            self._lock = self.scheduler.lock

    def notice(self) -> str:
        """What a vote records and where it goes, in one line for the vote buttons."""
        where = (f"this Space's vote log, published in the Hub dataset {self.hub_repo_id}" if self.hub_repo_id
                 else "this Space's vote log")
        return (f"A vote records your message, both answers, the two model names and your choice (no account, no "
                f"address) in {where}; the Leaderboard is computed from it.")

    def record(self, model_a: str, model_b: str, vote: str, prompt: str, answer_a: str, answer_b: str,
               blind: bool) -> dict:
        """Append one vote and return it; UserError for a vote other than A, B, tie, both bad, or for a model
        against itself."""
        if not isinstance(vote, str) or vote not in VOTES:
            raise UserError(f"Unknown vote '{one_line(vote, 40)}'; choose one of: {', '.join(VOTES)}")
        if model_a == model_b:
            raise UserError(f"Both sides were {one_line(model_a, 60)}: a vote needs two different models.")
        entry = dict(timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"), model_a=model_a,
                     model_b=model_b, vote=vote, prompt=prompt, answer_a=answer_a, answer_b=answer_b,
                     blind=bool(blind))
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as file:
            file.write(line)
        return entry
