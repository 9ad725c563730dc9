"""Preference pairs for DPO (train/preferences.py): the Space's vote log becomes pairs, bad rows are one line each,
the DPO settings are validated before anything loads, and the CPU log-probabilities match TRL's definition."""

import json
import random
from pathlib import Path

import pytest

from common.cli import UsageError
from conftest import REPO, run_cli
from space.votes import VoteLog
from train.config import TrainConfig, config_from_args, load_preset
from train.preferences import BUILTIN_PAIRS, pair_from_row, read_pairs, split_pairs

BUILTIN = [json.loads(line) for line in BUILTIN_PAIRS.read_text().splitlines()]


def write_vote_log(folder: Path, seed: int = 0) -> dict:
    """A vote log as the Space writes it (space/votes.py's VoteLog), from the built-in pairs: each pair voted once
    with the better answer on a random side, plus ties, 'both bad' votes and repeated votes. Returns what it wrote."""
    rng = random.Random(seed)
    log = VoteLog(folder / "votes-20261201T000000-aaaaaaaa.jsonl")
    counts = {"pairs": 0, "ties": 0, "both_bad": 0, "duplicates": 0}
    for index, pair in enumerate(BUILTIN):
        question, good, bad = (pair["prompt"][0]["content"], pair["chosen"][0]["content"],
                               pair["rejected"][0]["content"])
        flip = rng.random() < 0.5
        answers = (bad, good) if flip else (good, bad)
        log.record("1B FineTome", "3B FineTome", "B" if flip else "A", question, *answers, blind=True)
        counts["pairs"] += 1
        if index % 8 == 0:  # the same compare voted again: the same pair
            log.record("1B FineTome", "3B FineTome", "B" if flip else "A", question, *answers, blind=True)
            counts["duplicates"] += 1
        if index % 6 == 0:
            log.record("1B base", "3B base", "tie", question, good, good + " Indeed.", blind=True)
            counts["ties"] += 1
        if index % 10 == 0:
            log.record("1B base", "3B FineTome", "both bad", question, bad, bad + "!", blind=False)
            counts["both_bad"] += 1
    return counts


def test_a_vote_log_written_by_the_space_becomes_pairs(tmp_path):
    written = write_vote_log(tmp_path / "votes")
    found = read_pairs([str(tmp_path / "votes")])
    assert len(found.pairs) == written["pairs"] == len(BUILTIN)
    assert (found.ties, found.both_bad, found.duplicates, found.bad) == (
        written["ties"], written["both_bad"], written["duplicates"], 0)
    assert found.votes == found.rows == sum(written.values())
    # Whichever side the better answer was shown on, the winner is chosen: the pairs are the built-in ones.
    key = {json.dumps(pair, sort_keys=True) for pair in BUILTIN}
    assert all(json.dumps(pair, sort_keys=True) in key for pair in found.pairs)
    summary = "\n".join(found.summary())
    assert f"{written['ties']} ties and {written['both_bad']} 'both bad' skipped" in summary
    assert f"{written['duplicates']} duplicates removed" in summary


def test_bad_rows_are_one_line_each_naming_file_line_and_problem(tmp_path):
    votes = tmp_path / "votes.jsonl"
    VoteLog(votes).record("1B", "3B", "A", "Hi", "Hello!", "Go away.", blind=True)
    with votes.open("a") as file:
        file.write("{not json\n")
        file.write(json.dumps({"model_a": "1B", "model_b": "3B", "vote": "C", "prompt": "Hi", "answer_a": "x",
                               "answer_b": "y"}) + "\n")
        file.write("\n")
        file.write(json.dumps({"model_a": "1B", "model_b": "3B", "vote": "A", "prompt": "Hi", "answer_a": "Same",
                               "answer_b": "Same"}) + "\n")
        file.write(json.dumps({"prompt": "Hi", "chosen": "Hello!"}) + "\n")
        file.write(json.dumps({"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "a", "rejected": "b"}) + "\n")
    found = read_pairs([str(votes)])
    assert len(found.pairs) == 1 and found.bad == 5
    assert found.problems == [
        f"{votes} line 2: unparseable JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{votes} line 3: unknown vote 'C' (expected A, B, tie or both bad)",
        f"{votes} line 5: chosen and rejected are the same answer",
        f"{votes} line 6: missing field 'rejected' (a pair needs prompt, chosen, rejected)",
        f"{votes} line 7: 'prompt' must end with a user turn (the answers reply to it)",
    ]
    assert all("\n" not in line for line in found.summary())


def test_nothing_usable_is_one_clear_error(tmp_path):
    from train.conversations import DataError

    votes = tmp_path / "votes.jsonl"
    VoteLog(votes).record("1B", "3B", "tie", "Hi", "Hello!", "Hey!", blind=True)
    with pytest.raises(DataError, match=r"no usable preference pairs in .*: 1 rows, 0 bad, 1 ties"):
        read_pairs([str(votes)])


@pytest.mark.parametrize("row", [
    {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": [{"from": "human", "value": "Hi"}], "chosen": [{"from": "gpt", "value": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
])
def test_pair_rows_in_several_spellings_become_trls_conversational_format(row):
    assert pair_from_row(row) == {"prompt": [{"role": "user", "content": "Hi"}],
                                  "chosen": [{"role": "assistant", "content": "Hello!"}],
                                  "rejected": [{"role": "assistant", "content": "Go away."}]}


def test_splits_are_fixed_by_the_seed():
    first = split_pairs(BUILTIN, seed=3407, heldout=12, evaluation=4)
    assert [len(part) for part in first] == [12, 4, 32]
    assert split_pairs(BUILTIN, seed=3407, heldout=12, evaluation=4) == first
    assert split_pairs(BUILTIN, seed=1, heldout=12, evaluation=4)[0] != first[0]


@pytest.fixture
def fake_sft_adapter(tmp_path) -> Path:
    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return adapter


@pytest.mark.parametrize("name", ["tiny-dpo", "demo-dpo", "1b-dpo", "3b-dpo"])
def test_every_dpo_preset_validates_with_an_sft_adapter(name, fake_sft_adapter):
    # The 1b/3b presets read the Space's vote folder (votes/), which only a Space's run has: given here.
    config = TrainConfig(**{**load_preset(name), "sft_adapter": str(fake_sft_adapter), "pairs": [str(BUILTIN_PAIRS)]})
    assert config.stage == "dpo" and config.pairs and 0 < config.beta
    if name in ("1b-dpo", "3b-dpo"):  # the real models: a learning rate that stays near the SFT model
        assert 1e-6 <= config.learning_rate <= 5e-6


def test_dpo_problems_are_all_reported_at_once(fake_sft_adapter, tmp_path):
    (fake_sft_adapter.parent / "run.json").write_text(json.dumps({"config": {"model_name": "builtin:tiny-llama-3.2"}}))
    with pytest.raises(UsageError) as caught:
        config_from_args(["--preset", "1b-dpo", "--sft-adapter", str(fake_sft_adapter), "--beta", "0",
                          "--pairs", "missing.jsonl,notes.txt", "--loss-type", "kto", "--max-prompt-length", "4",
                          "--output-dir", str(fake_sft_adapter.parent)])
    joined = "\n".join(caught.value.problems)
    for expected in ("--beta 0.0: must be > 0", "--pairs 'missing.jsonl': not found",
                     "--pairs 'notes.txt': not a file, a folder of vote logs, or a Hub dataset id",
                     "--loss-type 'kto': choose one of: sigmoid, ipo", "--max-prompt-length 4: must be a whole number >= 16",
                     "--model-name 'unsloth/Llama-3.2-1B-Instruct': the SFT adapter was trained on "
                     "'builtin:tiny-llama-3.2'", "is the SFT run's own folder"):
        assert expected in joined
    assert len(caught.value.problems) == 7


def test_dpo_settings_outside_the_dpo_stage_are_refused(fake_sft_adapter):
    with pytest.raises(UsageError, match="--sft-adapter: only used with --stage dpo"):
        config_from_args(["--preset", "tiny", "--sft-adapter", str(fake_sft_adapter)])


def test_cli_without_a_finished_sft_run_is_one_line(tmp_path):
    result = run_cli("train/run.py", "--preset", "tiny-dpo", "--sft-adapter", str(tmp_path / "nothing"),
                     "--output-dir", str(tmp_path / "dpo"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --sft-adapter ") and "no finished adapter there" in line
    assert not (tmp_path / "dpo").exists()


def test_cpu_log_probabilities_match_log_softmax_values_and_gradients():
    import torch

    from train.dpo import TorchChunkedLogProb

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    got, entropy, squares, mean_logits, top1 = TorchChunkedLogProb.apply(hidden, weight, None, targets, 1.0, 4096,
                                                                         None, 1.0, outputs)
    logits = hidden @ weight.t()
    expected = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(got, expected, atol=1e-5) and squares is None
    assert torch.equal(top1, logits.argmax(1) == targets)
    assert torch.allclose(mean_logits, logits.mean(1), atol=1e-5)
    grads = torch.autograd.grad(got.sum(), (hidden, weight))
    reference = torch.autograd.grad(expected.sum(), (hidden, weight))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, reference))


def test_builtin_pairs_ship_with_the_repository():
    assert BUILTIN_PAIRS.is_relative_to(REPO / "train" / "data") and len(BUILTIN) >= 40
    assert read_pairs([str(BUILTIN_PAIRS)]).counts()["bad"] == 0
