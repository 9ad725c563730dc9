"""scripts/compare.py and its package compare/: the assistant-token mask against training's own labels, the real
CLI on the tiny model's q4_k_m and q8_0 GGUFs, the Hub boundary (offline, 404, glob), and every user mistake (exit 2,
one line each, nothing written). The package's doctests run with pytest's (pytest.ini's testpaths)."""

import dataclasses
import json
import math

import httpx
import pytest
from llama_cpp import Llama

import compare.cli
from common.cli import UsageError, field_default
from compare.config import CompareConfig, build_parser, config_from_args
from compare.heldout import GgufChatTemplate, conversation_tokens, load_heldout
from compare.prompts import DEFAULT_PROMPTS, Prompt, generate_answers, load_prompts
from conftest import REPO, TINY_GGUF_NAME, run_cli
from hub_recorder import hub_error
from space.catalog import catalog_from_paths
from space.engine import DEFAULT_N_CTX, Engine
from space.replies import Sampling
from train.conversations import IGNORE_INDEX, prepare, tokenize_conversation

EOT_ID = 128009
PROMPTS = [  # one plain prompt, and one with a system prompt and an earlier exchange
    {"id": "plain", "category": "explain", "prompt": "Explain what a hash map is."},
    {"id": "with-history", "category": "multi-turn", "system": "Answer briefly.",
     "history": [{"role": "user", "content": "I like tea."}, {"role": "assistant", "content": "Noted!"}],
     "prompt": "Which tea should I try next?"},
]


def test_shipped_prompts_load_and_cover_the_formats():
    prompts = load_prompts(DEFAULT_PROMPTS)
    assert len(prompts) >= 8 and len({prompt.id for prompt in prompts}) == len(prompts)
    assert any(prompt.system for prompt in prompts) and any(prompt.history for prompt in prompts)


# ---------------------------------------------------------------------- the mask is training's
EXTRA_CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Café? 東京? 🚀"},
     {"role": "assistant", "content": "  Oui: café, 東京 (Tōkyō), 🚀🚀.\n\n"}],
    [{"role": "user", "content": "Code, please."},
     {"role": "assistant", "content": "```python\ndef f(x):\n\treturn  x  *  2   \n```\n\n\nDone.   "}],
]


def test_assistant_mask_matches_training_labels(tiny_gguf, tokenizer):
    """The GGUF's tokens and mask equal train/conversations.py's input_ids and labels (the HF tokenizer's offsets) for every
    default held-out conversation, plus system prompts, several turns, non-ASCII text and whitespace edges."""
    engine = Engine(catalog_from_paths([str(tiny_gguf)]), n_ctx=512, cache_bytes=0)
    label = engine.labels[0]
    llm, template = engine.get(label), GgufChatTemplate(engine.chat_formatter(label))
    heldout = load_heldout(None).conversations
    assert len(heldout) == 10
    scored = 0
    for messages in heldout + EXTRA_CONVERSATIONS:
        tokens, mask = conversation_tokens(llm, template, messages)
        reference = tokenize_conversation(messages, tokenizer)
        assert tokens == reference["input_ids"]
        assert [token if keep else IGNORE_INDEX for token, keep in zip(tokens, mask)] == reference["labels"]
        # Each assistant turn's labelled run ends with its <|eot_id|>, and only assistant turns are labelled.
        ends = [tokens[i] for i in range(len(tokens)) if mask[i] and (i + 1 == len(tokens) or not mask[i + 1])]
        assert ends == [EOT_ID] * sum(message["role"] == "assistant" for message in messages)
        scored += sum(mask) if messages in heldout else 0
    assert scored > 500


def test_default_heldout_is_the_tiny_runs_eval_split():
    sample = REPO / "train" / "data" / "finetome_sample.jsonl"
    expected = prepare(sample, seed=3407, eval_samples=10)
    assert load_heldout(None).conversations == expected.eval
    assert not any(conversation in expected.train for conversation in expected.eval)


def test_heldout_from_a_run_folder_and_from_a_file(trained_adapter, tmp_path):
    run = json.loads((trained_adapter.parent / "run.json").read_text())["config"]
    from_run = load_heldout(str(trained_adapter.parent))
    expected = prepare(run["dataset"], seed=run["seed"], eval_samples=run["eval_samples"]).eval
    assert from_run.conversations == expected and len(expected) == run["eval_samples"]

    rows = tmp_path / "held.jsonl"
    rows.write_text("\n".join([
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}),
        "{broken",
        json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}),
    ]))
    held = load_heldout(str(rows))
    assert held.conversations == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    assert [number for number, _ in held.skipped] == [2]


# ---------------------------------------------------------------------- the real CLI on two real GGUFs
def test_compare_q4_k_m_with_q8_0(exported, tmp_path):
    folder = exported[0]
    q4, q8 = folder / f"{TINY_GGUF_NAME}-Q4_K_M.gguf", folder / f"{TINY_GGUF_NAME}-Q8_0.gguf"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(prompt) + "\n" for prompt in PROMPTS))
    out = tmp_path / "report"
    result = run_cli("scripts/compare.py", "--model", f"q4_k_m={q4}", "--model", f"q8_0={q8}",
                     "--prompts", str(prompts), "--max-tokens", "16", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("compare.md", "compare.json", "compare.png"):
        assert str(out / name) in result.stdout
    assert sorted(path.name for path in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]
    assert "[q4_k_m] scoring 10 held-out conversations" in result.stdout  # progress lines

    report = json.loads((out / "compare.json").read_text())
    assert report["settings"]["max_tokens"] == 16 and report["settings"]["heldout"]["conversations"] == 10
    by_label = {model["label"]: model for model in report["models"]}
    assert list(by_label) == ["q4_k_m", "q8_0"]
    for model in by_label.values():
        heldout = model["heldout"]
        # A random-weight model predicts nearly uniformly: perplexity near the vocabulary size.
        assert math.isfinite(heldout["perplexity"]) and 1 < heldout["perplexity"]
        assert model["n_vocab"] / 2 < heldout["perplexity"] < model["n_vocab"] * 2
        assert heldout["conversations"] == len(heldout["per_conversation"]) == 10
        assert heldout["scored_tokens"] == sum(c["scored_tokens"] for c in heldout["per_conversation"]) > 500
        generation = model["generation"]
        assert generation["ttft_median_s"] > 0 and generation["tokens_per_s_median"] > 0
        assert generation["errors"] == 0 and 0 <= generation["eot_share"] <= 1
        assert [answer["id"] for answer in generation["per_prompt"]] == ["plain", "with-history"]
        for answer in generation["per_prompt"]:
            assert answer["finish_reason"] in ("stop", "length") and 1 <= answer["answer_tokens"] <= 16
            assert answer["text"] and answer["ttft_s"] > 0
        assert model["size_bytes"] == (q4 if model["label"] == "q4_k_m" else q8).stat().st_size
    assert by_label["q4_k_m"]["heldout"]["scored_tokens"] == by_label["q8_0"]["heldout"]["scored_tokens"]
    perplexities = [model["heldout"]["perplexity"] for model in by_label.values()]
    assert abs(perplexities[0] - perplexities[1]) / perplexities[1] < 0.05  # q4_k_m barely moves a random model

    markdown = (out / "compare.md").read_text()
    assert "| | q4_k_m | q8_0 |" in markdown and "| Held-out perplexity |" in markdown
    assert "llama-cpp-python" in markdown and "![Headline figures per model](compare.png)" in markdown
    for prompt in PROMPTS:
        assert prompt["prompt"] in markdown and f"(`{prompt['id']}`)" in markdown
    assert "*System prompt:* Answer briefly." in markdown
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_same_seed_gives_the_same_answers(tiny_gguf):
    prompts = [Prompt(id="p", prompt="Tell me a story.")]
    texts = []
    for _ in range(2):
        engine = Engine(catalog_from_paths([str(tiny_gguf)]), n_ctx=512, seed=11)
        answers = generate_answers(engine, engine.labels[0], prompts, Sampling(max_new_tokens=16),
                                   progress=lambda line: None)
        texts.append(answers["per_prompt"][0]["text"])
    assert texts[0] and texts[0] == texts[1]


# ---------------------------------------------------------------------- the Hub boundary
def test_hub_repo_offline_fails_in_one_line(tmp_path, monkeypatch):
    """The real download path (Llama.from_pretrained → huggingface_hub) with HF_HUB_OFFLINE: no network touched."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "report"
    result = run_cli("scripts/compare.py", "--model", "1B=alice/Llama-3.2-1B-Instruct-FineTome-GGUF", "--out", str(out))
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "error: --model 1B=alice/Llama-3.2-1B-Instruct-FineTome-GGUF:*Q4_K_M.gguf: downloading from the Hub failed: "
        "cannot reach the Hugging Face Hub (OfflineModeIsEnabled); check the network and that HF_HUB_OFFLINE is not "
        "set, then run the command again"]
    assert not out.exists()


@pytest.mark.parametrize("error, fragment", [
    (hub_error(404, "Repository Not Found"), "failed (HTTP 404): no such repo (or it is private): check the id"),
    (httpx.ConnectError("[Errno -3] Temporary failure in name resolution"), "cannot reach the Hugging Face Hub"),
    (ValueError("No file found in alice/X-GGUF that match *Q4_K_M.gguf\n\nAvailable Files:\n[]"),
     "No file found in alice/X-GGUF that match *Q4_K_M.gguf; give a glob that matches one GGUF file"),
])
def test_hub_download_failures_are_one_line(monkeypatch, tmp_path, capsys, error, fragment):
    calls = []

    def from_pretrained(cls, repo_id, filename, **settings):
        calls.append((repo_id, filename, settings["n_ctx"], settings["seed"]))
        raise error

    monkeypatch.setattr(Llama, "from_pretrained", classmethod(from_pretrained))
    out = tmp_path / "report"
    code = compare.cli.main(["--model", "3B=alice/X-GGUF:*Q4_K_M.gguf", "--out", str(out), "--seed", "5"])
    assert code == 1 and calls == [("alice/X-GGUF", "*Q4_K_M.gguf", 4096, 5)]  # what the engine asks the Hub for
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model 3B=alice/X-GGUF:*Q4_K_M.gguf: ")
    assert fragment in lines[0] and not out.exists()


# ---------------------------------------------------------------------- user mistakes
@pytest.fixture
def inputs(tmp_path):
    """A file that passes for a GGUF (checked by its magic bytes only), a text file, and a few bad input files."""
    files = {"gguf": tmp_path / "fake.gguf", "text": tmp_path / "notes.gguf", "folder": tmp_path / "folder",
             "bad_json": tmp_path / "bad.jsonl", "no_prompt": tmp_path / "no_prompt.jsonl",
             "duplicate_ids": tmp_path / "dup.jsonl", "empty": tmp_path / "empty.jsonl",
             "bad_history": tmp_path / "history.jsonl", "garbage_rows": tmp_path / "garbage.jsonl",
             "txt": tmp_path / "held.txt", "run_without_eval": tmp_path / "run0", "out_file": tmp_path / "taken"}
    files["gguf"].write_bytes(b"GGUF" + bytes(60))
    files["text"].write_text("not a model")
    files["folder"].mkdir()
    good = json.dumps({"id": "a", "prompt": "Hi"})
    files["bad_json"].write_text(good + "\n{not json\n")
    files["no_prompt"].write_text(json.dumps({"id": "a"}) + "\n")
    files["duplicate_ids"].write_text(good + "\n" + good + "\n")
    files["empty"].write_text("\n")
    files["bad_history"].write_text(json.dumps({"id": "a", "prompt": "Hi", "history": [
        {"role": "assistant", "content": "first"}]}) + "\n")
    files["garbage_rows"].write_text('{"text": "no conversations"}\n[1, 2]\n')
    files["txt"].write_text("hello")
    files["run_without_eval"].mkdir()
    (files["run_without_eval"] / "run.json").write_text(json.dumps({"config": {
        "dataset": "train/data/finetome_sample.jsonl", "seed": 1, "eval_samples": 0}}))
    files["out_file"].write_text("a file")
    return files


MISTAKES = [  # (arguments, with {name} for a file of `inputs`; what the one line says)
    (["--model", "{gguf}"], "--model '{gguf}': expected LABEL=PATH_OR_REPO"),
    (["--model", "a=/no/such/model.gguf"], "--model 'a=/no/such/model.gguf': no such file; give a .gguf file"),
    (["--model", "a={folder}"], "is a folder; give the .gguf file in it"),
    (["--model", "a={text}"], "not a GGUF file (it does not start with the GGUF magic bytes)"),
    (["--model", "a=alice/bad..name"], "--model 'a=alice/bad..name': use only letters, digits"),
    (["--model", "a=alice/X-GGUF:"], "empty glob after ':'"),
    (["--model", "a|b={gguf}"], "a label may not contain tabs, line breaks or '|'"),
    ([], "--model: give at least one model"),
    (["--model", "a={gguf}", "--model", "a={gguf}"], "--model: the label 'a' is given 2 times"),
    (["--prompts", "/no/such/prompts.jsonl"], "--prompts '/no/such/prompts.jsonl': no such file"),
    (["--prompts", "{bad_json}"], "line 2: not valid JSON (Expecting property name enclosed in double quotes"),
    (["--prompts", "{no_prompt}"], "line 1: needs a non-empty 'prompt'"),
    (["--prompts", "{duplicate_ids}"], "line 2: id 'a' is used twice"),
    (["--prompts", "{empty}"], "has no prompts"),
    (["--prompts", "{bad_history}"], "history turn 0 must be {{\"role\": \"user\""),
    (["--heldout", "/no/such/held.jsonl"], "--heldout '/no/such/held.jsonl': dataset file not found"),
    (["--heldout", "{garbage_rows}"], "no usable conversation in 2 rows (row 1: missing field 'conversations'"),
    (["--heldout", "{txt}"], "expected a FineTome-format .jsonl (or .json/.parquet) file or a training run's folder"),
    (["--heldout", "{folder}"], "is a folder without run.json"),
    (["--heldout", "{run_without_eval}"], "held out no conversations (eval_samples 0)"),
    (["--max-tokens", "8"], "--max-tokens 8: must be between 16 and 1024"),
    (["--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'"),
    (["--temperature", "3"], "--temperature 3.0: must be between 0 and 2"),
    (["--top-p", "nan"], "--top-p nan: must be between 0.05 and 1"),
    (["--seed", "0"], "--seed 0: must be between 1 and"),
    (["--n-ctx", "256", "--max-tokens", "256"], "--n-ctx 256: must be at least twice --max-tokens (512)"),
    (["--max-conversations", "0"], "--max-conversations 0: must be at least 1"),
    (["--out", "{out_file}"], "exists and is not a folder"),
]


@pytest.mark.parametrize("arguments, fragment", MISTAKES, ids=[fragment[:40] for _, fragment in MISTAKES])
def test_each_mistake_is_one_line_and_exit_2(inputs, tmp_path, capsys, arguments, fragment):
    names = {name: str(path) for name, path in inputs.items()}
    argv = [argument.format(**names) for argument in arguments]
    if "--model" not in argv and fragment != "--model: give at least one model":
        argv = ["--model", f"ok={inputs['gguf']}"] + argv
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "report")]
    assert compare.cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[-1].startswith("error: ") and fragment.format(**names) in captured.err
    assert captured.out == "" and not (tmp_path / "report").exists()


def test_all_mistakes_at_once_from_the_command_line(inputs, tmp_path):
    out = tmp_path / "report"
    result = run_cli("scripts/compare.py", "--model", "nolabel.gguf", "--model", f"b={inputs['text']}",
                     "--model", "dup=/no/a.gguf", "--model", "dup=/no/b.gguf", "--prompts", str(inputs["bad_json"]),
                     "--heldout", "/no/such/held.jsonl", "--max-tokens", "4", "--out", str(out))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 8 and all(line.startswith("error: ") for line in lines), lines
    for fragment in ("expected LABEL=PATH_OR_REPO", "not a GGUF file", "'dup=/no/a.gguf': no such file",
                     "'dup=/no/b.gguf': no such file", "the label 'dup' is given 2 times", "--prompts",
                     "--heldout", "--max-tokens 4"):
        assert sum(fragment in line for line in lines) == 1, fragment
    assert "Traceback" not in result.stderr and not out.exists()


# ---------------------------------------------------------------------- the settings (compare/config.py)
def test_the_flags_are_built_from_the_config_fields(inputs, tmp_path):
    """One flag per CompareConfig field, its default and help the field's; the CLI and a test build the same object."""
    flags = {action.dest: action for action in build_parser()._actions if action.dest != "help"}
    settings = [field for field in dataclasses.fields(CompareConfig) if field.init]
    assert sorted(flags) == sorted(field.name for field in settings)
    for field in settings:
        assert flags[field.name].default == field_default(field), field.name
        assert flags[field.name].help.startswith(field.metadata["help"].split("{default}")[0]), field.name
    space = Sampling()
    assert f"(default: the Space's {space.temperature})" in flags["temperature"].help
    assert f"(default: {space.max_new_tokens})" in flags["max_tokens"].help
    assert f"(default: {DEFAULT_N_CTX}); longer" in flags["n_ctx"].help

    model, out = f"ok={inputs['gguf']}", str(tmp_path / "report")
    config = config_from_args(["--model", model, "--out", out])
    assert config == CompareConfig(model=[model], out=out)
    assert (config.max_tokens, config.temperature, config.top_p, config.n_ctx) == (
        space.max_new_tokens, space.temperature, space.top_p, DEFAULT_N_CTX)
    assert [spec.label for spec in config.models] == ["ok"] and config.prompt_list
    assert config.prompts_file == str(DEFAULT_PROMPTS.relative_to(REPO)) and config.heldout_set.conversations
    assert len(CompareConfig(model=[model], out=out, max_conversations=1).heldout_set.conversations) == 1
    assert not (tmp_path / "report").exists()


def test_the_config_reports_every_problem_at_once(inputs):
    with pytest.raises(UsageError) as caught:
        CompareConfig(model=[], prompts=str(inputs["empty"]), max_tokens=8, temperature=3, seed=0, n_ctx=8,
                      max_conversations=0, out=str(inputs["out_file"]))
    problems = caught.value.problems
    starts = ["--model: give at least one model", f"--prompts {str(inputs['empty'])!r}: ", "--max-tokens 8: ",
              "--temperature 3: ", "--seed 0: ", "--n-ctx 8: must be at least twice --max-tokens (16)",
              "--max-conversations 0: ", f"--out {str(inputs['out_file'])!r}: exists and is not a folder"]
    assert len(problems) == len(starts) and all(problem.startswith(start) for problem, start in zip(problems, starts)), \
        problems


def test_values_of_the_wrong_type_are_problems_not_crashes(inputs):
    with pytest.raises(UsageError) as caught:
        CompareConfig(model=f"ok={inputs['gguf']}", max_tokens="many", top_p=None, seed=1.5, n_ctx="big", out=3)
    assert caught.value.problems == [
        "--max-tokens many: must be between 16 and 1024 (the Space's range)",
        "--top-p None: must be between 0.05 and 1 (the Space's range)",
        "--seed 1.5: must be between 1 and 2147483647 (llama-cpp-python treats 0 as 'unset')",
        "--n-ctx 'big': must be a whole number, at least twice --max-tokens",
        "--out 3: give a folder path",
    ]
