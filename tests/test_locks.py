"""The locks (requirements-*.lock, scripts/lock.py): each is up to date with its requirements file, the test
environment is exactly the dev lock, and the Space's requirements resolve, together with what Hugging Face's Gradio
image adds on its own command line, to exactly the Space lock. The Colab lock's proof is pip's dry run in
tests/test_install.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.locks import read_pins, staleness

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "lock.py"
sys.path.insert(0, str(SCRIPT.parent))
import lock  # noqa: E402  (scripts/ is not a package)

# The lock this environment was installed from: `make test` installs requirements-dev.lock; the upgrade check runs
# the tests in a scratch environment installed from its upgraded lock, and says so here.
INSTALLED_FROM = Path(os.environ.get("LOCK_UNDER_TEST") or REPO / "requirements-dev.lock")


def test_every_lock_is_up_to_date_with_its_requirements_file():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd="/")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == ("up to date: requirements-dev.lock, requirements-space.lock, "
                             "requirements-colab.lock\n")


@pytest.mark.parametrize("edit", ["pin", "new package", "lock settings"])
def test_a_lock_behind_its_source_is_named_with_the_fix(tmp_path, edit):
    target = lock.TARGETS["space"]
    source = tmp_path / "requirements-space.txt"
    text = (REPO / target.source).read_text()
    source.write_text({"pin": text.replace("openai==3.57.0", "openai==3.63.0"),
                       "new package": text + "numpy==2.3.0\n", "lock settings": text}[edit])
    settings = target if edit != "lock settings" else lock.Target(**{**target.__dict__,
                                                                     "platform": "x86_64-manylinux_2_28"})
    digest = settings.digest(source.read_text())
    problems = staleness(REPO / target.lock, source, digest)
    assert problems and all(problem.endswith("run `make lock` and commit the result") for problem in problems)
    assert problems[0].startswith("requirements-space.lock was not generated from today's requirements-space.txt")
    if edit == "pin":
        assert problems[1] == ("requirements-space.txt pins openai==3.63.0 but requirements-space.lock has "
                               "openai==3.57.0: run `make lock` and commit the result")
    # A comment is not an input: editing one leaves the lock up to date.
    source.write_text("# a new comment\n" + text.replace("\n", "  # and another\n", 1))
    assert staleness(REPO / target.lock, source, target.digest(source.read_text())) == []


def test_every_lock_pins_every_package_and_names_its_regeneration():
    for target in lock.TARGETS.values():
        text = (REPO / target.lock).read_text()
        assert text.startswith(f"# {target.lock}: ") and "`make lock`" in text.splitlines()[1]
        requirement_lines_ = [line for line in text.splitlines() if line[:1].isalnum()]
        assert len(requirement_lines_) == len(read_pins(text)) > 20, target.lock  # every requirement is `==`
        assert ("--hash=sha256:" in text) == target.hashes, target.lock
        assert "/tmp" not in text and "lock-" not in text.replace("make lock", "").replace("lock.py", ""), target.lock


def test_the_test_environment_is_exactly_the_dev_lock():
    """What `make test` installed (scripts/lock.py --sync dev): every package at the lock's version, nothing else."""
    installed = {name: version for name, version in lock.installed().items() if name != "pip"}
    assert lock.diff_pins(read_pins(INSTALLED_FROM.read_text()), installed) == []
    assert installed["torch"].endswith("+cpu")  # the CPU build, no nvidia packages
    assert not [name for name in installed if name.startswith("nvidia-")]


def test_the_space_resolves_to_exactly_its_lock_with_the_gradio_images_command_line(tmp_path, package_index):
    """pip's own resolver, as the Space's build runs it (`pip install -r requirements.txt gradio[oauth,mcp]==X
    "uvicorn>=0.14.0" "websockets>=10.4" spaces`, DESIGN.md), from nothing installed: the lock is the whole tree."""
    target = lock.TARGETS["space"]
    image = target.extra().split()
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(report), "-r", str(REPO / target.lock), *image],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {lock.canonical_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert lock.diff_pins(read_pins((REPO / target.lock).read_text()), resolved) == []
    assert {"gradio", "llama-cpp-python", "openai", "httpx2", "spaces", "uvicorn", "websockets", "mcp"} <= set(resolved)


def test_render_leaves_out_what_the_target_excludes_and_puts_options_back():
    target = lock.TARGETS["colab"]
    compiled = ("llama-cpp-python==0.3.36\n    # via -r /tmp/lock-x/requirements-space.txt\n"
                "nvidia-cublas-cu12==12.6.4.1 \\\n    --hash=sha256:aa\n    # via torch\n"
                "torch==2.9.0\n    # via -r /tmp/lock-x/colab-install-plan.txt\nsix==1.17.0\n")
    text = lock.render(target, compiled, {"llama-cpp-python": "--config-settings=a=b"}, "/tmp/lock-x")
    body = text.split(f"# inputs digest: {target.digest()}\n")[1]
    assert body == ("llama-cpp-python==0.3.36 --config-settings=a=b\n    # via -r requirements-space.txt\n"
                    "six==1.17.0\n")


def test_the_lock_scripts_examples():
    import doctest

    assert doctest.testmod(lock, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
