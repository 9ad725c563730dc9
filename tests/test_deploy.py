"""scripts/deploy_space.py (its logic: the package deploy/), offline: the dry-run tree is checked file by file, and a
real run goes to a recording client that checks every call against HfApi's own signature, so what is asserted here is
what the Hub would receive."""

import ast
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

import deploy.cli
import deploy.tree
from hub_recorder import RecordingClient, hub_error

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "deploy_space.py"
REAL_SPACE = REPO / "space"
REQUIREMENTS_SPACE = REPO / "requirements-space.txt"
LOCK_SPACE = REPO / "requirements-space.lock"
ARTIFACTS = REPO / "test-artifacts"  # git-ignored: the cached Space virtualenv

SECRET = "hf_SECRETdeploy123"
SPACE_ID = "alice/finetome-chat"
MODEL_1B = "alice/Llama-3.2-1B-Instruct-FineTome-GGUF"
MODEL_3B = "alice/Llama-3.2-3B-Instruct-FineTome-GGUF"
LABEL_1B = "Llama-3.2-1B FineTome (q4_k_m)"
LABEL_3B = "Llama-3.2-3B FineTome (q4_k_m)"
NO_TOKEN_LINE = ("error: deploying needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login` "
                 "(--dry-run DIR builds the Space's files without one)\n")

# What a fake space/ holds: the files a Space needs, and the ones a working copy collects that it must not get.
# The Space gets the kept ones under space/, as the repo has them.
FAKE_SPACE_KEPT = {
    "app.py": "import space.engine\nprint('app')\n",
    "engine.py": "ENGINE = 1\n",
    "models.yaml": "models: []\n",
    "static/style.css": "body { color: black; }\n",
}
FAKE_SPACE_LEFT_OUT = {
    "__pycache__/engine.cpython-311.pyc": "bytecode",
    "static/__pycache__/x.cpython-311.pyc": "bytecode",
    "votes/votes.jsonl": '{"vote": "A"}\n',
    "votes.jsonl": '{"vote": "B"}\n',
    ".gradio/certificate.pem": "cache",
    ".pytest_cache/v/cache/nodeids": "[]",
    "flagged/log.csv": "a,b\n",
    "Tiny-Q4_K_M.gguf": "GGUF",
}


@pytest.fixture
def deploy_space():
    """The deploy's command (scripts/deploy_space.py is its entry point): its main, and the token it reads."""
    return deploy.cli


@pytest.fixture
def fake_space(tmp_path, monkeypatch):
    """A space/ folder of the test's own, with kept and left-out files, used in place of the repo's."""
    folder = tmp_path / "space-src"
    for name, text in {**FAKE_SPACE_KEPT, **FAKE_SPACE_LEFT_OUT}.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(deploy.tree, "SPACE_DIR", folder)
    return folder


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)


def tree_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative POSIX path -> bytes), the dry run's variables file excepted."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != ".space_variables.json"}


def front_matter_and_body(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    _, header, body = card.split("---\n", 2)
    return yaml.safe_load(header), body


def dry_run(deploy_space, out: Path, *extra: str, models=("--model-1b", MODEL_1B, "--model-3b", MODEL_3B)) -> int:
    return deploy_space.main(["--space-id", SPACE_ID, *models, "--dry-run", str(out), *extra])


# ---------------------------------------------------------------- the dry-run tree


def test_dry_run_writes_exactly_the_space_tree(deploy_space, fake_space, tmp_path, capsys):
    out = tmp_path / "out"
    assert dry_run(deploy_space, out) == 0

    tree = tree_of(out)
    assert set(tree) == {"README.md", "requirements.txt", "pre-requirements.txt",
                         *(f"space/{name}" for name in FAKE_SPACE_KEPT), *_base_package()}
    for name in _base_package():
        assert tree[name] == (REPO / name).read_bytes()
    for name, text in FAKE_SPACE_KEPT.items():
        assert tree[f"space/{name}"] == text.encode()  # byte for byte, at the same relative place under space/
    assert tree["requirements.txt"] == LOCK_SPACE.read_bytes()
    assert tree["pre-requirements.txt"] == b"pip==26.3\n"  # >= 23.1: the lock's --config-settings line needs it
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in tree)
    # Nothing beside the target: the temporary folder was renamed into place.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "space-src"]

    variables = json.loads((out / ".space_variables.json").read_text())
    assert variables["space_id"] == SPACE_ID and variables["hardware"] == "cpu-basic"
    assert json.loads(variables["variables"]["SPACE_MODELS"]) == [
        {"label": LABEL_1B, "repo_id": MODEL_1B, "filename": "*Q4_K_M.gguf"},
        {"label": LABEL_3B, "repo_id": MODEL_3B, "filename": "*Q4_K_M.gguf"},
    ]
    output = capsys.readouterr().out
    for name in ["votes/votes.jsonl", "Tiny-Q4_K_M.gguf", "flagged/log.csv", ".gradio/certificate.pem"]:
        assert f"left out: space/{name}" in output  # what is skipped is said, not silently dropped
    assert "__pycache__" not in output  # expected every time: not said
    assert "nothing was uploaded" in output


def _base_package() -> set[str]:
    """common/, the base package the app imports, as the Space gets it beside space/ (sources only)."""
    return {path.relative_to(REPO).as_posix() for path in (REPO / "common").rglob("*.py")
            if "__pycache__" not in path.parts}


def _listing_of_space() -> set[str]:
    """space/ as a Space would get it (paths from the repo root, as in the Space), listed here independently of the
    deploy's own rules."""
    names = set()
    for path in REAL_SPACE.rglob("*"):
        relative = path.relative_to(REAL_SPACE)
        if not path.is_file() or any(part.startswith(".") or part in ("__pycache__", "votes", "flagged")
                                     for part in relative.parts):
            continue
        if relative.suffix in (".pyc", ".jsonl", ".log", ".gguf", ".tmp"):
            continue
        names.add(path.relative_to(REPO).as_posix())
    return names


@pytest.mark.skipif(not (REAL_SPACE / "app.py").is_file(), reason="space/app.py is not written yet")
def test_dry_run_of_the_real_space_folder_is_a_valid_space(deploy_space, tmp_path):
    out = tmp_path / "out"
    assert dry_run(deploy_space, out) == 0
    tree = tree_of(out)
    assert {"space/app.py", "requirements.txt", "README.md"} <= set(tree)
    assert set(tree) == _listing_of_space() | _base_package() | {"README.md", "requirements.txt",
                                                                 "pre-requirements.txt"}
    for name in _listing_of_space():
        assert tree[name] == (REPO / name).read_bytes()

    card, _ = front_matter_and_body(tree["README.md"].decode())
    assert card["app_file"] in tree  # the Space has the file its card says to run
    requirements = tree["requirements.txt"].decode()
    for package in ("gradio", "llama-cpp-python"):
        assert re.search(rf"^{package}==\d+\.\d+\.\d+( |$)", requirements, re.MULTILINE), package
    # A portable llama.cpp: not compiled for the build machine's own CPU (see requirements-space.txt).
    assert re.search(r"^llama-cpp-python==\S+ --config-settings=cmake\.define\.GGML_NATIVE=OFF$", requirements,
                     re.MULTILINE)

    # The uploaded tree starts on its own, as the Space runs its app_file from the tree's root: space/app.py finds
    # the space package and common/ there, nothing from this checkout.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    started = subprocess.run([sys.executable, "space/app.py", "--help"], cwd=out, env=env, capture_output=True,
                             text=True, timeout=300)
    assert started.returncode == 0 and "--model" in started.stdout, started.stderr[-2000:]


def test_the_uploaded_packages_import_only_each_other():
    """The Space gets space/ and common/ and nothing else of the project: neither may import another package of it
    (deploy/, export/, compare/, ...), or the app would fail on the Space at that import."""
    others = {path.name for path in REPO.iterdir() if (path / "__init__.py").is_file()} - {"space", "common"}
    assert {"deploy", "export", "compare"} <= others
    offences = []
    for path in sorted([*REAL_SPACE.rglob("*.py"), *(REPO / "common").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            else:
                continue
            offences += [f"{path.relative_to(REPO)}: {module}" for module in modules if module.split(".")[0] in others]
    assert offences == []


def test_card_front_matter_is_what_the_hub_reads(deploy_space, fake_space, tmp_path):
    out = tmp_path / "out"
    assert dry_run(deploy_space, out) == 0
    card, body = front_matter_and_body((out / "README.md").read_text())
    gradio_version = re.search(r"^gradio==(\S+)$", REQUIREMENTS_SPACE.read_text(), re.MULTILINE).group(1)
    assert card == {
        "title": "Llama-3.2 FineTome Chat", "emoji": "🦙", "colorFrom": "indigo", "colorTo": "yellow",
        "sdk": "gradio", "sdk_version": gradio_version, "app_file": "space/app.py", "python_version": "3.11",
        "pinned": False, "short_description": card["short_description"], "license": "llama3.2",
        "models": [MODEL_1B, MODEL_3B], "datasets": ["mlabonne/FineTome-100k"],
        "tags": ["llama-cpp", "gguf", "llama-3.2", "finetome", "chatbot", "cpu"],
    }
    assert len(card["short_description"]) <= 60  # the Hub rejects a longer one
    # The Space installs sdk_version's gradio, then requirements.txt: both must name the same version.
    assert f"gradio=={gradio_version}" in (out / "requirements.txt").read_text().splitlines()
    assert card["app_file"] in tree_of(out)

    assert "{{" not in body and "}}" not in body and "<!--" not in body
    for text in [MODEL_1B, MODEL_3B, LABEL_1B, LABEL_3B, "10-15 minutes", "compiles llama.cpp from source",
                 "python space/app.py --model path/to/X-Q4_K_M.gguf", "scripts/compare.py", "Blind", "SPACE_MODELS",
                 "Llama 3.2 Community License"]:
        assert text in body, text


@pytest.mark.parametrize("models, repos, labels", [
    (("--model-1b", MODEL_1B), [MODEL_1B], [LABEL_1B]),
    (("--model-3b", MODEL_3B), [MODEL_3B], [LABEL_3B]),
])
def test_one_model_is_enough(deploy_space, fake_space, tmp_path, models, repos, labels):
    out = tmp_path / "out"
    assert dry_run(deploy_space, out, models=models) == 0
    card, body = front_matter_and_body((out / "README.md").read_text())
    assert card["models"] == repos
    catalog = json.loads(json.loads((out / ".space_variables.json").read_text())["variables"]["SPACE_MODELS"])
    assert [entry["label"] for entry in catalog] == labels
    assert [entry["repo_id"] for entry in catalog] == repos


def test_votes_repo_report_url_and_extra_variables(deploy_space, fake_space, tmp_path):
    out = tmp_path / "out"
    assert dry_run(deploy_space, out, "--votes-repo", "alice/finetome-votes", "--variable",
                   "SPACE_VOTES_PATH=/data/votes.jsonl", "--report-url", "https://example.org/compare.html") == 0
    variables = json.loads((out / ".space_variables.json").read_text())["variables"]
    assert list(variables) == ["SPACE_MODELS", "SPACE_VOTES_REPO", "SPACE_VOTES_PATH"]
    assert variables["SPACE_VOTES_REPO"] == "alice/finetome-votes"
    assert variables["SPACE_VOTES_PATH"] == "/data/votes.jsonl"
    _, body = front_matter_and_body((out / "README.md").read_text())
    assert "[alice/finetome-votes](https://huggingface.co/datasets/alice/finetome-votes)" in body
    assert "(https://example.org/compare.html)" in body


def test_dry_run_replaces_its_own_folder_and_refuses_any_other(deploy_space, fake_space, tmp_path, capsys):
    out = tmp_path / "out"
    assert dry_run(deploy_space, out) == 0
    (fake_space / "engine.py").unlink()
    assert dry_run(deploy_space, out) == 0  # a previous dry run's folder is replaced, not merged into
    assert "space/engine.py" not in tree_of(out)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    capsys.readouterr()
    assert dry_run(deploy_space, other) == 2
    assert capsys.readouterr().err == (
        f"error: --dry-run {other}: folder exists and is not empty; give a new or empty folder (a folder an "
        "earlier --dry-run wrote, recognised by its .space_variables.json, is replaced)\n")
    assert [path.name for path in other.iterdir()] == ["todo.txt"]

    assert dry_run(deploy_space, fake_space / "build") == 2  # the next deploy would upload it
    assert "is inside space-src/, whose files the Space gets" in capsys.readouterr().err
    assert not (fake_space / "build").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert dry_run(deploy_space, empty) == 0 and (empty / "space" / "app.py").is_file()


def test_dry_run_needs_no_token(deploy_space, fake_space, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(deploy_space, "resolve_token", lambda **_: pytest.fail("a dry run asked for the token"))
    assert dry_run(deploy_space, tmp_path / "out") == 0


# ---------------------------------------------------------------- a real run, against a recording client


@pytest.mark.parametrize("private", [False, True])
def test_real_run_creates_the_space_sets_the_catalog_and_commits_the_tree_once(
        deploy_space, fake_space, tmp_path, capsys, token_env, private):
    out = tmp_path / "out"
    assert dry_run(deploy_space, out, *(["--private"] if private else [])) == 0
    expected_tree = tree_of(out)
    capsys.readouterr()

    client = RecordingClient(token=SECRET)
    argv = ["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--model-3b", MODEL_3B, "--no-wait"] + (
        ["--private"] if private else [])
    assert deploy_space.main(argv, client=client) == 0

    assert [call.method for call in client.calls] == [
        "space_info", "whoami", "create_repo", "add_space_variable", "list_repo_files", "create_commit"]
    info, _, create, variable, listing, commit = client.calls
    assert info.arguments == {"repo_id": SPACE_ID}
    assert create.arguments == {"repo_id": SPACE_ID, "repo_type": "space", "space_sdk": "gradio",
                                "space_hardware": "cpu-basic", "private": private, "exist_ok": True}
    assert (variable.arguments["repo_id"], variable.arguments["key"]) == (SPACE_ID, "SPACE_MODELS")
    assert json.loads(variable.arguments["value"]) == [
        {"label": LABEL_1B, "repo_id": MODEL_1B, "filename": "*Q4_K_M.gguf"},
        {"label": LABEL_3B, "repo_id": MODEL_3B, "filename": "*Q4_K_M.gguf"},
    ]
    assert listing.arguments == {"repo_id": SPACE_ID, "repo_type": "space"}
    assert commit.arguments["repo_id"] == SPACE_ID and commit.arguments["repo_type"] == "space"
    # One commit, holding exactly the dry run's files with the same bytes.
    assert dict(commit.operations) == expected_tree
    assert [name for name, _ in commit.operations] == sorted(expected_tree)

    output = capsys.readouterr().out
    assert output.rstrip().splitlines()[-1] == f"Space: https://huggingface.co/spaces/{SPACE_ID}"
    assert "note:" not in output  # README.md and .gitattributes of a new Space are not stale files


def test_token_appears_nowhere(deploy_space, fake_space, tmp_path, capsys, token_env):
    client = RecordingClient(token=SECRET)
    argv = ["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--votes-repo", "alice/votes",
            "--variable", "SPACE_N_CTX=2048", "--no-wait"]
    assert deploy_space.main(argv, client=client) == 0
    assert SECRET not in repr([(call.args, call.kwargs) for call in client.calls])
    assert all(SECRET.encode() not in content for _, content in client.calls[-1].operations)
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert all(SECRET.encode() not in path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())

    # A failing deploy whose Hub message echoes the token: masked.
    failing = RecordingClient(token=SECRET, fail={"create_commit": hub_error(500, f"bad header Bearer {SECRET}")})
    assert deploy_space.main(argv, client=failing) == 1
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err and "***" in captured.err


def test_files_only_in_the_space_are_reported_not_deleted(deploy_space, fake_space, capsys, token_env):
    client = RecordingClient(token=SECRET, existing=[".gitattributes", "README.md", "space/app.py", "old_helpers.py"])
    assert deploy_space.main(["--space-id", SPACE_ID, "--model-3b", MODEL_3B, "--no-wait"], client=client) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: the Space also has old_helpers.py, which this deploy did not write; delete it on the "
                     "Space's Files tab if it is left over from an earlier version"]


@pytest.mark.parametrize("status, fix", [
    (401, "set a valid HF_TOKEN or run `hf auth login` again"),
    (403, "use a token with write access to its namespace"),
    (500, "Internal Error"),
])
def test_hub_errors_are_one_line(deploy_space, fake_space, capsys, token_env, status, fix):
    client = RecordingClient(token=SECRET, fail={"create_repo": hub_error(status, "Internal Error")})
    assert deploy_space.main(["--space-id", SPACE_ID, "--model-1b", MODEL_1B], client=client) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: deploying to the Space {SPACE_ID} failed (HTTP {status}): ")
    assert fix in err and err.count("\n") == 1
    # nothing after the first failure
    assert [call.method for call in client.calls] == ["space_info", "whoami", "create_repo"]


def test_network_errors_are_one_line(deploy_space, fake_space, capsys, token_env):
    client = RecordingClient(fail={"add_space_variable": httpx.ConnectError("Name or service not known")})
    assert deploy_space.main(["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--no-wait"], client=client) == 1
    assert capsys.readouterr().err.startswith(
        f"error: deploying to the Space {SPACE_ID} failed: cannot reach the Hugging Face Hub (ConnectError)")


# ---------------------------------------------------------------- the plan: who may create a Space


PLAN = "PRO for a personal account, Team or Enterprise for an organization"


def test_a_free_account_is_stopped_before_any_upload(deploy_space, fake_space, capsys, token_env):
    client = RecordingClient(token=SECRET, user="alice", is_pro=False)
    assert deploy_space.main(["--space-id", SPACE_ID, "--model-1b", MODEL_1B], client=client) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(
        f"error: {SPACE_ID}: 'alice' is a free account, and creating a Gradio Space needs a paid Hugging Face plan")
    for text in (PLAN, "`python space/app.py --share`", "already exists", "updated without a create"):
        assert text in captured.err, text
    assert captured.out == ""  # nothing listed as if it were going up
    assert [call.method for call in client.calls] == ["space_info", "whoami"]  # nothing created, nothing uploaded


@pytest.mark.parametrize("space_id, account", [
    ("finetome-org/chat", dict(user="alice", is_pro=False, orgs=("finetome-org",))),  # an org: the Hub decides
    (SPACE_ID, dict(user="alice", is_pro=None)),  # whoami does not say: the Hub decides
])
def test_a_402_keeps_the_hubs_text_and_names_the_plan(deploy_space, fake_space, capsys, token_env, space_id, account):
    hub_text = "Gradio Spaces require a paid plan to create. Subscribe to PRO or upgrade your organization."
    client = RecordingClient(token=SECRET, fail={"create_repo": hub_error(402, hub_text)}, **account)
    assert deploy_space.main(["--space-id", space_id, "--model-1b", MODEL_1B], client=client) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: deploying to the Space {space_id} failed (HTTP 402): {hub_text}; creating a "
                          "Gradio Space needs a paid Hugging Face plan")
    assert PLAN in err and "--share" in err and err.count("\n") == 1
    assert [call.method for call in client.calls] == ["space_info", "whoami", "create_repo"]


def test_an_existing_space_is_updated_without_a_create(deploy_space, fake_space, capsys, token_env):
    """A free account may update a Space that exists (created earlier, or by an organization with a plan)."""
    client = RecordingClient(token=SECRET, user="alice", is_pro=False, space_exists=True)
    assert deploy_space.main(["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--no-wait"], client=client) == 0
    assert [call.method for call in client.calls] == [
        "space_info", "add_space_variable", "list_repo_files", "create_commit"]  # no whoami, no create_repo
    output = capsys.readouterr().out
    assert output.startswith(f"updating the Space {SPACE_ID} (cpu-basic):")
    assert output.rstrip().splitlines()[-1] == f"Space: https://huggingface.co/spaces/{SPACE_ID}"


# ---------------------------------------------------------------- after the commit: the build, then the app answers


@pytest.mark.parametrize("stage, log", [("BUILD_ERROR", "build"), ("RUNTIME_ERROR", "container")])
def test_a_failed_build_or_start_exits_non_zero_with_the_hubs_message(deploy_space, fake_space, capsys, token_env,
                                                                      stage, log):
    message = {"BUILD_ERROR": "Build failed with exit code: 1", "RUNTIME_ERROR": "Exit code: 1. Reason: "
               "ModuleNotFoundError: No module named 'space'"}[stage]
    client = RecordingClient(token=SECRET, runtimes=[
        {"stage": "BUILDING"}, {"stage": "BUILDING"}, {"stage": "APP_STARTING"}, {"stage": stage, "errorMessage": message}])
    argv = ["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--poll-interval", "0.01"]
    assert deploy_space.main(argv, client=client) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"error: the Space {SPACE_ID} stopped at {stage}: {message}; read the {log} log at "
                            f"https://huggingface.co/spaces/{SPACE_ID}?logs={log}, fix the cause and deploy again\n")
    progress = captured.out.split("waiting for the build", 1)[1].splitlines()[1:]
    assert progress == ["  BUILDING", "  APP_STARTING"]  # each stage once, as it changes
    assert [call.method for call in client.calls][-5:] == ["create_commit"] + ["get_space_runtime"] * 4
    assert all(call.arguments == {"repo_id": SPACE_ID} for call in client.calls if call.method == "get_space_runtime")
    assert "Space: " not in captured.out  # no success reported


def test_a_running_runtime_that_names_no_commit_is_not_taken_for_the_new_build(deploy_space, fake_space, capsys,
                                                                              token_env):
    """Where the runtime has no `sha`, the RUNNING right after the commit may be the previous build: the deploy waits
    for the build it started (here it fails, so a success taken too early would show as exit 0)."""
    client = RecordingClient(token=SECRET, runtimes=[
        {"stage": "RUNNING", "sha": None}, {"stage": "BUILDING", "sha": None},
        {"stage": "RUNTIME_ERROR", "sha": None, "errorMessage": "boom"}])
    assert deploy_space.main(["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--poll-interval", "0.01"],
                             client=client) == 1
    captured = capsys.readouterr()
    assert captured.out.split("waiting for the build", 1)[1].splitlines()[1:] == [
        "  RUNNING (waiting for the new build to start)", "  BUILDING"]
    assert captured.err.startswith(f"error: the Space {SPACE_ID} stopped at RUNTIME_ERROR: boom; ")


def test_a_build_that_never_ends_times_out(deploy_space, fake_space, capsys, token_env):
    client = RecordingClient(token=SECRET, runtimes=[{"stage": "BUILDING"}])
    argv = ["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--poll-interval", "0.01", "--wait-timeout", "0.05"]
    assert deploy_space.main(argv, client=client) == 1
    assert capsys.readouterr().err == (f"error: the Space {SPACE_ID} is still BUILDING after 0.05 s: follow it at "
                                       f"https://huggingface.co/spaces/{SPACE_ID}?logs=build (or wait longer: "
                                       "--wait-timeout)\n")


@pytest.fixture(scope="module")
def hosted_space(tiny_gguf, tmp_path_factory):
    """The Space's app as the Hub would run it for the 1B and 3B catalog entries: `python space/app.py` on the tiny
    GGUF under each entry's label (the app labels a --model file by its name). Yields its URL and its log."""
    from conftest import free_port

    folder = tmp_path_factory.mktemp("hosted")
    models = []
    for label in (LABEL_1B, LABEL_3B):
        os.symlink(tiny_gguf, folder / f"{label}.gguf")
        models += ["--model", str(folder / f"{label}.gguf")]
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen([sys.executable, str(REPO / "space/app.py"), *models, "--host", "127.0.0.1", "--port",
                                str(port), "--votes", str(folder / "votes.jsonl"), "--n-ctx", "512"], cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, process, folder / "server.log")
        yield url, folder / "server.log"
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for_http(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    import time
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"{url} did not answer within {seconds:.0f} s: {log.read_text()[-3000:]}"
            time.sleep(0.5)


def test_running_then_every_model_answers_through_gradio_client(deploy_space, fake_space, capsys, token_env,
                                                                hosted_space):
    url, log = hosted_space
    # The Hub first reports the previous commit still running, then the new one building, then running.
    client = RecordingClient(token=SECRET, host=url, runtimes=[
        {"stage": "RUNNING", "sha": "f" * 40}, {"stage": "RUNNING_BUILDING", "sha": "f" * 40}, {"stage": "BUILDING"},
        {"stage": "RUNNING"}])
    argv = ["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--model-3b", MODEL_3B, "--poll-interval", "0.01"]
    assert deploy_space.main(argv, client=client) == 0
    output = capsys.readouterr().out
    progress = output.split("waiting for the build", 1)[1].splitlines()
    assert progress[1:5] == ["  RUNNING (still the previous commit)", "  RUNNING_BUILDING", "  BUILDING",
                             "  RUNNING (cpu-basic)"]
    assert progress[5] == f"chatting once with each model at {url}:"
    for line, label in zip(progress[6:8], (LABEL_1B, LABEL_3B)):
        assert line.startswith(f"  {label}: ") and re.search(r"\d+ tokens? · read \d+ of \d+ prompt tokens\)$", line), line
    assert output.rstrip().splitlines()[-2:] == ["every model answered: the Space is up",
                                                 f"Space: https://huggingface.co/spaces/{SPACE_ID}"]
    assert [call.method for call in client.calls][-5:] == ["get_space_runtime"] * 4 + ["space_info"]
    # The app says how many llama.cpp threads it chose and why (its affinity mask and cgroup quota).
    assert re.search(r"^llama\.cpp threads: \d+ \(the (affinity mask|cgroup quota)", log.read_text(), re.MULTILINE)


def test_a_model_the_hosted_app_does_not_serve_fails_the_check(deploy_space, fake_space, capsys, token_env,
                                                                hosted_space):
    """--base-models adds two entries the app here does not serve: the app answers them with an error, not a token."""
    client = RecordingClient(token=SECRET, host=hosted_space[0])
    argv = ["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--base-models", "--poll-interval", "0.01"]
    assert deploy_space.main(argv, client=client) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: the Space {SPACE_ID}: 'Llama-3.2-1B Instruct base (q4_k_m)' answered no token")
    assert err.count("\n") == 1 and f"https://huggingface.co/spaces/{SPACE_ID}?logs=container" in err


# ---------------------------------------------------------------- input errors: one line each, exit 2


@pytest.mark.parametrize("argv, message", [
    (["--space-id", SPACE_ID],
     "no model to serve: give --model-1b USER/NAME-GGUF and/or --model-3b USER/NAME-GGUF (the Hub repos "
     "export/to_gguf.py --push wrote), or --server LABEL=URL#MODEL"),
    (["--space-id", "finetome-chat", "--model-1b", MODEL_1B],
     "--space-id 'finetome-chat': expected USER/NAME (a user or organization, then the repo)"),
    (["--space-id", "alice/fine--chat", "--model-1b", MODEL_1B],
     "--space-id 'alice/fine--chat': use only letters, digits, '-', '_' and '.', not at the start or end of either "
     "part, no '--' or '..', at most 96 characters each, no '.git' ending"),
    (["--space-id", SPACE_ID, "--model-3b", "Llama-3B-GGUF"],
     "--model-3b 'Llama-3B-GGUF': expected USER/NAME (a user or organization, then the repo)"),
    (["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--model-3b", MODEL_1B],
     f"--model-1b and --model-3b are both '{MODEL_1B}': give the 1B and the 3B repo"),
    (["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--variable", "SPACE_MODELS=[]"],
     "--variable SPACE_MODELS: set by --model-1b/--model-3b; leave it out of --variable"),
    (["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--variable", "no equals sign"],
     "--variable 'no equals sign': expected KEY=VALUE with KEY a name like SPACE_VOTES_PATH"),
    (["--model-1b", MODEL_1B], "the following arguments are required: --space-id"),
    (["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--poll-interval", "0"],
     "--poll-interval 0: give a number of seconds above 0 (default 15)"),
    (["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--wait-timeout", "inf"],
     "--wait-timeout inf: give a number of seconds above 0 (default 1800)"),
    (["--space-id", SPACE_ID, "--model-1b", MODEL_1B, "--dry-run", "/dev/null/space"],
     "--dry-run /dev/null/space: /dev/null is a file, not a folder; choose a folder this user can write"),
])
def test_bad_input_is_one_line_and_exit_2(deploy_space, capsys, token_env, argv, message):
    client = RecordingClient(token=SECRET)
    assert deploy_space.main(argv, client=client) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n"
    assert captured.out == "" and client.calls == []


def test_missing_app_is_one_line_and_exit_2(deploy_space, fake_space, tmp_path, capsys):
    (fake_space / "app.py").unlink()
    assert dry_run(deploy_space, tmp_path / "out") == 2
    assert capsys.readouterr().err == (f"error: {fake_space / 'app.py'} not found: the Space runs app.py (its "
                                       f"app_file) from the root of {fake_space.name}/; deploy from a checkout that "
                                       "has it\n")
    assert not (tmp_path / "out").exists()


def test_sdk_version_is_the_pin_whatever_gradio_is_installed(deploy_space, fake_space, tmp_path, monkeypatch):
    """Deploying from a Colab with another gradio: the card still names requirements-space.txt's pin, and the lock
    (the Space's requirements.txt) has the same version (issue 29)."""
    import gradio

    monkeypatch.setattr(gradio, "__version__", "5.0.0")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.0.0" if name == "gradio" else real(name))
    assert dry_run(deploy_space, tmp_path / "out") == 0
    card, _ = front_matter_and_body((tmp_path / "out" / "README.md").read_text())
    pinned = re.search(r"^gradio==(\S+)$", REQUIREMENTS_SPACE.read_text(), re.MULTILINE).group(1)
    assert card["sdk_version"] == pinned != "5.0.0"
    assert f"gradio=={pinned}" in (tmp_path / "out" / "requirements.txt").read_text().splitlines()


def test_an_unpinned_gradio_is_one_line(deploy_space, fake_space, tmp_path, monkeypatch, capsys):
    requirements = tmp_path / "requirements-space.txt"
    requirements.write_text("gradio>=5\nllama-cpp-python==0.3.36\n")
    monkeypatch.setattr(deploy.tree, "REQUIREMENTS", requirements)
    assert dry_run(deploy_space, tmp_path / "out") == 2
    assert capsys.readouterr().err == ("error: requirements-space.txt: pin gradio (gradio==X.Y.Z) so the Space "
                                       "installs what its card says\n")


def test_a_lock_behind_its_requirements_stops_the_deploy(deploy_space, fake_space, tmp_path, monkeypatch, capsys):
    """The Space installs the lock, not requirements-space.txt: a pin the lock does not have would ship another tree."""
    requirements = tmp_path / "requirements-space.txt"
    requirements.write_text("gradio==6.31.0\nllama-cpp-python==0.3.36\nopenai==9.9.9\n")
    monkeypatch.setattr(deploy.tree, "REQUIREMENTS", requirements)
    assert dry_run(deploy_space, tmp_path / "out") == 2
    assert capsys.readouterr().err == ("error: requirements-space.txt pins openai==9.9.9 but requirements-space.lock "
                                       "has openai==3.57.0: run `make lock` and commit the result\n")
    assert not (tmp_path / "out").exists()


def test_missing_token_stops_before_any_work(tmp_path):
    """As a user runs it: a fresh process, no HF_TOKEN, and HF_HOME pointing at an empty folder (no saved login)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "empty-hf-home")
    (tmp_path / "empty-hf-home").mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), "--space-id", SPACE_ID, "--model-1b", MODEL_1B],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", NO_TOKEN_LINE)


def test_help_runs_from_anywhere(tmp_path):
    """The entry script finds the repo's packages itself (no PYTHONPATH), as a fresh clone runs it."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0 and "--space-id" in result.stdout and "--dry-run" in result.stdout


# ---------------------------------------------------------------- pure parts


def test_template_placeholders_must_all_be_known_and_used():
    from common.cli import UsageError
    from deploy.card import fill_template

    with pytest.raises(UsageError, match="placeholders typo have no value and report are not used"):
        fill_template("# {{title}}\n{{typo}}\n", {"title": "t", "report": "r"})


def test_requirements_space_is_pinned_and_commented():
    lines = [line for line in REQUIREMENTS_SPACE.read_text().splitlines() if line and not line.startswith("#")]
    assert lines == ["gradio==6.31.0", "llama-cpp-python==0.3.36 --config-settings=cmake.define.GGML_NATIVE=OFF",
                     "huggingface_hub==1.33.0", "pyyaml==6.0.3", "openai==3.57.0"]
    assert "compiles llama.cpp" in REQUIREMENTS_SPACE.read_text()



def test_a_server_joins_the_catalog_and_its_key_stays_a_secrets_name(tmp_path):
    from common.cli import UsageError
    from deploy.config import config_from_args

    config = config_from_args(["--space-id", SPACE_ID, "--model-3b", "alice/m3-GGUF", "--server",
                               "1B (llama-server)=http://10.0.0.5:8080/v1#llama-1b", "--server-key-env", "LLAMA_KEY"])
    catalog = json.loads(config.variables()["SPACE_MODELS"])
    assert catalog[-1] == {"label": "1B (llama-server)", "base_url": "http://10.0.0.5:8080/v1", "model": "llama-1b",
                           "api_key_env": "LLAMA_KEY"}
    with pytest.raises(UsageError, match="--server 'nonsense': expected LABEL=URL#MODEL"):
        config_from_args(["--space-id", SPACE_ID, "--server", "nonsense"])


# ---------------------------------------------------------------- the arena: base models and compare's report


BASE_1B, BASE_3B = "unsloth/Llama-3.2-1B-Instruct-GGUF", "unsloth/Llama-3.2-3B-Instruct-GGUF"


def compare_report(folder: Path) -> Path:
    """A compare.json as scripts/compare.py writes it, cut to the figures the Leaderboard shows."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"label": LABEL_1B, "size_bytes": 807_694_464, "heldout": {"perplexity": 7.31},
               "generation": {"tokens_per_s_median": 27.4, "eot_share": 0.9}}
    (folder / "compare.json").write_text(json.dumps({"created": "2026-01-02 10:00 UTC", "machine": {"cpu": "EPYC"},
                                                     "models": [figures]}))
    return folder / "compare.json"


def test_dry_run_shows_the_base_models_and_the_report(deploy_space, tmp_path, capsys):
    report = compare_report(tmp_path / "reports" / "1b-vs-3b")
    out = tmp_path / "out"
    assert dry_run(deploy_space, out, "--base-models", "--report", str(report.parent)) == 0
    variables = json.loads((out / ".space_variables.json").read_text())["variables"]
    catalog = json.loads(variables["SPACE_MODELS"])
    assert catalog[2:] == [
        {"label": "Llama-3.2-1B Instruct base (q4_k_m)", "repo_id": BASE_1B,
         "filename": "Llama-3.2-1B-Instruct-Q4_K_M.gguf"},
        {"label": "Llama-3.2-3B Instruct base (q4_k_m)", "repo_id": BASE_3B,
         "filename": "Llama-3.2-3B-Instruct-Q4_K_M.gguf"},
    ]
    assert [entry["repo_id"] for entry in catalog[:2]] == [MODEL_1B, MODEL_3B]  # the fine-tunes first
    assert variables["SPACE_REPORT"] == "reports/compare.json"
    assert (out / "reports" / "compare.json").read_bytes() == report.read_bytes()
    card, body = front_matter_and_body((out / "README.md").read_text())
    assert card["models"] == [MODEL_1B, MODEL_3B, BASE_1B, BASE_3B] and "Instruct base" in body
    output = capsys.readouterr().out
    assert "  reports/compare.json  (" in output and "variable SPACE_REPORT = reports/compare.json" in output
    assert BASE_1B in output and BASE_3B in output

    # The shipped code reads the shipped report where SPACE_REPORT says, from the Space's root, as the app does.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    read = subprocess.run([sys.executable, "-c", "import os, sys; sys.path.insert(0, '.'); "
                           "from space.leaderboard import load_report, report_headlines; "
                           "print(report_headlines(load_report(os.environ['SPACE_REPORT']))[1][0])"],
                          cwd=out, env={**env, "SPACE_REPORT": variables["SPACE_REPORT"]}, capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0 and "7.31" in read.stdout, read.stderr[-2000:]


def test_base_models_alone_are_enough(deploy_space, fake_space, tmp_path):
    assert dry_run(deploy_space, tmp_path / "out", "--base-models", models=()) == 0
    variables = json.loads((tmp_path / "out" / ".space_variables.json").read_text())["variables"]
    assert [entry["repo_id"] for entry in json.loads(variables["SPACE_MODELS"])] == [BASE_1B, BASE_3B]
    assert "SPACE_REPORT" not in variables


@pytest.mark.parametrize("extra, message", [
    (["--report", "{missing}"], "--report {missing}/compare.json: cannot read it ([Errno 2] No such file or "
                                "directory: '{missing}/compare.json'); give the compare.json that `python "
                                "scripts/compare.py --out DIR` wrote (or DIR)"),
    (["--report", "{not_a_report}"], "--report {not_a_report}: not a compare report (it needs `models`, each with "
                                     "a label, held-out and generation figures); give the compare.json that `python "
                                     "scripts/compare.py --out DIR` wrote (or DIR)"),
    (["--variable", "SPACE_REPORT=x.json"], "--variable SPACE_REPORT: set by --report; leave it out of --variable"),
])
def test_a_bad_report_is_one_line_and_exit_2(deploy_space, tmp_path, capsys, extra, message):
    (tmp_path / "missing").mkdir()
    (tmp_path / "votes.json").write_text('{"models": []}')
    names = {"missing": tmp_path / "missing", "not_a_report": tmp_path / "votes.json"}
    assert dry_run(deploy_space, tmp_path / "out", *(item.format(**names) for item in extra)) == 2
    assert capsys.readouterr().err == f"error: {message.format(**names)}\n"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the uploaded tree, built as Hugging Face builds it


SPACE_VENV_PYTHON = "3.11"  # the card's python_version
# What the Gradio SDK's generated Dockerfile installs beside the Space's requirements.txt (besides gradio itself).
SDK_IMAGE_EXTRAS = ("uvicorn>=0.14.0", "websockets>=10.4", "spaces")


def hf_like_space_python(tree: Path) -> Path:
    """A virtualenv with what a Gradio Space built from `tree` (a --dry-run folder) has, installed the way the SDK
    image installs it: Python 3.11, `pip install -U pip`, pre-requirements.txt, then requirements.txt together with
    gradio[oauth,mcp]==<sdk_version> and SDK_IMAGE_EXTRAS in one pip call. Built once per content of those files and
    kept under test-artifacts/ (the first build compiles llama.cpp: ~7-10 min on 2 cores); pip's wheel cache is a
    private one beside it, as pip's cache key ignores --config-settings and would reuse a native build from
    elsewhere."""
    python311 = shutil.which(f"python{SPACE_VENV_PYTHON}")
    if python311 is None:
        pytest.fail(f"the Space build test needs python{SPACE_VENV_PYTHON} (the Space's python_version) on PATH")
    card, _ = front_matter_and_body((tree / "README.md").read_text())
    inputs = [(tree / name).read_text() for name in ("requirements.txt", "pre-requirements.txt")]
    key = hashlib.sha256(json.dumps([*inputs, card["sdk_version"], SDK_IMAGE_EXTRAS]).encode()).hexdigest()[:12]
    venv = ARTIFACTS / f"space-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / "complete").exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python311, "-m", "venv", str(venv)], check=True)
    env = {**{key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "PYTHONPATH"))},
           "PIP_CACHE_DIR": str(ARTIFACTS / "space-pip-cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    steps = [["install", "-U", "pip"], ["install", "-r", "pre-requirements.txt"],
             ["install", "-r", "requirements.txt", f"gradio[oauth,mcp]=={card['sdk_version']}", *SDK_IMAGE_EXTRAS]]
    for step in steps:
        done = subprocess.run([str(python), "-m", "pip", *step], cwd=tree, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert done.returncode == 0, f"pip {' '.join(step)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (venv / "complete").write_text(" ".join(sys.version.split()[:1]) + "\n")
    return python


def test_the_uploaded_tree_installs_and_chats_as_hugging_face_builds_it(deploy_space, tmp_path, tiny_gguf):
    """The --dry-run tree, installed in a fresh Python 3.11 virtualenv as the Gradio SDK image installs it, then its
    space/app.py started from the tree's root (nothing from this checkout on the path) on a local GGUF and asked
    through gradio_client."""
    from gradio_client import Client

    from conftest import free_port

    tree = tmp_path / "space"
    assert dry_run(deploy_space, tree, models=("--model-1b", MODEL_1B)) == 0
    python = hf_like_space_python(tree)

    model = tmp_path / f"{LABEL_1B}.gguf"
    os.symlink(tiny_gguf, model)
    port, log = free_port(), tmp_path / "app.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    process = subprocess.Popen([str(python), "space/app.py", "--model", str(model), "--host", "127.0.0.1", "--port",
                                str(port), "--votes", str(tmp_path / "votes.jsonl"), "--n-ctx", "512"], cwd=tree,
                               stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**env, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url, process, log)
        answer, stats = Client(url, verbose=False).predict("Hello!", LABEL_1B, "", 0.0, 1.0, 8, api_name="/chat")
        assert answer and re.search(r"\d+ tokens? · read \d+ of \d+ prompt tokens$", stats), (answer, stats)
    finally:
        process.terminate()
        process.wait(timeout=30)
    # It ran on the virtualenv's packages: the gradio its card names, the llama-cpp-python its lock pins.
    text = log.read_text()
    assert "llama.cpp threads: " in text, text[-2000:]
    versions = subprocess.run([str(python), "-c", "import gradio, llama_cpp; print(gradio.__version__, "
                               "llama_cpp.__version__)"], capture_output=True, text=True, check=True).stdout.split()
    card, _ = front_matter_and_body((tree / "README.md").read_text())
    pinned = re.search(r"^llama-cpp-python==(\S+)", (tree / "requirements.txt").read_text(), re.MULTILINE).group(1)
    assert versions == [card["sdk_version"], pinned]
