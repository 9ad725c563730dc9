"""What a deploy is asked to do: DeployConfig (the Space, its models, its variables, how long to wait) and the flags
of scripts/deploy_space.py that build it, every mistake named at once (one `error:` line each, exit 2).

    config = config_from_args(["--space-id", "alice/chat", "--model-3b", "alice/m3-GGUF"])
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field

from common.cli import UsageError, UsageParser
from common.hub import HubError, validate_repo_id
from common.llama3 import Q4_K_M_GLOB
from space.catalog import catalog_from_servers
from space.leaderboard import load_report
from space.replies import UserError

HARDWARE = "cpu-basic"  # 2 vCPUs, 16 GB RAM; a Gradio Space on it needs a paid plan to be created (2026-07-21)
GGUF_PATTERN = Q4_K_M_GLOB  # Llama.from_pretrained accepts a glob; export/to_gguf.py names files <Name>-Q4_K_M.gguf
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
                except HubError as error:
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
