"""The Space's files, built from this checkout without the network: the package space/ (its app.py is the Space's
app_file, space/app.py), the base package common/ beside it, requirements-space.lock as requirements.txt (every
package of the Space's tree pinned; it asks for a portable llama.cpp build), a pre-requirements.txt pinning pip
(installed first), README.md (the card, deploy/card.py) and --report's file. They go up in one commit (deploy/hub.py),
or into a folder with --dry-run.

    tree = build_tree(config_from_args(["--space-id", "alice/chat", "--model-3b", "alice/m3-GGUF"]))
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.cli import UsageError
from common.files import output_folder_problem, remove_stale_temporaries, swap_in_folder, temporary_path
from common.locks import read_pins, staleness
from deploy.card import APP_NAME, PACKAGE, TEMPLATE, render_card
from deploy.config import HARDWARE, REPORT_IN_SPACE, VARIABLES_FILE, DeployConfig
from space.leaderboard import report_file

REPO = Path(__file__).resolve().parents[1]
# Read at call time, so tests can point them at a folder of their own.
SPACE_DIR = REPO / "space"
BASE_DIR = REPO / "common"  # the base package the app imports; the Space gets it beside space/
REQUIREMENTS = REPO / "requirements-space.txt"  # what the app needs, edited by hand
LOCK = REPO / "requirements-space.lock"  # its whole tree pinned (`make lock`): the Space's requirements.txt
# The Space's pre-requirements.txt, installed before requirements.txt: the lock's per-requirement --config-settings
# line needs pip >= 23.1 (older Gradio images had pip 22.3.1, which refuses it); 26.3 is the pip tested here.
PRE_REQUIREMENTS = "pip==26.3\n"
WRITTEN_BY = "scripts/deploy_space.py --dry-run"
QUIET_REASONS = ("Python bytecode",)  # not worth a line: expected every time


def leave_out_reason(path: PurePosixPath) -> str | None:
    """Why a file of space/ is not part of the Space, or None when it is. `path` is relative to space/. models.yaml
    goes up: the app falls back to it when SPACE_MODELS is not set.

    >>> [leave_out_reason(PurePosixPath(p)) for p in ["app.py", "engine.py", "models.yaml", "static/style.css"]]
    [None, None, None, None]
    >>> leave_out_reason(PurePosixPath("__pycache__/engine.cpython-311.pyc"))
    'Python bytecode'
    >>> leave_out_reason(PurePosixPath("votes/votes.jsonl"))
    'vote log or app output'
    >>> leave_out_reason(PurePosixPath(".pytest_cache/v/cache/nodeids"))
    'hidden (cache or editor file)'
    """
    if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
        return "Python bytecode"
    if any(part.startswith(".") for part in path.parts):
        return "hidden (cache or editor file)"
    if {"votes", "flagged"} & set(path.parts[:-1]) or path.suffix in (".jsonl", ".log"):
        return "vote log or app output"
    if path.suffix in (".gguf", ".safetensors", ".bin"):
        return "model file (the Space downloads its models from their repos)"
    if path.suffix in (".tmp", ".partial"):
        return "temporary file"
    return None


def space_files(space_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The files of space/ that the Space gets, and the ones left out with the reason (sorted, POSIX paths)."""
    kept, left_out = [], []
    for path in sorted(space_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = PurePosixPath(path.relative_to(space_dir).as_posix())
        reason = leave_out_reason(relative)
        if reason is None:
            kept.append(str(relative))
        elif reason not in QUIET_REASONS:  # the rest is worth a line
            left_out.append((str(relative), reason))
    return kept, left_out


def sdk_version(pins: dict[str, str]) -> str:
    """The Space card's sdk_version: requirements-space.txt's gradio pin, whatever gradio is installed here (the
    Space installs sdk_version's gradio beside requirements.txt, so both name one version; deploying from a Colab
    with another gradio changes nothing). The pin is what the tests ran against.

    >>> sdk_version({"gradio": "6.31.0", "llama-cpp-python": "0.3.36"})
    '6.31.0'
    """
    problems = []
    if "gradio" not in pins:
        problems.append(f"{REQUIREMENTS.name}: pin gradio (gradio==X.Y.Z) so the Space installs what its card says")
    if "llama-cpp-python" not in pins:
        problems.append(f"{REQUIREMENTS.name}: pin llama-cpp-python (llama-cpp-python==X.Y.Z); the Space compiles it")
    if problems:
        raise UsageError(problems)
    return pins["gradio"]


@dataclass
class SpaceTree:
    files: dict[str, bytes]  # path in the Space -> content, sorted by path
    variables: dict[str, str]
    left_out: list[tuple[str, str]]  # (path in space/, reason)


def build_tree(config: DeployConfig, space_dir: Path | None = None) -> SpaceTree:
    """Everything the Space gets, from space/, common/ (its sources), requirements-space.lock, the card template and
    --report's file, at the paths the repo has them (requirements.txt, pre-requirements.txt and README.md generated at
    the root, the report at REPORT_IN_SPACE). Local files only."""
    space_dir = SPACE_DIR if space_dir is None else space_dir
    problems = []
    if not (space_dir / APP_NAME).is_file():
        problems.append(f"{space_dir / APP_NAME} not found: the Space runs {APP_NAME} (its app_file) from the root "
                        f"of {space_dir.name}/; deploy from a checkout that has it")
    for path in (REQUIREMENTS, LOCK, TEMPLATE):
        if not path.is_file():
            problems.append(f"{path} not found: deploy from a full checkout of the project")
    if problems:
        raise UsageError(problems)
    pins = read_pins(REQUIREMENTS.read_text(encoding="utf-8"))
    gradio_version = sdk_version(pins)
    # The lock's versions are what the Space installs: one that no longer matches the pins would ship an old tree.
    stale = staleness(LOCK, REQUIREMENTS, None)
    if stale:
        raise UsageError(stale)
    requirements = LOCK.read_bytes()
    card = render_card(config, TEMPLATE.read_text(encoding="utf-8"), gradio_version, pins["llama-cpp-python"])

    kept, left_out = space_files(space_dir)
    files = {f"{PACKAGE}/{name}": (space_dir / name).read_bytes() for name in kept}
    for path in sorted(BASE_DIR.rglob("*.py")):
        if "__pycache__" not in path.parts:
            files[f"{BASE_DIR.name}/{path.relative_to(BASE_DIR).as_posix()}"] = path.read_bytes()
    if config.report:
        files[REPORT_IN_SPACE] = report_file(config.report).read_bytes()
    files["README.md"] = card.encode("utf-8")
    files["requirements.txt"] = requirements
    files["pre-requirements.txt"] = PRE_REQUIREMENTS.encode()
    return SpaceTree(files=dict(sorted(files.items())), variables=config.variables(), left_out=left_out)


# ---------------------------------------------------------------- --dry-run: the tree into a folder
def _is_previous_dry_run(folder: Path) -> bool:
    try:
        return json.loads((folder / VARIABLES_FILE).read_text()).get("written_by") == WRITTEN_BY
    except (OSError, ValueError, AttributeError):
        return False


def write_dry_run(target: Path, config: DeployConfig, tree: SpaceTree) -> None:
    """The tree into `target`, whole or not at all: built in a temporary folder beside it, then renamed. A folder a
    previous dry run wrote is replaced; any other non-empty folder is refused."""
    if target.exists() and not target.is_dir():
        raise UsageError([f"--dry-run {target}: is a file; give a folder"])
    if problem := output_folder_problem(target):
        raise UsageError([f"--dry-run {target}: {problem}; choose a folder this user can write"])
    if target.resolve().is_relative_to(SPACE_DIR.resolve()):
        raise UsageError([f"--dry-run {target}: is inside {SPACE_DIR.name}/, whose files the Space gets (the next "
                          "deploy would upload it); choose a folder outside it"])
    if target.is_dir() and any(target.iterdir()) and not _is_previous_dry_run(target):
        raise UsageError([f"--dry-run {target}: folder exists and is not empty; give a new or empty folder (a "
                          f"folder an earlier --dry-run wrote, recognised by its {VARIABLES_FILE}, is replaced)"])
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, prefix=f".{target.name}.")
    staging = temporary_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    for name, content in tree.files.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    record = {"written_by": WRITTEN_BY, "space_id": config.space_id, "hardware": HARDWARE, "private": config.private,
              "variables": tree.variables}
    (staging / VARIABLES_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    swap_in_folder(staging, target)
