"""The model card and the Hub push, offline: a recording client stands in for HfApi and checks every call against
HfApi's real signature, so what is asserted here is what the Hub would receive."""

import ast
import re

import httpx
import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects

from hub_recorder import RecordingClient, hub_error
from common import hub
from export.card import TAGS, render_model_card
from export.errors import ExportError
from export.hub import NO_TOKEN, merged_repo_id_for, push_export, resolve_token, validate_repo_id

SECRET = "hf_SECRET123"
REPO_ID = "alice/Llama-3.2-1B-Instruct-FineTome-GGUF"
GGUF_NAME = "Llama-3.2-1B-Instruct-FineTome-Q4_K_M.gguf"

# The parts of a real run.json that the card reads (train/trainer.py writes them).
RUN = {
    "config": {"model_name": "unsloth/Llama-3.2-1B-Instruct", "dataset": "mlabonne/FineTome-100k", "max_steps": 60,
               "lora_r": 16, "lora_alpha": 16, "learning_rate": 2e-4, "batch_size": 2, "grad_accum": 4,
               "max_seq_length": 2048, "seed": 3407, "min_score": None},
    "backend": "hf", "device": "cuda", "dtype": "float16", "steps": 60, "train_loss": 0.81234, "eval_loss": 0.90127,
    "tokens_seen": 1_234_567, "tokens_per_second": 2890.4, "train_seconds": 444.0,
    "versions": {"torch": "2.13.0", "transformers": "5.17.0", "peft": "0.21.2", "trl": "1.15.0"},
    "data": {"train": 99_800},
}
REPORT = {
    "checks": [
        {"name": "perplexity vs f16", "passed": True, "value": 1.0312, "threshold": "< 1.10", "detail": "on 200 rows"},
        {"name": "answers stop at <|eot_id|>", "passed": False, "value": "7/8", "threshold": "8/8",
         "detail": "prompt 3 ran to max_tokens | truncated"},
    ],
    "notes": ["verified on a CPU with llama-cpp-python"],
}


def make_info(**overrides) -> dict:
    info = {"name": "Llama-3.2-1B-Instruct-FineTome", "repo_id": REPO_ID,
            "base_model": "unsloth/Llama-3.2-1B-Instruct",
            "files": [{"name": GGUF_NAME, "quant": "q4_k_m", "size_bytes": 807_694_464},
                      {"name": "Llama-3.2-1B-Instruct-FineTome-Q8_0.gguf", "quant": "q8_0",
                       "size_bytes": 1_321_083_136}],
            "run": RUN, "report": REPORT, "space_url": None}
    return {**info, **overrides}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def code_blocks(card: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", card, re.DOTALL)


# ---------------------------------------------------------------- model card


def test_front_matter_has_the_hub_metadata():
    assert front_matter(render_model_card(make_info())) == {
        "base_model": "unsloth/Llama-3.2-1B-Instruct",
        "base_model_relation": "quantized",
        "datasets": ["mlabonne/FineTome-100k"],
        "language": ["en"],
        "license": "llama3.2",
        "pipeline_tag": "text-generation",
        "quantized_by": "alice",
        "tags": ["gguf", "llama-cpp", "llama-3.2", "conversational", "text-generation", "lora", "finetome"],
    }


@pytest.mark.parametrize("run, has_unsloth", [({**RUN, "backend": "unsloth"}, True), (RUN, False), (None, False)])
def test_unsloth_tag_only_when_unsloth_trained_it(run, has_unsloth):
    tags = front_matter(render_model_card(make_info(run=run)))["tags"]
    assert tags == (TAGS + ["unsloth"] if has_unsloth else TAGS)


def test_usage_loads_the_first_quant_from_the_repo():
    card = render_model_card(make_info())
    (snippet,) = code_blocks(card, "python")
    ast.parse(snippet)  # a reader can paste it as is
    assert f'Llama.from_pretrained(repo_id="{REPO_ID}", filename="*Q4_K_M.gguf", n_ctx=4096)' in snippet
    assert 'llm.create_chat_completion(messages=[{"role": "user", "content": ' in snippet
    assert f"`llama-cli -hf {REPO_ID}:Q4_K_M`" in card


def test_usage_skips_unquantized_files_for_the_example():
    files = [{"name": "Model-F16.gguf", "quant": "f16", "size_bytes": 2_471_645_984},
             {"name": "Model-Q4_K_M.gguf", "quant": "q4_k_m", "size_bytes": 807_694_464}]
    assert 'filename="*Q4_K_M.gguf"' in render_model_card(make_info(files=files))


def test_card_without_repo_credits_the_pipeline_and_loads_the_local_file():
    card = render_model_card(make_info(repo_id=None))
    assert front_matter(card)["quantized_by"] == "finetome-pipeline"
    (snippet,) = code_blocks(card, "python")
    assert f'Llama(model_path="{GGUF_NAME}", n_ctx=4096)' in snippet
    assert f"`llama-cli -m {GGUF_NAME}`" in card


def test_files_table_lists_names_quant_types_and_sizes():
    card = render_model_card(make_info())
    assert f"| `{GGUF_NAME}` | Q4_K_M | 807.7 MB |" in card
    assert "| `Llama-3.2-1B-Instruct-FineTome-Q8_0.gguf` | Q8_0 | 1.32 GB |" in card


def test_space_pointer_links_the_space_or_shows_how_to_deploy_one():
    linked = render_model_card(make_info(space_url="https://huggingface.co/spaces/alice/finetome-chat"))
    assert "https://huggingface.co/spaces/alice/finetome-chat" in linked
    assert "deploy_space.py" not in linked
    (command,) = code_blocks(render_model_card(make_info()), "bash")
    assert command.strip() == f"python scripts/deploy_space.py --space-id USER/NAME --model-1b {REPO_ID}"
    three_b = render_model_card(make_info(base_model="unsloth/Llama-3.2-3B-Instruct"))
    assert f"--model-3b {REPO_ID}" in three_b


def test_training_table_comes_from_run_json():
    card = render_model_card(make_info())
    for row in ["| base model | unsloth/Llama-3.2-1B-Instruct |", "| training conversations | 99,800 |",
                "| backend / device / dtype | hf / cuda / float16 |", "| optimizer steps | 60 |",
                "| LoRA rank / alpha | 16 / 16 |", "| learning rate | 0.0002 |",
                "| batch | 2 × 4 gradient accumulation = 8 conversations per step |",
                "| max sequence length | 2048 |", "| seed | 3407 |", "| final train loss | 0.8123 |",
                "| final eval loss | 0.9013 |", "| tokens seen | 1,234,567 |", "| throughput | 2,890 tokens/s |",
                "| training time | 7.4 min |",
                "| libraries | torch 2.13.0, transformers 5.17.0, peft 0.21.2, trl 1.15.0 |"]:
        assert row in card
    assert "minimum FineTome score" not in card  # None in run.json: no row rather than a blank one


def test_unknown_run_says_so():
    card = render_model_card(make_info(run=None))
    assert "The training settings are unknown" in card
    assert "| LoRA rank / alpha |" not in card


def test_verification_table_marks_each_check():
    card = render_model_card(make_info())
    assert "1 of 2 checks failed." in card
    assert "| perplexity vs f16 | ✅ | 1.031 | < 1.10 | on 200 rows |" in card
    # A pipe inside a value would split the cell: it is escaped.
    assert "| answers stop at <\\|eot_id\\|> | ❌ | 7/8 | 8/8 | prompt 3 ran to max_tokens \\| truncated |" in card
    assert "- verified on a CPU with llama-cpp-python" in card
    passing = {"checks": [{**REPORT["checks"][0], "threshold": None, "detail": None}]}
    assert "| perplexity vs f16 | ✅ | 1.031 | — |  |" in render_model_card(make_info(report=passing))


def test_local_base_model_is_left_out_of_the_metadata():
    # The Hub rejects a base_model that is not a model id; the demo's tiny model is one such.
    card = render_model_card(make_info(base_model="builtin:tiny-llama-3.2"))
    assert "base_model" not in front_matter(card)
    assert "`builtin:tiny-llama-3.2` fine-tuned with LoRA" in card


def test_card_ends_with_the_license_and_use_policy():
    card = render_model_card(make_info())
    limitations = card.split("## Limitations")[1]
    assert "Llama 3.2 Community License" in limitations and "Acceptable Use Policy" in limitations


# ---------------------------------------------------------------- Hub push


@pytest.fixture
def gguf_files(tmp_path):
    files = []
    for name in [GGUF_NAME, "Llama-3.2-1B-Instruct-FineTome-Q8_0.gguf"]:
        path = tmp_path / "gguf" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"GGUF" + name.encode())
        files.append(path)
    return files


@pytest.fixture
def merged_dir(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    for name in ["config.json", "model.safetensors", "tokenizer.json", "model.safetensors.tmp",
                 "merge_manifest.json"]:
        (folder / name).write_text(name)
    return folder


@pytest.mark.parametrize("private", [True, False])
def test_push_commits_the_files_and_the_card_in_one_commit(gguf_files, private):
    client = RecordingClient()
    card = render_model_card(make_info())
    result = push_export(client, REPO_ID, gguf_files, card, private=private)

    assert [call.method for call in client.calls] == ["create_repo", "create_commit"]
    create, commit = client.calls
    assert create.arguments == {"repo_id": REPO_ID, "repo_type": "model", "private": private, "exist_ok": True}
    assert commit.arguments["repo_id"] == REPO_ID
    assert commit.arguments["repo_type"] == "model"
    names = [name for name, _ in commit.operations]
    assert names == [GGUF_NAME, "Llama-3.2-1B-Instruct-FineTome-Q8_0.gguf", "README.md"]
    assert [content for _, content in commit.operations[:2]] == [str(path) for path in gguf_files]
    assert commit.operations[2][1] == card.encode("utf-8")
    assert commit.arguments["commit_message"] == f"Upload {names[0]}, {names[1]} and README.md"
    assert result == {"repo_url": f"https://huggingface.co/{REPO_ID}", "merged_repo_url": None}


def test_merged_model_goes_to_its_own_repo_with_upload_folder(gguf_files, merged_dir):
    client = RecordingClient()
    result = push_export(client, REPO_ID, gguf_files, "card", private=True, merged_dir=merged_dir)

    merged_repo_id = "alice/Llama-3.2-1B-Instruct-FineTome"
    assert [call.method for call in client.calls] == ["create_repo", "create_commit", "create_repo", "upload_folder"]
    assert client.calls[2].arguments == {"repo_id": merged_repo_id, "repo_type": "model", "private": True,
                                         "exist_ok": True}
    upload = client.calls[3].arguments
    assert (upload["repo_id"], upload["folder_path"], upload["repo_type"]) == (merged_repo_id, merged_dir, "model")
    # What upload_folder's own filter keeps from the folder with these patterns.
    kept = filter_repo_objects(sorted(path.name for path in merged_dir.iterdir()),
                               ignore_patterns=upload["ignore_patterns"])
    assert list(kept) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert result["merged_repo_url"] == f"https://huggingface.co/{merged_repo_id}"


def test_merged_repo_id_can_be_given(gguf_files, merged_dir):
    client = RecordingClient()
    push_export(client, REPO_ID, gguf_files, "card", private=False, merged_dir=merged_dir,
                merged_repo_id="alice/finetome-1b-16bit")
    assert [call.arguments["repo_id"] for call in client.calls[2:]] == ["alice/finetome-1b-16bit"] * 2
    with pytest.raises(ExportError, match=f"would both go to {REPO_ID}"):
        push_export(RecordingClient(), REPO_ID, gguf_files, "card", private=False, merged_dir=merged_dir,
                    merged_repo_id=REPO_ID)


@pytest.mark.parametrize("gguf_repo, merged", [
    ("alice/Llama-3.2-1B-Instruct-FineTome-GGUF", "alice/Llama-3.2-1B-Instruct-FineTome"),
    ("alice/finetome-3b-gguf", "alice/finetome-3b"),
    ("alice/finetome-1b", "alice/finetome-1b-merged-16bit"),
    ("alice/GGUF-finetome", "alice/GGUF-finetome-merged-16bit"),
])
def test_merged_repo_id_rule(gguf_repo, merged):
    assert merged_repo_id_for(gguf_repo) == merged


def test_local_problems_are_reported_before_any_request(tmp_path, gguf_files):
    client = RecordingClient()
    readme = tmp_path / "README.md"
    readme.write_text("x")
    with pytest.raises(ExportError) as caught:
        push_export(client, REPO_ID, [tmp_path / "missing.gguf", readme], "card", private=False,
                    merged_dir=tmp_path / "no-merged")
    message = str(caught.value)
    assert "missing.gguf is not a file" in message and "README.md is written from the model card" in message
    assert "no-merged does not exist" in message
    assert client.calls == []


@pytest.mark.parametrize("value", ["alice/Llama-3.2-1B-Instruct-FineTome-GGUF", "Org_1/model.v2", "a/b"])
def test_valid_repo_ids_pass(value):
    assert validate_repo_id(value, "--repo-id") == value


@pytest.mark.parametrize("value", ["finetome-gguf", "alice/team/finetome", "alice/fine--tome", "alice/-finetome",
                                   "alice/finetome.git", "alice/fine tome", "alice/", "", "alice/" + "x" * 97])
def test_invalid_repo_ids_name_the_flag_and_value(value):
    with pytest.raises(ExportError) as caught:
        validate_repo_id(value, "--merged-repo-id")
    assert str(caught.value).startswith(f"--merged-repo-id {value!r}: ")


def test_token_comes_from_hf_token_then_the_saved_login(monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: "hf_saved_login")
    assert resolve_token({"HF_TOKEN": SECRET}) == SECRET
    assert resolve_token({}) == "hf_saved_login"
    assert resolve_token({"HF_TOKEN": " "}) == "hf_saved_login"


def test_missing_token_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(ExportError) as caught:
        resolve_token({})
    assert str(caught.value) == "--push needs a Hugging Face token: set HF_TOKEN or run `hf auth login`" == NO_TOKEN


def test_token_appears_nowhere(monkeypatch, capsys, tmp_path, gguf_files, merged_dir):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    token = resolve_token()
    assert token == SECRET
    client = RecordingClient(token=token)
    card = render_model_card(make_info())
    push_export(client, REPO_ID, gguf_files, card, private=True, merged_dir=merged_dir)

    assert SECRET not in card
    assert SECRET not in repr([(call.args, call.kwargs) for call in client.calls])
    committed = [content if isinstance(content, bytes) else open(content, "rb").read()
                 for _, content in client.calls[1].operations]
    assert all(SECRET.encode() not in content for content in committed)
    assert all(SECRET.encode() not in path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())

    # A failing push: the Hub's message even echoes the token, and it is masked.
    failing = RecordingClient(token=token, fail={"create_commit": hub_error(500, f"bad header Bearer {SECRET}")})
    with pytest.raises(ExportError) as caught:
        push_export(failing, REPO_ID, gguf_files, card, private=True)
    assert REPO_ID in str(caught.value) and "***" in str(caught.value)
    assert SECRET not in str(caught.value)
    captured = capsys.readouterr()
    assert SECRET not in captured.out and SECRET not in captured.err


@pytest.mark.parametrize("status, hub_message, fix", [
    (401, "Invalid credentials in Authorization header", "set a valid HF_TOKEN or run `hf auth login` again"),
    (403, "You don't have the rights to create a model under the namespace \"alice\"", "write access"),
    (429, "Too many requests", "rate-limiting"),
    (500, "Internal Error - We're working hard to fix this", "Internal Error - We're working hard to fix this"),
])
def test_hub_http_errors_become_one_line_export_errors(gguf_files, status, hub_message, fix):
    client = RecordingClient(token=SECRET, fail={"create_repo": hub_error(status, hub_message)})
    with pytest.raises(ExportError) as caught:
        push_export(client, REPO_ID, gguf_files, "card", private=False)
    message = str(caught.value)
    assert message.startswith(f"pushing to {REPO_ID} failed (HTTP {status}): ")
    assert fix in message and "\n" not in message and SECRET not in message


def test_merged_repo_errors_name_the_merged_repo(gguf_files, merged_dir):
    client = RecordingClient(fail={"upload_folder": hub_error(403, "Forbidden")})
    with pytest.raises(ExportError, match=r"^pushing to alice/Llama-3\.2-1B-Instruct-FineTome failed \(HTTP 403\)"):
        push_export(client, REPO_ID, gguf_files, "card", private=False, merged_dir=merged_dir)


def test_network_errors_become_one_line_export_errors(gguf_files):
    client = RecordingClient(fail={"create_repo": httpx.ConnectError("Name or service not known")})
    with pytest.raises(ExportError, match=f"^pushing to {REPO_ID} failed: cannot reach the Hugging Face Hub "):
        push_export(client, REPO_ID, gguf_files, "card", private=False)
