"""Arena ratings from the Space's blind votes: Bradley–Terry ratings on an Elo-like scale with bootstrap 95%
intervals, and win rates and vote counts per pair.

    python scripts/compare.py leaderboard votes/           # the table, from a vote log or a folder of them
    from space.ratings import format_leaderboard, leaderboard, read_votes
    print(format_leaderboard(leaderboard(read_votes(["votes/votes.jsonl"]))))

The method is Chatbot Arena's (lm-sys/FastChat, fastchat/serve/monitor/elo_analysis.py: `compute_mle_elo` fits a
Bradley–Terry model to the battles by maximum likelihood, `get_bootstrap_result` refits it on the battles resampled
with replacement), written with numpy alone so the Space needs neither scikit-learn nor pandas for it:
- the model: P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)), ratings R on Elo's scale around 1000;
- the votes: "A" or "B" is a win for that side, a tie half a win each way (FastChat weighs them the same way);
  "both bad" says nothing about which is better, so it is counted and shown but not fitted (FastChat folds it into
  the ties); a vote of a model against itself is left out (the Space refuses them; a hand-edited log may hold one);
  a line that is not a vote is skipped and counted, never fatal;
- the fit: maximum likelihood by Newton's method on the log-strengths with a line search; the log-likelihood is
  concave there (D. R. Hunter, "MM algorithms for generalized Bradley–Terry models", Annals of Statistics 32(1),
  2004, whose MM iteration also climbs it, only far more slowly here). It is regularised lightly: every model is
  also credited with one tie against a fixed reference player rated 1000, so a one-sided record (3B won every vote)
  stays finite and the scale stays anchored at 1000;
- the intervals: ROUNDS refits on the votes resampled with replacement (a fixed seed), the 2.5th and 97.5th
  percentiles of each rating and of each pair's predicted win probability. Resampling N votes is a multinomial
  draw over the (pair, outcome) counts, so all rounds are fitted at once as arrays; the draw adds half a vote to
  each side of every pair, or a one-sided record would be redrawn one-sided every time and look certain.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from space.votes import VOTES

__all__ = ["Votes", "Record", "Rating", "Pair", "Leaderboard", "parse_votes", "read_votes", "fit_ratings",
           "win_probability", "leaderboard", "rating_rows", "pair_rows", "summary", "format_leaderboard",
           "RATING_HEADERS", "PAIR_HEADERS"]

BASE, SCALE = 1000.0, 400.0  # Elo's conventions, as FastChat's INIT_RATING and SCALE
ROUNDS = 1000  # bootstrap rounds, as FastChat's leaderboard
PRIOR_TIES = 1.0  # ties against the reference player credited to every model (the regularisation)
KEPT_PROBLEMS = 5  # corrupt lines described by name; the rest only counted


@dataclass(frozen=True)
class Votes:
    """The votes of one or more logs: (model_a, model_b, vote) each, and what was left out."""

    battles: tuple[tuple[str, str, str], ...] = ()
    corrupt: int = 0  # lines that are not a vote: not JSON, a field missing, an unknown vote
    self_pairs: int = 0  # votes of a model against itself
    problems: tuple[str, ...] = ()  # the first corrupt lines, "where: why"


def _problem(record) -> str | None:
    """Why a parsed log line is not a vote, or None when it is one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("model_a", "model_b"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"{key} missing or not a name"
    if record.get("vote") not in VOTES:
        return f"vote {str(record.get('vote'))[:40]!r} is none of {', '.join(VOTES)}"
    return None


def parse_votes(texts: Mapping[str, str]) -> Votes:
    """The votes in vote-log texts (name -> JSON Lines, as space/votes.py writes them); blank lines are ignored.

    >>> votes = parse_votes({"v.jsonl": '{"model_a": "1B", "model_b": "3B", "vote": "B"}\\n{oops\\n'
    ...                                   '{"model_a": "1B", "model_b": "1B", "vote": "A"}\\n'})
    >>> votes.battles, votes.corrupt, votes.self_pairs, votes.problems
    ((('1B', '3B', 'B'),), 1, 1, ('v.jsonl:2: not JSON',))
    """
    battles, problems, corrupt, self_pairs = [], [], 0, 0
    for name, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = _problem(record)
            except ValueError:  # json.JSONDecodeError, and a number too large to read
                problem = "not JSON"
            if problem:
                corrupt += 1
                if len(problems) < KEPT_PROBLEMS:
                    problems.append(f"{name}:{number}: {problem}")
            elif record["model_a"] == record["model_b"]:
                self_pairs += 1
            else:
                battles.append((record["model_a"], record["model_b"], record["vote"]))
    return Votes(tuple(battles), corrupt, self_pairs, tuple(problems))


def read_votes(paths: Iterable[str | Path]) -> Votes:
    """The votes of vote-log files and of folders of them (every *.jsonl below a folder, sorted)."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    return parse_votes({str(file): file.read_text(encoding="utf-8", errors="replace") for file in files})


# ---------------------------------------------------------------------- the fit
def _logistic(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x), written with tanh so that no x overflows."""
    return 0.5 * (1 + np.tanh(x / 2))


def _log_likelihood(theta: np.ndarray, wins: np.ndarray, prior_ties: float) -> np.ndarray:
    """The regularised log-likelihood of natural-log strengths `theta` (..., n), the reference's being 0."""
    pair = np.logaddexp(theta[..., :, None], theta[..., None, :])
    with_reference = np.logaddexp(theta, 0.0)
    return (wins * (theta[..., :, None] - pair)).sum((-1, -2)) + prior_ties / 2 * (theta - 2 * with_reference).sum(-1)


def fit_ratings(wins: np.ndarray, prior_ties: float = PRIOR_TIES, tolerance: float = 1e-9,
                max_iterations: int = 100) -> np.ndarray:
    """Bradley–Terry ratings for one win matrix or a stack of them, fitted all at once.

    `wins[..., i, j]`: how often model i beat model j (a tie adds 1/2 each way); every model also ties
    `prior_ties` times with a reference player rated BASE. Maximum likelihood by Newton's method on the
    natural-log strengths with a backtracking line search (the regularised log-likelihood is strictly concave,
    so every step climbs and the fit converges; Hunter's MM iteration climbs too but needs thousands of steps
    when the reference is outweighed by hundreds of votes). Returns BASE + SCALE * log10(strength), shaped like
    `wins` without its last axis.

    >>> ratings = fit_ratings(np.array([[0, 3], [1, 0]]))   # 3 wins to 1, pulled a little towards even
    >>> ratings.round(1), round(float(win_probability(*ratings)), 2)
    (array([1082.4,  917.6]), 0.72)
    >>> bool(np.isfinite(fit_ratings(np.array([[0, 50], [0, 0]]))).all())   # a one-sided record stays finite
    True
    """
    wins = np.asarray(wins, dtype=float) * (1 - np.eye(np.shape(wins)[-1]))  # a model against itself says nothing
    games = wins + np.swapaxes(wins, -1, -2)
    won = wins.sum(-1) + prior_ties / 2
    theta = np.zeros(wins.shape[:-1])
    for _ in range(max_iterations):
        beats = _logistic(theta[..., :, None] - theta[..., None, :])  # P(i beats j)
        beats_reference = _logistic(theta)
        gradient = won - (games * beats).sum(-1) - prior_ties * beats_reference
        curvature = games * beats * (1 - beats)
        information = -curvature  # minus the Hessian: positive definite, thanks to the reference's ties
        diagonal = curvature.sum(-1) + prior_ties * beats_reference * (1 - beats_reference)
        information[..., range(theta.shape[-1]), range(theta.shape[-1])] = diagonal
        step = np.linalg.solve(information, gradient[..., None])[..., 0]
        if np.abs(step).max(initial=0.0) < tolerance:
            break
        current, size = _log_likelihood(theta, wins, prior_ties), np.ones(theta.shape[:-1])
        climb = (gradient * step).sum(-1)
        noise = 1e-12 * (1 + np.abs(current))  # near the top a climb this small is rounding: take the full step
        for _ in range(50):  # halve the step where it does not climb enough (Armijo's rule)
            reached = _log_likelihood(theta + size[..., None] * step, wins, prior_ties) + noise
            short = reached < current + 1e-4 * size * climb
            if not short.any():
                break
            size = np.where(short, size / 2, size)
        theta = theta + size[..., None] * step
    return BASE + SCALE * theta / np.log(10)


def win_probability(rating: np.ndarray | float, opponent: np.ndarray | float) -> np.ndarray | float:
    """P(a model rated `rating` beats one rated `opponent`) under the fitted model.

    >>> round(win_probability(1100.0, 1000.0), 3)
    0.64
    """
    return 1 / (1 + 10 ** ((opponent - rating) / SCALE))


# ---------------------------------------------------------------------- the leaderboard
@dataclass(frozen=True, kw_only=True)
class Record:
    """Votes won, tied, lost and judged both bad; only the first three count ("both bad" is not fitted)."""

    wins: int
    ties: int
    losses: int
    both_bad: int

    @property
    def votes(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float | None:
        """Wins plus half the ties, per counted vote."""
        return (self.wins + self.ties / 2) / self.votes if self.votes else None


@dataclass(frozen=True, kw_only=True)
class Rating(Record):
    """One model's row: its rating and 95% interval (None when no vote of it counts), and its record."""

    model: str
    rating: float | None
    lower: float | None
    upper: float | None


@dataclass(frozen=True, kw_only=True)
class Pair(Record):
    """Two models' record against each other (the better-rated first), and the fit's P(first beats second) with its
    95% interval (None when only "both bad" votes were cast)."""

    model: str
    opponent: str
    expected: float | None
    lower: float | None
    upper: float | None


@dataclass(frozen=True)
class Leaderboard:
    ratings: list[Rating]  # best first; models with no counted vote last
    pairs: list[Pair]  # most voted first
    votes: Votes = field(default_factory=Votes)
    rounds: int = ROUNDS

    @property
    def counted(self) -> int:
        return sum(pair.votes for pair in self.pairs)

    @property
    def both_bad(self) -> int:
        return sum(pair.both_bad for pair in self.pairs)


def _tally(battles) -> tuple[list[str], dict[tuple[int, int], np.ndarray]]:
    """The models (sorted) and, for each pair (i, j) with i < j, its counts [i won, j won, ties, both bad]."""
    models = sorted({model for a, b, _ in battles for model in (a, b)})
    index = {model: number for number, model in enumerate(models)}
    tally: dict[tuple[int, int], np.ndarray] = {}
    for a, b, vote in battles:
        i, j = sorted((index[a], index[b]))
        winner = {"A": a, "B": b}.get(vote)
        column = {"tie": 2, "both bad": 3}.get(vote, 0 if winner == models[i] else 1)
        tally.setdefault((i, j), np.zeros(4, dtype=int))[column] += 1
    return models, tally


def _bootstrap_fits(pairs: list[tuple[int, int]], counts: np.ndarray, n: int, rounds: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fit on the counted votes and on `rounds` resamples of them: ratings (n,) and (rounds, n).

    `counts[k]`: pair k's [i won, j won, ties]. The resamples draw as many votes as there are from the vote shares
    with half a vote added to each side of every pair: a plain bootstrap of a one-sided record (7 wins in 7) draws
    7 in 7 every time and reports no uncertainty at all; with thousands of votes the half vote changes nothing.
    """
    effect = np.zeros((len(pairs), 3, n, n))  # what one vote of each kind adds to the win matrix
    for k, (i, j) in enumerate(pairs):
        effect[k, 0, i, j] = effect[k, 1, j, i] = 1
        effect[k, 2, i, j] = effect[k, 2, j, i] = 0.5
    effect = effect.reshape(len(pairs) * 3, n, n)
    smoothed = (counts + np.array([0.5, 0.5, 0.0])).ravel()
    drawn = np.random.default_rng(seed).multinomial(int(counts.sum()), smoothed / smoothed.sum(), size=rounds)
    return (fit_ratings(np.tensordot(counts.ravel().astype(float), effect, axes=1)),
            fit_ratings(np.tensordot(drawn.astype(float), effect, axes=1)))


def leaderboard(votes: Votes, rounds: int = ROUNDS, seed: int = 0) -> Leaderboard:
    """Ratings with bootstrap 95% intervals, and each pair's record, from `votes`.

    >>> board = leaderboard(parse_votes({"v": '{"model_a": "1B", "model_b": "3B", "vote": "B"}\\n' * 7 +
    ...                                        '{"model_a": "3B", "model_b": "1B", "vote": "both bad"}\\n'}))
    >>> [(r.model, r.votes, r.wins, r.both_bad) for r in board.ratings]
    [('3B', 7, 7, 1), ('1B', 7, 0, 1)]
    >>> pair = board.pairs[0]; (pair.model, pair.win_rate, pair.lower < pair.expected <= pair.upper < 1)
    ('3B', 1.0, True)
    """
    models, tally = _tally(votes.battles)
    counted = sorted(pair for pair, counts in tally.items() if counts[:3].any())
    playing = sorted({model for pair in counted for model in pair})  # the models with a counted vote
    ratings, bootstrap = np.full(len(models), np.nan), np.full((rounds, len(models)), np.nan)
    if counted:
        local = {model: number for number, model in enumerate(playing)}
        ratings[playing], bootstrap[:, playing] = _bootstrap_fits(
            [(local[i], local[j]) for i, j in counted], np.array([tally[pair][:3] for pair in counted]),
            len(playing), rounds, seed)

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values, [2.5, 97.5])
        return float(low), float(high)

    rows = []
    for model in range(len(models)):
        won = tied = lost = both_bad = 0
        for (i, j), (i_won, j_won, ties, bad) in tally.items():
            if model in (i, j):
                won, lost = won + (i_won if model == i else j_won), lost + (j_won if model == i else i_won)
                tied, both_bad = tied + ties, both_bad + bad
        rating, (lower, upper) = (None, (None, None)) if model not in playing else \
            (float(ratings[model]), interval(bootstrap[:, model]))
        rows.append(Rating(model=models[model], rating=rating, lower=lower, upper=upper, wins=int(won), ties=int(tied),
                           losses=int(lost), both_bad=int(both_bad)))
    order = sorted(range(len(models)), key=lambda m: (rows[m].rating is None, -(rows[m].rating or 0), models[m]))
    rank = {model: position for position, model in enumerate(order)}
    pairs = []
    for (i, j), (i_won, j_won, ties, bad) in tally.items():
        first, second = (i, j) if rank[i] < rank[j] else (j, i)
        won, lost = (i_won, j_won) if first == i else (j_won, i_won)
        expected = lower = upper = None
        if (i, j) in counted:
            expected = float(win_probability(ratings[first], ratings[second]))
            lower, upper = interval(win_probability(bootstrap[:, first], bootstrap[:, second]))
        pairs.append(Pair(model=models[first], opponent=models[second], expected=expected, lower=lower, upper=upper,
                          wins=int(won), ties=int(ties), losses=int(lost), both_bad=int(bad)))
    pairs.sort(key=lambda pair: (-(pair.votes + pair.both_bad), pair.model, pair.opponent))
    return Leaderboard([rows[m] for m in order], pairs, votes, rounds)


# ---------------------------------------------------------------------- tables
RATING_HEADERS = ["Rank", "Model", "Rating", "95% interval", "Votes", "Win rate", "Won / tied / lost", "Both bad"]
PAIR_HEADERS = ["Model", "Opponent", "Votes", "Won / tied / lost", "Both bad", "Win rate", "Fitted P(win) [95%]"]


def _number(value: float | None, pattern: str = "{:.0f}") -> str:
    return "–" if value is None or math.isnan(value) else pattern.format(value)


def rating_rows(board: Leaderboard) -> list[list[str]]:
    """The ratings table's rows (under RATING_HEADERS), as text."""
    return [[str(rank) if row.rating is not None else "–", row.model, _number(row.rating),
             f"{_number(row.lower)} – {_number(row.upper)}" if row.rating is not None else "–", str(row.votes),
             _number(row.win_rate, "{:.0%}"), f"{row.wins} / {row.ties} / {row.losses}", str(row.both_bad)]
            for rank, row in enumerate(board.ratings, 1)]


def pair_rows(board: Leaderboard) -> list[list[str]]:
    """The pairs table's rows (under PAIR_HEADERS), as text."""
    return [[pair.model, pair.opponent, str(pair.votes), f"{pair.wins} / {pair.ties} / {pair.losses}",
             str(pair.both_bad), _number(pair.win_rate, "{:.0%}"),
             f"{_number(pair.expected, '{:.0%}')} [{_number(pair.lower, '{:.0%}')} – {_number(pair.upper, '{:.0%}')}]"
             if pair.expected is not None else "–"] for pair in board.pairs]


def summary(board: Leaderboard) -> str:
    """One line: what was counted and what was left out.

    >>> summary(leaderboard(parse_votes({"v": '{"model_a": "1B", "model_b": "3B", "vote": "tie"}\\nx\\n'})))
    '1 vote counted (ties count half a win each way), 0 both bad (shown, not rated), 1 corrupt line skipped
     (first: v:2: not JSON); 95% intervals from 1000 bootstrap rounds.'
    """
    votes = board.votes
    parts = [f"{board.counted} vote{'s' * (board.counted != 1)} counted (ties count half a win each way)",
             f"{board.both_bad} both bad (shown, not rated)"]
    if votes.self_pairs:
        parts.append(f"{votes.self_pairs} of a model against itself left out")
    if votes.corrupt:
        parts.append(f"{votes.corrupt} corrupt line{'s' * (votes.corrupt != 1)} skipped (first: {votes.problems[0]})")
    return ", ".join(parts) + f"; 95% intervals from {board.rounds} bootstrap rounds."


def _markdown(headers: list[str], rows: list[list[str]]) -> list[str]:
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731 - a model's label may hold a '|'
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(map(cell, row)) + " |" for row in rows)]


def format_leaderboard(board: Leaderboard) -> str:
    """The leaderboard as Markdown: the ratings, the pairs, and the summary line."""
    if not board.ratings:
        return "No votes yet. " + summary(board)
    return "\n".join(["## Ratings", "", *_markdown(RATING_HEADERS, rating_rows(board)), "", "## Pairs", "",
                      *_markdown(PAIR_HEADERS, pair_rows(board)), "", summary(board)])
