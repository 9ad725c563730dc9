"""Every entry script (tests/test_layout.py's ENTRY_SCRIPTS) answers `--help` and a flag it does not have without
doing any work: run as a user runs it, from an empty folder, with the project's cache, the demo's output folder and
the repository's outputs/ watched. `--help` exits 0 with its usage; a bogus flag exits 2 with one `error:` line naming
it (common/cli.py's protocol), never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_layout import ENTRY_SCRIPTS


def tree(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative path -> modification time in ns); {} when it does not exist."""
    return {path.relative_to(folder).as_posix(): path.stat().st_mtime_ns
            for path in folder.rglob("*") if path.is_file()} if folder.exists() else {}


@pytest.fixture
def untouched(tmp_path):
    """Runs a script with a flag from an empty working folder, an empty FINETOME_CACHE, and DEMO_OUT holding a
    previous demo run (what `scripts/demo.py --help` once deleted); asserts that nothing there nor in outputs/
    changed, and returns the finished process."""
    cwd, cache, demo = tmp_path / "cwd", tmp_path / "cache", tmp_path / "demo"
    cwd.mkdir()
    (demo / "train").mkdir(parents=True)
    (demo / "train" / "run.json").write_text("{}")
    env = {**os.environ, "FINETOME_CACHE": str(cache), "DEMO_OUT": str(demo), "DEMO_NO_LAUNCH": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONDONTWRITEBYTECODE": "1"}
    watched = {folder: tree(folder) for folder in (cwd, cache, demo, REPO / "outputs")}

    def run(script: str, flag: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, str(REPO / script), flag], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=120)
        assert {folder: tree(folder) for folder in watched} == watched, f"{script} {flag} changed files"
        return result
    return run


@pytest.mark.parametrize("script", sorted(ENTRY_SCRIPTS))
def test_help_and_a_bad_flag_do_no_work(script, untouched):
    helped = untouched(script, "--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert helped.stdout.startswith("usage: ") and "--help" in helped.stdout and helped.stderr == ""

    refused = untouched(script, "--no-such-flag")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.splitlines() == ["error: unrecognized arguments: --no-such-flag"]
    assert refused.stdout == ""
