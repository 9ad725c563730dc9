"""The stages' settings in one style (train/config.py's): a dataclass per stage whose fields are the flags, the parser
generated from the fields (help from the field, default from the dataclass), and validate() reporting every problem
at once, one line each. Here for export/config.py's ExportConfig and the shared helper in common/cli.py;
compare/config.py's CompareConfig is checked the same way in tests/test_compare.py. No model is touched."""

import dataclasses

import pytest

from common.cli import UsageError, field_default
from export.cli import main
from export.config import ExportConfig, build_parser, config_from_args
from train.config import TrainConfig
from train.config import build_parser as build_train_parser


@pytest.fixture
def adapter(tmp_path):
    """A folder that passes for a finished adapter (the config checks its two files, not their contents)."""
    folder = tmp_path / "run" / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def flags_of(parser) -> dict:
    return {action.dest: action for action in parser._actions if action.dest != "help"}


@pytest.mark.parametrize("config_class, build", [(ExportConfig, build_parser), (TrainConfig, build_train_parser)])
def test_the_parser_is_built_from_the_fields(config_class, build):
    """One flag per field, named after it, its help the field's help: nothing typed twice."""
    flags = flags_of(build())
    for field in dataclasses.fields(config_class):
        action = flags[field.name]
        assert action.option_strings == ["--" + field.name.replace("_", "-")]
        help_text = field.metadata["help"].split("{default}")[0]
        assert action.help.startswith(help_text) and "{default}" not in action.help, field.name
        if field.metadata.get("choices"):
            assert action.metavar == "{" + ",".join(field.metadata["choices"]) + "}"


def test_export_defaults_come_from_the_dataclass(adapter):
    flags = flags_of(build_parser())
    for field in dataclasses.fields(ExportConfig):
        default = field_default(field)
        if default is dataclasses.MISSING:
            assert flags[field.name].required, field.name
        else:
            assert flags[field.name].default == default, field.name
    assert config_from_args(["--adapter", str(adapter)]) == ExportConfig(adapter=str(adapter))
    assert "(default: 8)" in flags["probes"].help and "(default: 8192, measured" in flags["imatrix_tokens"].help
    assert "(default: q4_k_m)" in flags["quant"].help and "(default: float16)" in flags["merge_dtype"].help
    assert "default" not in flags["push"].help  # a switch is off unless given


def test_flags_parse_as_before(adapter, tmp_path):
    config = config_from_args(["--adapter", str(adapter), "--quant", "Q8_0", "q4_k_m", "--imatrix", "--push",
                               "--repo-id", "me/model", "--threads", "3", "--merge-dtype", "bfloat16"])
    assert config.quant == ["q8_0", "q4_k_m"] and config.imatrix == "auto" and config.push and not config.private
    assert (config.threads, config.merge_dtype, config.out_dir) == (3, "bfloat16", adapter.parent / "gguf")
    imatrix = tmp_path / "imatrix.gguf"
    imatrix.write_bytes(b"")
    assert config_from_args(["--adapter", str(adapter), "--imatrix", str(imatrix)]).imatrix == str(imatrix)


def test_validate_reports_every_problem_at_once(adapter, tmp_path):
    with pytest.raises(UsageError) as caught:
        ExportConfig(adapter=str(adapter), quant=["q4km"], push=True, threads=0, probes=-1, merge_dtype="fp8",
                     name="a b", imatrix_tokens=100, out=str(tmp_path / "o"))
    assert caught.value.problems == [
        "--quant q4km: unknown quant type; choose from: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m",
        "--push: needs --repo-id USER/NAME",
        "--merge-dtype 'fp8': choose one of: float16, bfloat16",
        "--threads 0: must be >= 1",
        "--probes -1: must be >= 0 (0 skips the behaviour probes)",
        "--imatrix-tokens 100: must be >= 1024 (two chunks of 512 tokens)",
        "--name 'a b': use letters, digits, '-', '_' and '.' (it names the files)",
    ]


def test_values_of_the_wrong_type_are_problems_not_crashes(tmp_path):
    with pytest.raises(UsageError) as caught:
        ExportConfig(adapter=None, quant="Q8_0", probes="many", probe_tokens=2.5, repo_id=5, imatrix=3)
    assert caught.value.problems == [
        "--adapter None: give the adapter/ folder a training run wrote (e.g. outputs/tiny/adapter)",
        "--repo-id 5: must look like USER/NAME (letters, digits, '-', '_', '.')",
        "--probes 'many': must be a whole number >= 0 (0 skips the behaviour probes)",
        "--probe-tokens 2.5: must be a whole number >= 1",
        "--imatrix: only k-quants use an importance matrix (q6_k, q5_k_m, q4_k_m); add one to --quant, or leave "
        "--imatrix out",
        "--imatrix 3: file not found; give an imatrix.gguf made by llama-imatrix, or --imatrix alone to calibrate on "
        "the run's own data",
    ]


@pytest.mark.parametrize("args, fragment", [
    (["--adapter", "/no/such/adapter"], "--adapter '/no/such/adapter': folder not found"),
    (["--push", "--repo-id", "not a repo"], "--repo-id 'not a repo': must look like USER/NAME"),
    (["--push-merged"], "--push-merged: only together with --push"),
    (["--out", "/dev/null"], "--out '/dev/null': exists and is not a folder; choose a folder this user can write"),
    (["--out", "/dev/null/o"], "--out '/dev/null/o': /dev/null is a file, not a folder"),
    (["--threads", "many"], "argument --threads: invalid int value: 'many'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_the_cli_prints_one_line_and_exits_2(adapter, tmp_path, capsys, args, fragment):
    argv = args if args[0] == "--adapter" else ["--adapter", str(adapter), *args]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [captured.err.strip()] and captured.err.startswith("error: ")
    assert fragment in captured.err and captured.out == ""


def test_the_cli_prints_every_problem_at_once(adapter, capsys):
    assert main(["--adapter", str(adapter), "--quant", "q4km", "--probes", "-1", "--push-merged"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: --") for line in lines), lines


def test_incomplete_adapter_is_a_usage_error(adapter, tmp_path):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UsageError, match="incomplete adapter"):
        ExportConfig(adapter=str(adapter), out=str(tmp_path / "o"))
