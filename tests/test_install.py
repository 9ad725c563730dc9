"""The training install (train/install.py): its plan as a pure function of the installed torch, and the proof that
on Colab it keeps Colab's torch: pip's own dry run, through scripts/install_train.py, in a Python 3.12 virtualenv
whose site-packages holds a fake Colab torch 2.9.0+cu126 (metadata only, so pip believes it is installed).

The dry run needs Python 3.12 (Colab's) and the package index. Without either it skips, saying why (and where it
looked for a Python 3.12: point INSTALL_TEST_PYTHON at one); INSTALL_TEST_SKIP_DRY_RUN=1 skips it on purpose. The
virtualenv is cached under test-artifacts/, keyed by the fake torch's description; pip resolves from PyPI on every run
(its HTTP cache helps).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import find_python312, package_index_problem
from train import install
from train.install import InstallError, plan

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements-train.txt"
SCRIPT = REPO / "scripts" / "install_train.py"
ARTIFACTS = REPO / "test-artifacts"


def pins(path: Path = REQUIREMENTS) -> dict[str, str]:
    """{canonical name: version} of the file's `name==version` lines, read with packaging (not the module's parser)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            found[canonicalize_name(requirement.name)] = specifier.version
    return found


def step_names(step: list[str]) -> dict[str, str]:
    """{canonical name: requirement} of a pip step's requirement arguments (options left out)."""
    return {canonicalize_name(Requirement(arg).name): arg for arg in step[1:] if not arg.startswith("-")}


def is_torch_family(name: str) -> bool:
    name = canonicalize_name(name)
    return name in {"torch", "torchvision", "torchaudio", "triton"} or name.startswith(("nvidia-", "cuda-"))


# --- the plan, table-driven -------------------------------------------------------------------------------------

NO_DEPS_PINNED = ("unsloth", "unsloth-zoo", "trl", "peft", "accelerate", "bitsandbytes")


@pytest.mark.parametrize(("torch_version", "xformers", "torchao"), [
    ("2.8.0+cu126", "0.0.32.post2", "0.14.0"),
    ("2.9.0+cu126", "0.0.33.post1", "0.14.1"),   # Colab's torch as of this writing
    ("2.9.1", "0.0.33.post2", "0.15.0"),
    ("2.10.0+cu128", "0.0.34", "0.16.0"),
    ("2.13.0+cu126", None, None),                # newer than any build the tables know, inside unsloth's range
    ("2.10.0a0+git1234", None, None),            # a pre-release is not the release a wheel was built against
])
def test_on_colab_the_plan_keeps_torch_and_installs_the_pins(torch_version, xformers, torchao):
    result = plan(torch_version, True, REQUIREMENTS)
    plain, no_deps = result.steps
    assert result.keeps_torch and plain[0] == "install" and "--no-deps" not in plain
    assert no_deps[:2] == ["install", "--no-deps"]
    plain_names, no_deps_names, pinned = step_names(plain), step_names(no_deps), pins()
    # Every pin of requirements-train.txt is installed exactly once, as the file writes it.
    for name, version in pinned.items():
        step, other = (no_deps_names, plain_names) if name in NO_DEPS_PINNED else (plain_names, no_deps_names)
        assert name not in other, name
        assert Requirement(step[name]).specifier == Requirement(f"{name}=={version}").specifier, name
    assert not [name for name in (*plain_names, *no_deps_names) if is_torch_family(name)]
    assert no_deps_names.get("xformers") == (f"xformers=={xformers}" if xformers else None)
    # Without a torchao built for this torch, unsloth_zoo's own bound (pip keeps an installed torchao inside it).
    assert no_deps_names["torchao"] == (f"torchao=={torchao}" if torchao else "torchao>=0.13.0")
    assert f"Colab's torch {torch_version} kept" in result.why
    assert (f"xformers=={xformers} matched" if xformers else "no xformers") in result.why


@pytest.mark.parametrize(("torch_version", "on_colab", "where"), [
    ("2.9.0+cu126", False, "not on Colab"),
    (None, False, "not on Colab"),
    (None, True, "Colab without torch"),
])
def test_off_colab_or_without_torch_the_plan_is_todays_install(torch_version, on_colab, where):
    result = plan(torch_version, on_colab, REQUIREMENTS)
    assert result.steps == [["install", "-r", str(REQUIREMENTS)]] and not result.keeps_torch
    assert result.why.startswith(where)


@pytest.mark.parametrize("torch_version", ["2.15.0+cu126", "2.3.1", "nightly"])
def test_a_colab_torch_outside_unsloths_range_is_refused_with_the_fix(torch_version):
    with pytest.raises(InstallError, match=rf"torch {re.escape(torch_version)} is outside .*--no-colab"):
        plan(torch_version, True, REQUIREMENTS)


def test_the_pins_are_read_from_the_requirements_file(tmp_path):
    other = tmp_path / "requirements-train.txt"
    other.write_text("# another release\nunsloth==2099.1.1\nunsloth_zoo==2099.1.2  # zoo\ntrl==9.9.9\n"
                     "transformers==9.8.7\n")
    plain, no_deps = plan("2.9.0+cu126", True, other).steps
    assert no_deps[2:] == ["unsloth==2099.1.1", "unsloth_zoo==2099.1.2", "trl==9.9.9", "cut_cross_entropy",
                           "xformers==0.0.33.post1", "torchao==0.14.1"]
    assert plain[1] == "transformers==9.8.7"
    assert "unsloth 2099.1.1" in plan("2.9.0+cu126", True, other).why
    # The plain dependencies the file pins itself are not repeated from the module's list.
    assert [arg for arg in plain if canonicalize_name(Requirement(arg).name) == "transformers"] == ["transformers==9.8.7"]


@pytest.mark.parametrize(("text", "message"), [
    ("trl==1.15.0\n", "pins no unsloth"),
    ("-r other.txt\nunsloth==2026.10.9\n", "only requirements, not pip options"),
])
def test_a_requirements_file_the_plan_cannot_use_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "requirements-train.txt"
    path.write_text(text)
    with pytest.raises(InstallError, match=message):
        plan("2.9.0+cu126", True, path)


# --- the lock -------------------------------------------------------------------------------------------------

def lock_pins() -> dict[str, str]:
    from common.locks import read_pins

    return read_pins(install.LOCK.read_text())


def test_on_the_colab_torch_the_plan_installs_exactly_the_lock():
    torch = f"{install.COLAB_TORCH}+cu126"
    planned = plan(torch, True, REQUIREMENTS)
    locked = install.with_lock(planned, torch)
    assert locked.files == {} and locked.keeps_torch
    assert locked.steps == [["install", "--no-deps", "--require-hashes", "-r", str(install.LOCK)]]
    # The lock holds every package the plan names, at the plan's own pins and companions, and nothing of torch's.
    wanted = {**step_names(planned.steps[0]), **step_names(planned.steps[1])}
    assert sorted(set(wanted) - set(lock_pins())) == []
    for name, requirement in wanted.items():
        assert Requirement(requirement).specifier.contains(lock_pins()[name]), (requirement, lock_pins()[name])
    assert not [name for name in lock_pins() if is_torch_family(name)]
    assert all(line.startswith("    --hash=sha256:") or not line.startswith("    --")
               for line in install.LOCK.read_text().splitlines())


@pytest.mark.parametrize(("torch_version", "on_colab"), [("2.10.0+cu128", True), ("2.9.0+cu126", False), (None, False)])
def test_another_torch_keeps_the_locked_versions_without_hashes_or_companions(torch_version, on_colab):
    locked = install.with_lock(plan(torch_version, on_colab, REQUIREMENTS), torch_version)
    (path, text), = locked.files.items()
    assert all(step[1] == f"--constraint={path}" for step in locked.steps)
    constraints = dict(line.split("==") for line in text.splitlines())
    assert constraints == {name: version for name, version in lock_pins().items()
                           if name not in ("xformers", "torchao")}
    assert "without its hashes" in locked.why


def test_a_missing_lock_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(InstallError, match="requirements-colab.lock not found: .* `make lock`"):
        install.with_lock(plan("2.9.0+cu126", True, REQUIREMENTS), "2.9.0+cu126", tmp_path / "requirements-colab.lock")


def test_the_training_install_brings_the_exports_packages_at_the_tested_versions():
    """export/to_gguf.py runs after training on the same machine; its packages are the ones `make test` exports with."""
    dev = pins(REPO / "requirements-dev.txt")
    for name in ("llama-cpp-python", "sentencepiece", "protobuf"):
        assert pins()[name] == dev[name], name
    assert lock_pins()["llama-cpp-python"] == dev["llama-cpp-python"]


def test_colab_is_detected_from_its_release_tag():
    assert install.detect_colab({"COLAB_RELEASE_TAG": "release-colab_20260101-060000_RC00"})
    assert not install.detect_colab({})  # and google.colab is not importable on this machine


# --- the command line -------------------------------------------------------------------------------------------

def test_print_shows_why_and_the_commands(monkeypatch, capsys):
    monkeypatch.setattr(install, "installed_torch", lambda: "2.9.0+cu126")
    assert install.main(["--print", "--colab"]) == 0
    why, command = capsys.readouterr().out.splitlines()
    assert why.startswith("# Colab's torch 2.9.0+cu126 kept") and why.endswith(
        "exactly requirements-colab.lock (resolved against this torch), every hash checked")
    assert command == f"python -m pip install --no-deps --require-hashes -r {install.LOCK}"
    monkeypatch.setattr(install, "installed_torch", lambda: "2.10.0+cu128")
    assert install.main(["--print", "--colab"]) == 0
    why, plain, no_deps = capsys.readouterr().out.splitlines()
    assert "versions from requirements-colab.lock (made for torch 2.9.0" in why
    assert plain.startswith("python -m pip install --constraint=") and " transformers==" in plain
    assert no_deps.endswith("xformers==0.0.34 torchao==0.16.0") and " --no-deps unsloth==" in no_deps


@pytest.mark.parametrize(("argv", "status", "message"), [
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--report-dir", "reports"], 2, "--report-dir goes with --dry-run"),
    (["--colab", "--print"], 1, "torch 2.15.0 is outside"),
])
def test_a_mistake_is_one_line_and_an_exit_status(monkeypatch, capsys, argv, status, message):
    monkeypatch.setattr(install, "installed_torch", lambda: "2.15.0")
    assert install.main(argv) == status
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and message in captured.err


@pytest.mark.parametrize(("pip_status", "torch_after", "message"), [
    (1, "2.9.0+cu126", "pip failed at step 1 of 1 (exit 1)"),
    (0, "2.14.1", "torch changed from 2.9.0+cu126 to 2.14.1"),
])
def test_a_failed_step_or_a_replaced_torch_is_one_line(monkeypatch, capsys, pip_status, torch_after, message):
    """The install's own edges, pip and the metadata read afterwards, stand in here; the dry run below uses pip."""
    versions = iter(["2.9.0+cu126", torch_after, torch_after])
    monkeypatch.setattr(install, "installed_torch", lambda: next(versions))
    monkeypatch.setattr(install.subprocess, "run", lambda command, check: subprocess.CompletedProcess(command, pip_status))
    assert install.main(["--colab"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("Colab's torch 2.9.0+cu126 kept")
    assert len(captured.err.splitlines()) == 1 and message in captured.err


def test_the_script_runs_from_a_fresh_clone_and_reports_a_bad_flag_in_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT), "--bogus"], check=False, capture_output=True,
                            text=True, cwd="/")
    assert result.returncode == 2 and result.stderr == "error: unrecognized arguments: --bogus\n"


# --- the dry run in a Colab-like virtualenv ---------------------------------------------------------------------

# Colab's Python 3.12 runtime: torch, torchvision and torchaudio from PyTorch's cu126 index, and the NVIDIA libraries
# and triton that torch wheel pins (as a Colab `pip install` log lists them: "Requirement already satisfied:
# nvidia-cudnn-cu12==9.10.2.21 ... (from torch...)"). Requires-Dist as those wheels declare it; the nvidia packages'
# own dependencies on each other are left out (all of them are installed).
COLAB_CUDA = {
    "nvidia-cuda-nvrtc-cu12": "12.6.77", "nvidia-cuda-runtime-cu12": "12.6.77", "nvidia-cuda-cupti-cu12": "12.6.80",
    "nvidia-cudnn-cu12": "9.10.2.21", "nvidia-cublas-cu12": "12.6.4.1", "nvidia-cufft-cu12": "11.3.0.4",
    "nvidia-curand-cu12": "10.3.7.77", "nvidia-cusolver-cu12": "11.7.1.2", "nvidia-cusparse-cu12": "12.5.4.2",
    "nvidia-cusparselt-cu12": "0.7.1", "nvidia-nccl-cu12": "2.27.5", "nvidia-nvshmem-cu12": "3.3.20",
    "nvidia-nvtx-cu12": "12.6.77", "nvidia-nvjitlink-cu12": "12.6.85", "nvidia-cufile-cu12": "1.11.1.6",
}
LINUX = 'platform_system == "Linux" and platform_machine == "x86_64"'
FAKE_COLAB = {
    "torch": ("2.9.0+cu126", [
        "filelock", "typing-extensions>=4.10.0", 'setuptools; python_version >= "3.12"', "sympy>=1.13.3",
        "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5",
        *(f"{name}=={version}; {LINUX}" for name, version in COLAB_CUDA.items()), f"triton==3.5.0; {LINUX}"]),
    "torchvision": ("0.24.0+cu126", ["numpy", "torch==2.9.0", "pillow!=8.3.*,>=5.3.0"]),
    "torchaudio": ("2.9.0+cu126", ["torch==2.9.0"]),
    "triton": ("3.5.0", []),
    **{name: (version, []) for name, version in COLAB_CUDA.items()},
}


def write_dist_info(site: Path, name: str, version: str, requires: list[str]) -> None:
    """The metadata pip reads to believe a distribution is installed (no code: importing it must fail)."""
    folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir()
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (folder / "METADATA").write_text("\n".join(lines) + "\n")
    (folder / "INSTALLER").write_text("pip\n")
    (folder / "RECORD").write_text("".join(f"{folder.name}/{file},,\n" for file in ("METADATA", "INSTALLER", "RECORD")))


def colab_like_python() -> Path:
    """The cached virtualenv's python, built on first use: Python 3.12, pip, and the fake Colab torch."""
    if os.environ.get("INSTALL_TEST_SKIP_DRY_RUN") == "1":
        pytest.skip("INSTALL_TEST_SKIP_DRY_RUN=1")
    python312 = find_python312()
    if python312 is None:
        pytest.skip("the install dry run needs Python 3.12 (Colab's): none found as INSTALL_TEST_PYTHON, python3.12 "
                    "on PATH or under `pyenv root`/versions; install one (pyenv install 3.12) or point "
                    "INSTALL_TEST_PYTHON at it to run it")
    if problem := package_index_problem():
        pytest.skip(f"the install dry run resolves with pip from the package index: {problem}")
    version = subprocess.run([python312, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    key = hashlib.sha256(json.dumps([version, FAKE_COLAB], sort_keys=True).encode()).hexdigest()[:12]
    venv = ARTIFACTS / f"colab-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / "complete").exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([python312, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name, (version_, requires) in FAKE_COLAB.items():
        write_dist_info(Path(site), name, version_, requires)
    (venv / "complete").write_text(version + "\n")
    return python


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, dict]:
    """scripts/install_train.py --dry-run in the Colab-like virtualenv, the plan (--colab) and today's plain
    `pip install -r requirements-train.txt` (--no-colab) side by side: {"plan"|"plain": {status, output, reports}}."""
    python = colab_like_python()
    out = tmp_path_factory.mktemp("install-dry-run")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("COLAB_", "PYTHONPATH"))}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    running = {name: subprocess.Popen([str(python), str(SCRIPT), flag, "--dry-run", "--report-dir", str(out / name)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=out)
               for name, flag in (("plan", "--colab"), ("plain", "--no-colab"))}
    runs = {}
    for name, process in running.items():
        output, _ = process.communicate(timeout=540)  # ~2 min here
        reports = [json.loads(path.read_text()) for path in sorted((out / name).glob("step-*.json"))]
        runs[name] = {"status": process.returncode, "output": output, "reports": reports}
    return runs


def installs(run: dict) -> dict[str, str]:
    """{canonical name: version} over all of a run's reports (a name in two steps would be a mistake: checked)."""
    found = {}
    for report in run["reports"]:
        for item in report["install"]:
            name = canonicalize_name(item["metadata"]["name"])
            assert name not in found, f"{name} is installed by two steps"
            found[name] = item["metadata"]["version"]
    return found


def test_the_plan_keeps_colabs_torch_and_installs_the_pinned_versions(dry_runs):
    run = dry_runs["plan"]
    assert run["status"] == 0, run["output"]
    # The script learned torch's version from the fake metadata alone (importing torch there would fail).
    assert "Colab's torch 2.9.0+cu126 kept" in run["output"] and "xformers==0.0.33.post1 matched to it" in run["output"]
    assert len(run["reports"]) == 1
    installed = installs(run)
    assert [name for name in installed if is_torch_family(name)] == [], run["output"]
    for name in ("unsloth", "unsloth-zoo", "transformers", "trl", "peft", "datasets"):
        assert installed[name] == pins()[name], name
    assert {name: installed.get(name) for name in pins()} == pins()
    assert installed["xformers"] == "0.0.33.post1" and installed["torchao"] == "0.14.1"
    # Everything it adds, transitive packages included, is the lock's version (pip checked the lock's hashes).
    assert "exactly requirements-colab.lock (resolved against this torch), every hash checked" in run["output"]
    assert {name: version for name, version in installed.items() if lock_pins().get(name) != version} == {}


def test_what_the_plan_installs_fits_together_and_fits_colabs_torch(dry_runs):
    """--no-deps turns pip's dependency check off for step 2, so redo it: every dependency of every package the plan
    installs (markers evaluated for the virtualenv's Python 3.12 on Linux) is met by a package the plan installs or
    by the fake Colab torch. A new dependency in a bumped unsloth fails here, named, until PLAIN_DEPENDENCIES has it."""
    run = dry_runs["plan"]
    available = {**installs(run), **{canonicalize_name(name): version for name, (version, _) in FAKE_COLAB.items()}}
    unmet = []
    for report in run["reports"]:
        environment = {**report["environment"], "extra": ""}
        for item in report["install"]:
            for text in item["metadata"].get("requires_dist", []):
                requirement = Requirement(text)
                if requirement.marker and not requirement.marker.evaluate(environment):
                    continue
                have = available.get(canonicalize_name(requirement.name))
                if have is None or not requirement.specifier.contains(have, prereleases=True):
                    unmet.append(f"{item['metadata']['name']} needs {text}, the plan gives {have}")
    assert unmet == []


def test_unsloths_torch_range_is_the_one_the_plan_enforces(dry_runs):
    (report, unsloth), = [(report, item) for report in dry_runs["plan"]["reports"] for item in report["install"]
                          if item["metadata"]["name"] == "unsloth"]
    environment = {**report["environment"], "extra": ""}  # its extras pin torch too (`cu126onlytorch2110`...)
    (torch,) = [requirement for requirement in map(Requirement, unsloth["metadata"]["requires_dist"])
                if requirement.name == "torch" and (not requirement.marker or requirement.marker.evaluate(environment))]
    low, high = install.UNSLOTH_TORCH_RANGE
    for minor in range(30):
        assert (Version(f"2.{minor}.0") in torch.specifier) == (low <= (2, minor) < high), (minor, str(torch))


def test_todays_plain_install_would_replace_colabs_torch(dry_runs):
    """The problem is real, and the check above can fail: `pip install -r requirements-train.txt` in the same
    virtualenv would install another torch (for the newest xformers) and its CUDA libraries."""
    run = dry_runs["plain"]
    assert run["status"] == 0, run["output"]
    installed = installs(run)
    assert "torch" in installed and installed["torch"] != "2.9.0+cu126", run["output"]
    # Even there, what is not torch's own or built for it comes at the lock's version.
    assert {name: version for name, version in installed.items() if not is_torch_family(name)
            and name not in ("xformers", "torchao") and lock_pins().get(name) != version} == {}
    assert any(name.startswith(("nvidia-", "cuda-")) for name in installed)
    assert "of torch's: torch==" in run["output"]
