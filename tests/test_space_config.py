"""The Space's settings (space/config.py): one rule, flag > environment variable > default, for every setting; every
value checked the same way whichever way it came, and every problem reported at once, one line each naming where
the value came from. Pure: no model, no server."""

import pytest

from common.cli import UsageError
from space.config import SpaceConfig, build_parser, config_from_args, environment_setting, settings
from space.engine import DEFAULT_CACHE_MB, DEFAULT_N_CTX, DEFAULT_SLOTS


def test_the_defaults_without_flags_or_variables():
    config = config_from_args([], environ={})
    assert config == SpaceConfig()
    assert (config.n_ctx, config.slots, config.cache_mb, config.cache_bytes) == (
        DEFAULT_N_CTX, DEFAULT_SLOTS, DEFAULT_CACHE_MB, DEFAULT_CACHE_MB * 2**20)
    assert (config.host, config.port, config.votes, config.votes_repo, config.report, config.catalog) == (
        "0.0.0.0", 7860, "votes/votes.jsonl", None, None, None)
    assert (config.model, config.server, config.example, config.share) == ([], [], [], False)


# (field, flag arguments, environment variable, its text, the value from the flag, the value from the variable)
EVERY_SETTING = [
    ("host", ["--host", "127.0.0.1"], "GRADIO_SERVER_NAME", "10.0.0.2", "127.0.0.1", "10.0.0.2"),
    ("port", ["--port", "7861"], "GRADIO_SERVER_PORT", "8080", 7861, 8080),
    ("n_ctx", ["--n-ctx", "2048"], "SPACE_N_CTX", "1024", 2048, 1024),
    ("votes", ["--votes", "a.jsonl"], "SPACE_VOTES_PATH", "/data/votes.jsonl", "a.jsonl", "/data/votes.jsonl"),
    ("votes_repo", ["--votes-repo", "me/v"], "SPACE_VOTES_REPO", "you/v", "me/v", "you/v"),
    ("report", ["--report", "r.json"], "SPACE_REPORT", "reports/compare.json", "r.json", "reports/compare.json"),
    ("slots", ["--slots", "2"], "SPACE_SLOTS", "8", 2, 8),
    ("cache_mb", ["--cache-mb", "0"], "SPACE_CACHE_MB", "64", 0, 64),
    ("max_sessions", ["--max-sessions", "3"], "SPACE_MAX_SESSIONS", "200", 3, 200),
    ("memory_log_interval", ["--memory-log-interval", "0"], "SPACE_MEMORY_LOG_INTERVAL", "30", 0.0, 30.0),
    ("compare_mode", ["--compare-mode", "sequential"], "SPACE_COMPARE_MODE", "interleaved", "sequential",
     "interleaved"),
    ("stream_interval", ["--stream-interval", "0"], "SPACE_STREAM_INTERVAL", "0.25", 0.0, 0.25),
    ("example", ["--example", "A?", "--example", "B?"], "SPACE_EXAMPLES", "C?\n\nD?\n", ["A?", "B?"], ["C?", "D?"]),
]


@pytest.mark.parametrize("name, flags, variable, text, from_flag, from_variable", EVERY_SETTING,
                         ids=[row[0] for row in EVERY_SETTING])
def test_a_flag_beats_its_variable_which_beats_the_default(name, flags, variable, text, from_flag, from_variable):
    assert getattr(config_from_args(flags, environ={variable: text}), name) == from_flag
    assert getattr(config_from_args([], environ={variable: text}), name) == from_variable
    blank = config_from_args([], environ={variable: "  "})  # a blank variable is an unset one
    assert getattr(blank, name) == getattr(SpaceConfig(), name) and name not in blank.sources


def test_every_setting_with_a_variable_is_in_the_table_above():
    """Each setting's flag and variable are named by its field, and the flags come from the fields."""
    with_variables = {setting.name for setting in settings() if setting.metadata["env"] and setting.metadata["flag"]}
    assert with_variables == {row[0] for row in EVERY_SETTING}
    helped = build_parser().format_help()
    for setting in settings():
        flag = "--" + setting.name.replace("_", "-")
        assert (flag in helped) == setting.metadata["flag"]
        if setting.metadata["env"] and setting.metadata["flag"]:
            assert f"${setting.metadata['env']}" in " ".join(helped.split())


def test_the_catalog_comes_from_its_variable_alone():
    assert config_from_args([], environ={"SPACE_MODELS": '[{"label": "1B"}]'}).catalog == '[{"label": "1B"}]'
    with pytest.raises(UsageError, match="unrecognized arguments: --catalog"):
        config_from_args(["--catalog", "[]"], environ={})
    assert config_from_args(["--share"], environ={}).share is True


@pytest.mark.parametrize("variable, text, line", [
    ("SPACE_N_CTX", "4k", "SPACE_N_CTX in the environment: '4k' is not a whole number >= 256, e.g. 4096 (the default)"),
    ("SPACE_N_CTX", "128", "SPACE_N_CTX in the environment: '128' is not a whole number >= 256"),
    ("SPACE_CACHE_MB", "lots", "SPACE_CACHE_MB in the environment: 'lots' is not a whole number >= 0, e.g. 512"),
    ("SPACE_CACHE_MB", "-1", "SPACE_CACHE_MB in the environment: '-1' is not a whole number >= 0"),
    ("SPACE_CACHE_MB", "1.5", "SPACE_CACHE_MB in the environment: '1.5' is not a whole number >= 0"),
    ("SPACE_MAX_SESSIONS", "1G", "SPACE_MAX_SESSIONS in the environment: '1G' is not a whole number >= 1"),
    ("SPACE_SLOTS", "0", "SPACE_SLOTS in the environment: '0' is not a whole number >= 1, e.g. 4 (the default)"),
    ("GRADIO_SERVER_PORT", "70000", "GRADIO_SERVER_PORT in the environment: '70000' is not a whole number from 0 "
                                    "to 65535"),
    ("SPACE_MEMORY_LOG_INTERVAL", "nan", "SPACE_MEMORY_LOG_INTERVAL in the environment: 'nan' is not a finite number"),
    ("SPACE_STREAM_INTERVAL", "inf", "SPACE_STREAM_INTERVAL in the environment: 'inf' is not a finite number >= 0"),
    ("SPACE_COMPARE_MODE", "sideways", "SPACE_COMPARE_MODE in the environment: 'sideways' is not one of: "
                                       "sequential, interleaved"),
    ("SPACE_VOTES_REPO", "votes", "SPACE_VOTES_REPO in the environment: 'votes' is not a Hub dataset id (owner/name)"),
])
def test_a_bad_variable_is_one_line_naming_it_the_value_and_what_fits(variable, text, line):
    with pytest.raises(UsageError) as refused:
        config_from_args([], environ={variable: text})
    assert refused.value.problems == [refused.value.problems[0]] and refused.value.problems[0].startswith(line)


def test_a_bad_flag_is_named_as_the_flag_and_every_problem_comes_at_once():
    environ = {"SPACE_SLOTS": "many", "SPACE_N_CTX": "2048"}
    with pytest.raises(UsageError) as refused:
        config_from_args(["--n-ctx", "4k", "--port", "-1", "--compare-mode", "sideways"], environ=environ)
    assert refused.value.problems == [
        "--port: '-1' is not a whole number from 0 to 65535, e.g. 7860 (the default)",
        "--n-ctx: '4k' is not a whole number >= 256, e.g. 4096 (the default)",
        "SPACE_SLOTS in the environment: 'many' is not a whole number >= 1, e.g. 4 (the default)",
        "--compare-mode: 'sideways' is not one of: sequential, interleaved",
    ]


def test_the_object_built_in_code_is_checked_as_the_flags_are():
    """Tests and scripts build the same object; a wrong value there is named as its flag."""
    with pytest.raises(UsageError, match=r"^--cache-mb: '-5' is not a whole number >= 0") as refused:
        SpaceConfig(cache_mb=-5)
    assert len(refused.value.problems) == 1
    with pytest.raises(UsageError, match="--host: '' is empty"):
        SpaceConfig(host="")
    assert SpaceConfig(memory_log_interval=0, example=["Hi?"]).example == ["Hi?"]


def test_one_setting_from_the_environment_for_another_entry_point():
    assert environment_setting("cache_mb", {"SPACE_CACHE_MB": "64"}) == 64
    assert environment_setting("cache_mb", {"SPACE_CACHE_MB": "", "SPACE_N_CTX": "bad"}) == DEFAULT_CACHE_MB
    with pytest.raises(UsageError, match=r"^SPACE_CACHE_MB in the environment: '1\.5' is not a whole number"):
        environment_setting("cache_mb", {"SPACE_CACHE_MB": "1.5"})
