"""SpaceConfig: every setting of the Space (`python space/app.py`), its flag, its environment variable, its default
and its check, in one dataclass; the app's flags are made from its fields.

    python space/app.py --n-ctx 2048 --slots 2                  # flags
    SPACE_N_CTX=2048 SPACE_SLOTS=2 python space/app.py          # the same as a Space's variables

One rule decides every setting: its flag when given, else its environment variable when set and not blank (a
Space's variables reach the app as environment variables), else its default. A repeatable flag (--model, --server,
--example) given at least once replaces its variable's whole list. A value from a flag and one from the environment
go through the same parsing and the same validate(), which reports every problem at once, one line each naming
where the value came from, the value and what fits, before any model is loaded.

    >>> config = config_from_args(["--slots", "2"], environ={"SPACE_SLOTS": "8", "SPACE_N_CTX": "2048"})
    >>> config.slots, config.n_ctx, config.cache_mb
    (2, 2048, 512)
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields

from common.cli import UsageError, UsageParser, config_field, field_default, one_line
from common.hub import looks_like_repo_id
from space.engine import COMPARE_MODES, DEFAULT_CACHE_MB, DEFAULT_N_CTX, DEFAULT_SLOTS

__all__ = ["SpaceConfig", "STREAM_INTERVAL", "build_parser", "config_from_args", "environment_setting"]

STREAM_INTERVAL = 0.1  # seconds between streamed updates (see space.replies.throttled); 0 = one update per token


def _setting(default, help: str, env: str | None = None, flag: bool = True, least=None, most=None,
             choices: Sequence[str] | None = None, metavar: str | None = None):
    """A field whose help text is its flag's --help; `env` names its environment variable, `least`/`most` bound a
    number, `flag=False` makes a setting the environment alone sets."""
    return config_field(default, help, env=env, flag=flag, least=least, most=most, choices=choices, metavar=metavar)


@dataclass
class SpaceConfig:
    """Every setting of the Space; built by config_from_args (flags and environment) or directly (tests), and checked
    the same way either way. A field's metadata holds its help, its environment variable and its bounds."""

    # What to serve
    model: list[str] = _setting([], "a local GGUF to serve (repeatable; label from the file name) instead of the "
                                "catalog", metavar="PATH")
    server: list[str] = _setting([], "an OpenAI-compatible server to serve beside the --model files (repeatable), "
                                 "e.g. 1B=http://10.0.0.5:8080/v1#llama-1b; its key, if it needs one, in "
                                 "OPENAI_API_KEY", metavar="LABEL=URL#MODEL")
    catalog: str | None = _setting(None, "the catalog as a JSON list of entries (scripts/deploy_space.py sets it), "
                                   "instead of space/models.yaml; --model and --server replace it",
                                   env="SPACE_MODELS", flag=False)
    # Where
    host: str = _setting("0.0.0.0", "the address to listen on (0.0.0.0: every interface)", env="GRADIO_SERVER_NAME")
    share: bool = _setting(False, "also serve through a public Gradio share link (https://*.gradio.live, valid for a "
                           "week while this process runs): the free way to let others chat from Colab or a laptop")
    port: int = _setting(7860, "the port to listen on", env="GRADIO_SERVER_PORT", least=0, most=65535)
    # The engine
    n_ctx: int = _setting(DEFAULT_N_CTX, "tokens of context per conversation", env="SPACE_N_CTX", least=256,
                         metavar="TOKENS")
    # Votes and the Leaderboard
    votes: str = _setting("votes/votes.jsonl", "where blind votes are appended (JSON lines)", env="SPACE_VOTES_PATH",
                          metavar="PATH")
    votes_repo: str | None = _setting(None, "a Hub dataset the vote log is pushed to every 10 minutes, and whose "
                                      "votes the Leaderboard also rates (optional)", env="SPACE_VOTES_REPO",
                                      metavar="OWNER/NAME")
    report: str | None = _setting(None, "compare's report (compare.json, or the folder scripts/compare.py --out "
                                  "wrote) whose headline figures the Leaderboard shows beside the votes (optional)",
                                  env="SPACE_REPORT", metavar="PATH")
    # Many users at once, and memory
    slots: int = _setting(DEFAULT_SLOTS, "conversations each model answers at once (continuous batching); more wait "
                          "in line. Each slot holds --n-ctx tokens of KV cache (4 x 4096: 512 MiB for 1B, 1.75 GiB for "
                          "3B)", env="SPACE_SLOTS", least=1, metavar="N")
    cache_mb: int = _setting(DEFAULT_CACHE_MB, "RAM per model for saved conversation states, MiB (least recently used "
                             "evicted first; 0 turns it off): 2 models x 512 MiB fit a 16 GB cpu-basic Space beside a "
                             "1B and a 3B", env="SPACE_CACHE_MB", least=0, metavar="MIB")
    max_sessions: int = _setting(1000, "visitors' sessions kept in memory (Gradio keeps ~0.2 MiB of state per "
                                 "session); the least recently active is dropped first, and with it its API "
                                 "conversation and its compare not yet voted on", env="SPACE_MAX_SESSIONS", least=1,
                                 metavar="N")
    memory_log_interval: float = _setting(600.0, "seconds between memory lines in the log (RSS, caches); 0 = none",
                                          env="SPACE_MEMORY_LOG_INTERVAL", least=0,
                                          metavar="SECONDS")
    # The tabs
    compare_mode: str = _setting("interleaved", "how a compare writes its two answers: both at once (interleaved), "
                                 "or A then B (sequential)", env="SPACE_COMPARE_MODE", choices=COMPARE_MODES)
    stream_interval: float = _setting(STREAM_INTERVAL, "seconds between streamed updates (0 = every token; each update "
                                      "costs the CPU that generation uses)", env="SPACE_STREAM_INTERVAL", least=0,
                                      metavar="SECONDS")
    example: list[str] = _setting([], "a chat example shown before the built-in ones (repeatable; SPACE_EXAMPLES "
                                  "holds one per line); the demo passes the questions its model was taught",
                                  env="SPACE_EXAMPLES", metavar="TEXT")
    # Where each value came from when not from its flag: field name -> its environment variable (for the errors).
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    @property
    def cache_bytes(self) -> int:
        """--cache-mb in bytes, as space.engine.Engine takes it."""
        return self.cache_mb * 2**20

    def problems(self) -> list[str]:
        """Every bad value, one line each: where it came from, the value, what fits (validate() raises them all).

        >>> SpaceConfig(slots=0, compare_mode="sideways", sources={"slots": "SPACE_SLOTS"})
        Traceback (most recent call last):
        common.cli.UsageError: SPACE_SLOTS in the environment: '0' is not a whole number >= 1, e.g. 4 (the default)
        --compare-mode: 'sideways' is not one of: sequential, interleaved
        """
        out = []
        for setting in settings():
            value = getattr(self, setting.name)
            where = (f"{self.sources[setting.name]} in the environment" if setting.name in self.sources
                     else flag_name(setting) if setting.metadata["flag"] else setting.metadata["env"])
            if problem := _problem(setting, value):
                out.append(f"{where}: {problem}")
            elif setting.name == "votes_repo" and value is not None and not looks_like_repo_id(value):
                out.append(f"{where}: {_shown(value)} is not a Hub dataset id (owner/name), e.g. "
                           "your-username/finetome-votes")
        return out

    def validate(self) -> None:
        if problems := self.problems():
            raise UsageError(problems)


def settings() -> list[Field]:
    """SpaceConfig's settings, in the order --help lists them (every field but `sources`)."""
    return [setting for setting in fields(SpaceConfig) if "help" in setting.metadata]


def flag_name(setting: Field) -> str:
    return "--" + setting.name.replace("_", "-")


def _shown(value) -> str:
    """A value as an error quotes it: its text in quotes, as typed (a number's too), on one line."""
    return one_line(repr(value if isinstance(value, str) else str(value)), 60)


def _problem(setting: Field, value) -> str | None:
    """What is wrong with one setting's value, without where it came from; None when it fits."""
    kind, meta = setting.type, setting.metadata
    least, most = meta["least"], meta["most"]
    if kind in ("int", "float"):
        is_number = isinstance(value, int if kind == "int" else (int, float)) and not isinstance(value, bool)
        fits = (is_number and math.isfinite(value) and (least is None or value >= least)
                and (most is None or value <= most))
        bounds = f"from {least} to {most}" if most is not None else f">= {least}"
        what = "whole number" if kind == "int" else "finite number"
        return None if fits else f"{_shown(value)} is not a {what} {bounds}, e.g. {field_default(setting)} (the default)"
    if kind == "bool":
        return None if isinstance(value, bool) else f"{_shown(value)} is not true or false"
    if kind == "list[str]":
        fits = isinstance(value, list) and all(isinstance(item, str) for item in value)
        return None if fits else f"{_shown(value)} is not a list of texts"
    if value is None and kind == "str | None":
        return None
    if not isinstance(value, str) or not value.strip():
        return f"{_shown(value)} is empty; give a value, e.g. {field_default(setting)} (the default)"
    if meta["choices"] and value not in meta["choices"]:
        return f"{_shown(value)} is not one of: {', '.join(meta['choices'])}"
    return None


def _parsed(setting: Field, text, from_environment: bool = False):
    """A flag's or a variable's text as the setting's type; text that does not parse is kept as it is, for
    validate() to name."""
    kind = setting.type
    if kind == "list[str]" and from_environment:  # one item per line, blank lines left out
        return [line for line in text.splitlines() if line.strip()]
    if kind in ("int", "float"):
        try:
            return (int if kind == "int" else float)(text)
        except ValueError:
            return text
    return text


def build_parser(description: str = "") -> UsageParser:
    """The app's flags, one per setting that has one; each value stays a text until config_from_args parses it, so
    that every problem is reported at once."""
    parser = UsageParser(
        prog="python space/app.py", description=description,
        epilog="Each setting is its flag when given, else its environment variable when set and not blank (a "
               "Space's variables), else its default; a repeatable flag replaces its variable's whole list. The "
               "catalog: --model/--server, else SPACE_MODELS (a JSON list), else space/models.yaml.")
    for setting in settings():
        meta = setting.metadata
        if not meta["flag"]:
            continue
        default = field_default(setting)
        shown = "none" if default in (None, []) else default
        env = f", or ${meta['env']}" if meta["env"] else ""
        options = dict(dest=setting.name, default=argparse.SUPPRESS, help=f"{meta['help']} (default: {shown}{env})")
        if setting.type == "bool":
            options["action"] = "store_true"
        else:
            options["metavar"] = meta["metavar"] or ("{" + ",".join(meta["choices"]) + "}" if meta["choices"]
                                                     else setting.name.upper())
            if setting.type == "list[str]":
                options["action"] = "append"
        parser.add_argument(flag_name(setting), **options)
    return parser


def _from_environment(names: Sequence[str], environ: Mapping[str, str] | None) -> tuple[dict, dict]:
    """The values of the named settings whose variables are set and not blank, and where each came from. `environ`
    None is the process's environment as it is now (a default argument would keep the object of import time)."""
    environ = os.environ if environ is None else environ
    values, sources = {}, {}
    for setting in settings():
        env = setting.metadata["env"]
        if setting.name in names and env and str(environ.get(env, "")).strip():
            values[setting.name] = _parsed(setting, environ[env], from_environment=True)
            sources[setting.name] = env
    return values, sources


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                     description: str = "") -> SpaceConfig:
    """The settings by the one rule (flag > environment variable > default); UsageError listing every problem.

    >>> config_from_args(["--example", "Hi?"], environ={"SPACE_EXAMPLES": "One?\\n\\nTwo?"}).example
    ['Hi?']
    >>> config_from_args([], environ={"SPACE_EXAMPLES": "One?\\n\\nTwo?", "SPACE_REPORT": " "}).example
    ['One?', 'Two?']
    """
    given = vars(build_parser(description).parse_args(argv))
    values, sources = _from_environment([setting.name for setting in settings() if setting.name not in given],
                                        environ)
    values.update({name: _parsed(setting, given[name]) for setting in settings()
                   if (name := setting.name) in given})
    return SpaceConfig(**values, sources=sources)


def environment_setting(name: str, environ: Mapping[str, str] | None = None):
    """One setting by the same rule without flags (its variable when set and not blank, else its default), checked
    as the app checks it: for another entry point that shares a Space setting but has flags of its own.

    >>> environment_setting("cache_mb", {"SPACE_CACHE_MB": "64"}), environment_setting("cache_mb", {})
    (64, 512)
    >>> environment_setting("cache_mb", {"SPACE_CACHE_MB": "lots"})
    Traceback (most recent call last):
    common.cli.UsageError: SPACE_CACHE_MB in the environment: 'lots' is not a whole number >= 0, e.g. 512 (the default)
    """
    values, sources = _from_environment([name], environ)
    return getattr(SpaceConfig(**values, sources=sources), name)
