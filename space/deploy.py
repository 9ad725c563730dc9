"""Deploy the chat Space: create (or update) a Gradio Space on CPU hardware that serves the q4_k_m GGUFs, wait for
its build and check that every model answers.
The logic of scripts/deploy_space.py, its entry point (more commands in its docstring):

    python scripts/deploy_space.py --space-id USER/finetome-chat --model-1b USER/X-GGUF --dry-run out/space

The Space's tree mirrors the repo's: the package space/ (its app.py is the Space's app_file, space/app.py; this
file and the card template stay behind), the base package common/ beside it, requirements-space.lock as
requirements.txt (every package of the Space's tree pinned; it asks for a portable llama.cpp build), a
pre-requirements.txt pinning pip (installed first), and README.md, the Space card: YAML front matter from
this module and the body from space/README_space.md, and the modules of compare/ the Leaderboard imports. They go
up in one commit. The model catalog reaches the app as the Space variable SPACE_MODELS (--base-models adds the
untuned Llama-3.2 1B and 3B Instruct GGUFs); --votes-repo also sets SPACE_VOTES_REPO, --report ships compare's report
and sets SPACE_REPORT, and --variable KEY=VALUE any other variable the app reads (SPACE_VOTES_PATH, SPACE_N_CTX,
SPACE_COMPARE_MODE). Variables persist on the Space: one a previous deploy set and this one does not mention is left
as it is.

The token comes from HF_TOKEN or the saved login (`hf auth login`), is checked before any work, and only ever goes
to HfApi(token=...). --dry-run DIR needs neither a token nor the network: it writes the exact tree that would be
uploaded into DIR, plus DIR/.space_variables.json (the variables; not part of the upload).

Creating a Gradio Space needs a paid plan (PRO, or an organization on Team or Enterprise; space/deploy_hub.py): a
free account is stopped before the upload, with its free alternatives; a Space that exists is updated without a
create. After the commit the deploy follows the Space's build to RUNNING and chats once with every model through the
app's /chat API (space/deploy_hub.py); --no-wait commits and returns.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd
from huggingface_hub.errors import HfHubHTTPError

from common.cli import UsageError, UsageParser, report_problem
from common.files import output_folder_problem, remove_stale_temporaries, swap_in_folder, temporary_path
from common.locks import read_pins, staleness
from export.errors import ExportError
from export.hub import HTTP_FIXES, hub_errors, resolve_token, validate_repo_id
from space.catalog import catalog_from_servers
from space.deploy_card import APP_NAME, GGUF_PATTERN, PACKAGE, TEMPLATE, render_card, space_files
from space.deploy_hub import (PLAN_NEEDED, Wait, check_answers, create_problem, existing_space, payment_error,
                              space_url, wait_until_running)
from space.leaderboard import load_report, report_file
from space.replies import UserError

REPO = Path(__file__).resolve().parents[1]
# Read at call time, so tests can point them at a folder of their own.
SPACE_DIR = REPO / "space"
BASE_DIR = REPO / "common"  # the base package the app imports; the Space gets it beside space/
COMPARE_DIR = REPO / "compare"
COMPARE_MODULES = ("__init__.py", "ratings.py", "report.py")  # what the app imports of compare/ (the Leaderboard)
REQUIREMENTS = REPO / "requirements-space.txt"  # what the app needs, edited by hand
LOCK = REPO / "requirements-space.lock"  # its whole tree pinned (`make lock`): the Space's requirements.txt

HARDWARE = "cpu-basic"  # 2 vCPUs, 16 GB RAM; a Gradio Space on it needs a paid plan to be created (2026-07-21)
# The Space's pre-requirements.txt, installed before requirements.txt: the lock's per-requirement --config-settings
# line needs pip >= 23.1 (older Gradio images had pip 22.3.1, which refuses it); 26.3 is the pip tested here.
PRE_REQUIREMENTS = "pip==26.3\n"
LABELS = {"1b": "Llama-3.2-1B FineTome (q4_k_m)", "3b": "Llama-3.2-3B FineTome (q4_k_m)"}
# The untuned models the fine-tunes start from (train/config.py's bases, unsloth/Llama-3.2-{1B,3B}-Instruct) as public
# q4_k_m GGUFs, named exactly: --base-models puts them in the arena beside the fine-tunes.
BASE_MODELS = (
    {"label": "Llama-3.2-1B Instruct base (q4_k_m)", "repo_id": "unsloth/Llama-3.2-1B-Instruct-GGUF",
     "filename": "Llama-3.2-1B-Instruct-Q4_K_M.gguf"},
    {"label": "Llama-3.2-3B Instruct base (q4_k_m)", "repo_id": "unsloth/Llama-3.2-3B-Instruct-GGUF",
     "filename": "Llama-3.2-3B-Instruct-Q4_K_M.gguf"},
)
MODELS_VARIABLE = "SPACE_MODELS"
VOTES_REPO_VARIABLE = "SPACE_VOTES_REPO"
REPORT_VARIABLE = "SPACE_REPORT"
REPORT_IN_SPACE = "reports/compare.json"  # where --report's file goes in the Space (the app runs from its root)
VARIABLE_DESCRIPTIONS = {
    MODELS_VARIABLE: "The models the app serves: JSON list of {label, repo_id, filename} (set by deploy_space.py)",
    VOTES_REPO_VARIABLE: "Hub dataset the blind-vote log is pushed to (set by deploy_space.py)",
    REPORT_VARIABLE: "compare's report, whose figures the Leaderboard shows (set by deploy_space.py)",
}
SET_BY = {MODELS_VARIABLE: "--model-1b/--model-3b", VOTES_REPO_VARIABLE: "--votes-repo", REPORT_VARIABLE: "--report"}
VARIABLES_FILE = ".space_variables.json"  # in a --dry-run folder only; also marks the folder as a dry run's
WRITTEN_BY = "scripts/deploy_space.py --dry-run"
NO_TOKEN = ("deploying needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login` "
            "(--dry-run DIR builds the Space's files without one)")
# The fix for the HTTP statuses a deploy typically meets, on top of the export's (401, 403, 429).
DEPLOY_HTTP_FIXES = {
    **HTTP_FIXES,
    402: f"the Hub wants payment for this Space: {PLAN_NEEDED}",  # create_repo's 402 keeps the Hub's text too
}


# ---------------------------------------------------------------- configuration
@dataclass
class DeployConfig:
    space_id: str
    model_1b: str | None = None
    model_3b: str | None = None
    private: bool = False
    dry_run: str | None = None
    votes_repo: str | None = None
    variable: list[str] = field(default_factory=list)
    report_url: str | None = None
    server: list[str] = field(default_factory=list)
    server_key_env: str | None = None
    base_models: bool = False
    report: str | None = None
    no_wait: bool = False
    poll_interval: float = 15.0
    wait_timeout: float = 1800.0

    def __post_init__(self):
        problems = []
        for flag, value in (("--space-id", self.space_id), ("--model-1b", self.model_1b),
                            ("--model-3b", self.model_3b), ("--votes-repo", self.votes_repo)):
            if value is not None:
                try:
                    validate_repo_id(value, flag)
                except ExportError as error:
                    problems.append(str(error))
        try:
            catalog_from_servers(self.server)
        except UserError as error:
            problems.append(str(error))
        if self.server_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.server_key_env):
            problems.append(f"--server-key-env {self.server_key_env!r}: expected a secret's name like LLAMA_KEY")
        if not self.model_1b and not self.model_3b and not self.server and not self.base_models:
            problems.append("no model to serve: give --model-1b USER/NAME-GGUF and/or --model-3b USER/NAME-GGUF "
                            "(the Hub repos export/to_gguf.py --push wrote), or --server LABEL=URL#MODEL")
        elif self.model_1b and self.model_1b == self.model_3b:
            problems.append(f"--model-1b and --model-3b are both {self.model_1b!r}: give the 1B and the 3B repo")
        for item in self.variable:
            key, equals, _ = item.partition("=")
            if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                problems.append(f"--variable {item!r}: expected KEY=VALUE with KEY a name like SPACE_VOTES_PATH")
            elif key in SET_BY:
                problems.append(f"--variable {key}: set by {SET_BY[key]}; leave it out of --variable")
        for flag, value, default in (("--poll-interval", self.poll_interval, 15),
                                     ("--wait-timeout", self.wait_timeout, 1800)):
            if not 0 < value < float("inf"):
                problems.append(f"{flag} {value:g}: give a number of seconds above 0 (default {default})")
        if self.report_url is not None and not re.match(r"https?://\S+$", self.report_url):
            problems.append(f"--report-url {self.report_url!r}: expected an http(s):// address")
        if self.report is not None:
            try:
                load_report(self.report)
            except UserError as error:
                problems.append(str(error))
        if problems:
            raise UsageError(problems)

    def variables(self) -> dict[str, str]:
        """The Space variables this deploy sets, name -> value (the Hub stores strings).

        >>> variables = DeployConfig("alice/chat", model_3b="alice/m3-GGUF", variable=["SPACE_N_CTX=2048"]).variables()
        >>> variables["SPACE_MODELS"]
        '[{"label": "Llama-3.2-3B FineTome (q4_k_m)", "repo_id": "alice/m3-GGUF", "filename": "*Q4_K_M.gguf"}]'
        >>> variables["SPACE_N_CTX"]
        '2048'
        """
        variables = {MODELS_VARIABLE: json.dumps(self.catalog())}
        if self.votes_repo:
            variables[VOTES_REPO_VARIABLE] = self.votes_repo
        if self.report:
            variables[REPORT_VARIABLE] = REPORT_IN_SPACE
        for item in self.variable:
            key, _, value = item.partition("=")
            variables[key] = value
        return variables

    def catalog(self) -> list[dict]:
        """What SPACE_MODELS holds: the 1B model, then the 3B, whichever were given, the bases, the servers."""
        repos = (("1b", self.model_1b), ("3b", self.model_3b))
        servers = [{"label": spec.label, "base_url": spec.base_url, "model": spec.model,
                    **({"api_key_env": self.server_key_env} if self.server_key_env else {})}
                   for spec in catalog_from_servers(self.server)]
        return [{"label": LABELS[size], "repo_id": repo, "filename": GGUF_PATTERN} for size, repo in repos if repo] \
            + [dict(model) for model in BASE_MODELS if self.base_models] + servers


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="python scripts/deploy_space.py",
                     description="Create or update the Gradio chat Space (CPU) that serves the q4_k_m GGUFs, then "
                                 "wait for its build and chat once with every model. Creating a Gradio Space needs "
                                 "a paid plan (PRO, or an organization on Team or Enterprise); an existing Space is "
                                 "updated with any account; `python space/app.py --share` is the free way to share.")
    parser.add_argument("--space-id", required=True, help="the Space, USER/NAME (created if it does not exist: that "
                        "needs PRO under a user, Team or Enterprise under an organization)")
    parser.add_argument("--model-1b", help="Hub repo of the 1B q4_k_m GGUF, USER/NAME (at least one of the two)")
    parser.add_argument("--model-3b", help="Hub repo of the 3B q4_k_m GGUF, USER/NAME")
    parser.add_argument("--private", action="store_true", help="create the Space private (an existing Space keeps "
                        "its visibility)")
    parser.add_argument("--dry-run", metavar="DIR", help="write the files that would be uploaded into DIR (and the "
                        f"variables into DIR/{VARIABLES_FILE}) instead of deploying; needs no token")
    parser.add_argument("--votes-repo", metavar="USER/NAME", help=f"a Hub dataset the app pushes the vote log to "
                        f"(sets {VOTES_REPO_VARIABLE}; the Space then needs an HF_TOKEN secret that may write it)")
    parser.add_argument("--variable", action="append", default=[], metavar="KEY=VALUE",
                        help="another Space variable for the app, e.g. SPACE_VOTES_PATH=/data/votes.jsonl (repeatable)")
    parser.add_argument("--report-url", help="link to the comparison report scripts/compare.py wrote, for the card")
    parser.add_argument("--report", metavar="PATH",
                        help=f"compare's report (compare.json, or the folder scripts/compare.py --out wrote), shown "
                             f"on the Leaderboard: shipped as {REPORT_IN_SPACE}, sets {REPORT_VARIABLE}")
    parser.add_argument("--base-models", action="store_true", help="also serve the untuned Llama-3.2 1B and 3B "
                        "Instruct q4_k_m GGUFs (unsloth's), so the arena also tells whether fine-tuning helped")
    parser.add_argument("--server", action="append", default=[], metavar="LABEL=URL#MODEL",
                        help="an OpenAI-compatible server the Space also offers (repeatable), e.g. "
                             "'1B (llama-server)=http://10.0.0.5:8080/v1#llama-1b' (scripts/serve_openai.py)")
    parser.add_argument("--server-key-env", metavar="SECRET",
                        help="the Space secret holding the servers' API key (add it in the Space's settings; the "
                             "key itself never goes through this command)")
    parser.add_argument("--no-wait", action="store_true", help="commit and return, without following the build or "
                        "checking that the models answer")
    parser.add_argument("--poll-interval", type=float, default=15.0, metavar="SECONDS",
                        help="seconds between two looks at the Space's build (default 15)")
    parser.add_argument("--wait-timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="give up waiting for RUNNING after this long (default 1800: the first build compiles "
                             "llama.cpp, 10-15 minutes)")
    return parser


def config_from_args(argv: list[str] | None = None) -> DeployConfig:
    return DeployConfig(**vars(build_parser().parse_args(argv)))


# ---------------------------------------------------------------- the Space's files (pure, no network)
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
    """Everything the Space gets, from space/, common/, compare/'s COMPARE_MODULES, requirements-space.lock, the card
    template and --report's file, at the paths the repo has them (requirements.txt, pre-requirements.txt and README.md
    generated at the root, the report at REPORT_IN_SPACE). Local files only."""
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
    for name in COMPARE_MODULES:
        files[f"{COMPARE_DIR.name}/{name}"] = (COMPARE_DIR / name).read_bytes()
    if config.report:
        files[REPORT_IN_SPACE] = report_file(config.report).read_bytes()
    files["README.md"] = card.encode("utf-8")
    files["requirements.txt"] = requirements
    files["pre-requirements.txt"] = PRE_REQUIREMENTS.encode()
    return SpaceTree(files=dict(sorted(files.items())), variables=config.variables(), left_out=left_out)


# ---------------------------------------------------------------- outputs: a folder, or the Hub
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


def check_account(client, config: DeployConfig, token: str | None = None):
    """Before the upload: the Space's SpaceInfo when it exists (then it is only updated), else whether this account
    may create it (deploy_hub.create_problem); one-line ExportError otherwise."""
    with hub_errors(f"deploying to the Space {config.space_id}", token, DEPLOY_HTTP_FIXES, retry="deploy again"):
        info = existing_space(client, config.space_id)
        problem = None if info is not None else create_problem(config.space_id, client.whoami())
    if problem:
        raise ExportError(problem)
    return info


def deploy(client, config: DeployConfig, tree: SpaceTree, token: str | None = None, exists: bool = False) -> dict:
    """Create the Space unless it `exists`, set its variables, and upload the tree in one commit.

    client has HfApi's interface (HfApi(token=...) in real use). Variables go first: each change restarts the Space,
    and setting them before the commit lets the build that the commit starts see them. Files already in the Space
    that the tree lacks are reported, never deleted (they may be data someone put there). A 402 on the create keeps
    the Hub's text and names the plan. Returns {"space_url", "commit_url", "commit_sha", "stale"}.
    """
    space_id, action = config.space_id, f"deploying to the Space {config.space_id}"
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
                  for name, content in tree.files.items()]
    with hub_errors(action, token, DEPLOY_HTTP_FIXES, retry="deploy again"):
        if not exists:
            try:
                client.create_repo(space_id, repo_type="space", space_sdk="gradio", space_hardware=HARDWARE,
                                   private=config.private, exist_ok=True)
            except HfHubHTTPError as error:
                if getattr(error.response, "status_code", None) == 402:
                    raise payment_error(action, error, token) from error
                raise
        for key, value in tree.variables.items():
            client.add_space_variable(space_id, key, value, description=VARIABLE_DESCRIPTIONS.get(key))
        existing = client.list_repo_files(space_id, repo_type="space")
        commit = client.create_commit(space_id, operations, repo_type="space",
                                      commit_message=f"Deploy the chat Space: {len(operations)} files",
                                      commit_description="Models: " + ", ".join(
                                          model.get("repo_id") or model["label"] for model in config.catalog()))
    # .gitattributes is the Hub's own (LFS rules); it is never part of the tree.
    stale = sorted(set(existing) - set(tree.files) - {".gitattributes"})
    return {"space_url": f"https://huggingface.co/spaces/{space_id}", "stale": stale,
            "commit_url": getattr(commit, "commit_url", None), "commit_sha": getattr(commit, "oid", None)}


def _print_tree(tree: SpaceTree) -> None:
    for name, content in tree.files.items():
        print(f"  {name}  ({len(content):,} bytes)")
    for name, reason in tree.left_out:
        print(f"  left out: space/{name} ({reason})")
    for key, value in tree.variables.items():
        print(f"  variable {key} = {value}")


def main(argv: list[str] | None = None, client=None) -> int:
    try:
        config = config_from_args(argv)
    except UsageError as error:
        return error.report()

    token = None
    if not config.dry_run:
        try:
            token = resolve_token()  # before any work: a missing token should not cost a build first
        except ExportError:
            print(f"error: {NO_TOKEN}", file=sys.stderr)
            return 1

    try:
        tree = build_tree(config)
        if config.dry_run:
            target = Path(config.dry_run).expanduser()
            write_dry_run(target, config, tree)
            print(f"dry run: the Space {config.space_id} would get these files, now in {target}/ "
                  f"(variables in {target / VARIABLES_FILE}, not uploaded):")
            _print_tree(tree)
            print("nothing was uploaded; run again without --dry-run to deploy")
            return 0
    except UsageError as error:
        return error.report()

    if client is None:
        from huggingface_hub import HfApi

        client = HfApi(token=token)
    try:
        info = check_account(client, config, token)
        print(f"{'updating' if info else 'creating'} the Space {config.space_id} ({HARDWARE}):")
        _print_tree(tree)
        result = deploy(client, config, tree, token=token, exists=info is not None)
        for name in result["stale"]:
            print(f"note: the Space also has {name}, which this deploy did not write; delete it on the Space's Files "
                  "tab if it is left over from an earlier version")
        if result["commit_url"]:
            print(f"commit: {result['commit_url']}")
        if config.no_wait:
            print("the first build compiles llama.cpp (about 10-15 minutes); follow it in the Space's Logs tab")
        else:
            with hub_errors(f"following the Space {config.space_id}", token, retry="deploy again"):
                info = wait_until_running(client, config.space_id, result["commit_sha"],
                                          Wait(config.poll_interval, config.wait_timeout))
            check_answers(space_url(info, config.space_id), [model["label"] for model in config.catalog()], token,
                          config.space_id)
            print("every model answered: the Space is up")
    except ExportError as error:
        return report_problem(error)
    print(f"Space: {result['space_url']}")
    return 0
