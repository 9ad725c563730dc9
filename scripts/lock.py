#!/usr/bin/env python
"""Lock every environment the project installs, so that a new release upstream cannot change what a fresh install
gets (an unpinned httpx2 2.17.0 under openai broke every remote model on 2026-12-06).

    python scripts/lock.py                   # regenerate the locks that are out of date (make lock); keeps versions
    python scripts/lock.py --upgrade         # move every lock to the newest versions the sources allow
    python scripts/lock.py --check           # offline: exit 1 naming each lock out of date with its source
    python scripts/lock.py --upgrade-check   # newest versions in a scratch venv + the fast tests (make upgrade-check)
    python scripts/lock.py --sync dev        # install requirements-dev.lock exactly, hashes checked (the Makefile)

Each lock is uv's `pip compile` of a human-edited requirements file for the Python and platform that installs it,
with every transitive package pinned; what each lock is for and how it is installed: the TARGETS below. uv comes
from requirements-dev.txt (`make lock` runs it from .venv). `--sync` needs only the standard library and pip.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Make the repo's packages importable when run as `python scripts/lock.py` from a fresh clone.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import UsageError, UsageParser, report_problem
from common.locks import (REPO, blocks, canonical_name, has_hashes, inputs_digest, read_pins, requirement_lines,
                          staleness)
from train import install

FORMAT = "lock format 1"  # part of every digest: a change in how locks are written here makes them all stale
SCRATCH = REPO / "outputs" / "upgrade-check"
# The upgrade check's tests: the fast ones that touch every pinned library's API (models, configs, data, the
# engine, the OpenAI client against a real server, the Space over HTTP), not the end-to-end runs (minutes each).
FAST_TESTS = ["-m", "not slow"]


class LockError(RuntimeError):
    """A lock cannot be made or installed; the message names the problem and the fix."""


@dataclass(frozen=True)
class Target:
    name: str
    source: str  # the human-edited requirements file, relative to the repo
    lock: str
    purpose: str  # the lock's first line
    python: str  # the Python version that installs it
    platform: str  # uv's --python-platform for the machine that installs it
    hashes: bool
    extra_name: str = ""  # more requirements resolved together with the source, named in the lock's `# via` notes
    exclude: tuple[str, ...] = ()  # names (a trailing '-' is a prefix) resolved but left out of the lock
    cpu_torch: bool = False  # torch must resolve to its CPU build

    def extra(self) -> str:
        """The other requirements this target resolves together with its source (a pure function of the repo)."""
        if self.name == "space":
            # What Hugging Face's Gradio image installs on its own command line after requirements.txt (DESIGN.md),
            # gradio at the card's sdk_version, which is requirements-space.txt's pin.
            gradio = read_pins((REPO / self.source).read_text())["gradio"]
            return f"gradio[oauth,mcp]=={gradio}\nuvicorn>=0.14.0\nwebsockets>=10.4\nspaces\n"
        if self.name == "colab":
            # Everything train/install.py's Colab plan asks for, resolved against the torch Colab ships.
            plan = install.plan(f"{install.COLAB_TORCH}+cu126", True, REPO / self.source)
            lines = [arg for step in plan.steps for arg in step[1:] if not arg.startswith("-")]
            return "\n".join([f"torch=={install.COLAB_TORCH}", *lines]) + "\n"
        return ""

    def digest(self, source_text: str | None = None) -> str:
        """The digest of everything this lock is resolved from (the source's requirement lines, not its comments)."""
        source_text = (REPO / self.source).read_text() if source_text is None else source_text
        return inputs_digest(FORMAT, requirement_lines(source_text), self.python, self.platform, str(self.hashes),
                             self.extra(), ",".join(self.exclude), str(self.cpu_torch))

    def excluded(self, name: str) -> bool:
        return any(name == pattern or (pattern.endswith("-") and name.startswith(pattern)) for pattern in self.exclude)


TARGETS = {target.name: target for target in (
    Target("dev", "requirements-dev.txt", "requirements-dev.lock",
           "every package `make test` and `make demo` install into .venv (`scripts/lock.py --sync dev`)",
           python="3.11", platform="x86_64-manylinux_2_36", hashes=True, cpu_torch=True),
    # No hashes: the Space's build runs `pip install -r requirements.txt gradio[oauth,mcp]==... spaces ...`, and pip
    # refuses requirements without hashes beside a file that has them. The pins still fix every version.
    Target("space", "requirements-space.txt", "requirements-space.lock",
           "the Space's requirements.txt (scripts/deploy_space.py uploads it): its whole tree, with what Hugging "
           "Face's Gradio image adds", python="3.11", platform="x86_64-manylinux_2_36", hashes=False,
           extra_name="hugging-face-gradio-image.txt"),
    # Colab: Python 3.12 on Ubuntu 22.04. Colab's torch and CUDA libraries are its own and stay out of the lock.
    Target("colab", "requirements-train.txt", "requirements-colab.lock",
           "the constraints of the Colab training install (scripts/install_train.py): every package it adds, never "
           "Colab's torch", python="3.12", platform="x86_64-manylinux_2_35", hashes=True,
           extra_name="colab-install-plan.txt", exclude=install.TORCH_FAMILY + ("nvidia-", "cuda-")),
)}


# ---------------------------------------------------------------- writing a lock
def split_options(text: str) -> tuple[str, dict[str, str]]:
    """The requirements without their per-requirement options (uv's parser refuses `--config-settings`), and
    {canonical name: options} to put back on the locked line.

    >>> split_options("a==1\\nllama-cpp-python==0.3.36 --config-settings=x=OFF  # why\\n")
    ('a==1\\nllama-cpp-python==0.3.36\\n', {'llama-cpp-python': '--config-settings=x=OFF'})
    """
    lines, options = [], {}
    for line in text.splitlines():
        requirement, _, _ = line.partition("#")
        if line[:1].isalnum() and " --" in requirement:
            requirement, _, option = requirement.partition(" --")
            options[canonical_name(requirement.split("==")[0].strip())] = "--" + option.strip()
            line = requirement.rstrip()
        lines.append(line)
    return "\n".join(lines) + "\n", options


def render(target: Target, compiled: str, options: dict[str, str], scratch: str) -> str:
    """The lock file: a header saying what it is for and how to regenerate it, then uv's pins less the excluded
    packages, per-requirement options put back, and the scratch folder's path taken out of the `# via` notes."""
    body = []
    for name, lines in blocks(compiled.replace(scratch.rstrip("/") + "/", "")):
        if target.excluded(name):
            continue
        if name in options:
            pin = lines[0].removesuffix(" \\")
            lines = [f"{pin} {options[name]}" + (" \\" if lines[0].endswith("\\") else ""), *lines[1:]]
        body += lines
    header = [f"# {target.lock}: {target.purpose}.",
              f"# Generated by `make lock` (scripts/lock.py) from {target.source}: edit that file, then run "
              "`make lock`.",
              f"# Resolved with uv for Python {target.python} on {target.platform}"
              + ("; torch is its CPU build" if target.cpu_torch else "")
              + (f"; left out: {', '.join(target.exclude)}" if target.exclude else "")
              + ("; hashes checked by pip" if target.hashes else "; no hashes (see scripts/lock.py)") + ".",
              f"# inputs digest: {target.digest()}"]
    return "\n".join(header + body) + "\n"


def pip_find_links() -> list[str]:
    """Where this machine's pip finds extra wheel files (PIP_FIND_LINKS, pip's config): how the CPU build of torch
    reaches uv, which reads neither. LOCK_TORCH_FIND_LINKS, when set, wins."""
    if os.environ.get("LOCK_TORCH_FIND_LINKS"):
        return os.environ["LOCK_TORCH_FIND_LINKS"].split()
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    links = [line.split("=", 1)[1].strip("'\"") for line in listing.splitlines() if line.split("=")[0].endswith(
        ".find-links")]
    return sorted({link for value in links for link in value.split()})


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        raise LockError("uv is not installed: run `make lock` (it uses .venv, which requirements-dev.txt gives uv), "
                        "or pip install uv")
    return found


def compile_lock(target: Target, upgrade: bool, out: Path) -> str:
    """Resolve the target with uv; returns the lock's text (written to `out` by the caller). The committed lock's
    versions are kept where the sources allow them, unless `upgrade`."""
    source_text, options = split_options((REPO / target.source).read_text())
    with tempfile.TemporaryDirectory(prefix="lock-") as scratch:
        inputs = [Path(scratch, Path(target.source).name)]
        inputs[0].write_text(source_text)
        if target.extra_name:
            inputs.append(Path(scratch, target.extra_name))
            inputs[1].write_text(target.extra())
        output = Path(scratch, Path(target.lock).name)
        existing = REPO / target.lock
        if existing.is_file() and not upgrade:  # uv prefers the versions already in its output file
            kept = read_pins(existing.read_text())
            output.write_text("".join(f"{name}=={version}\n" for name, version in kept.items()))
        command = [uv(), "pip", "compile", *map(str, inputs), "--output-file", str(output), "--no-header",
                   "--quiet", "--python-version", target.python, "--python-platform", target.platform,
                   "--annotation-style", "split", *(["--generate-hashes"] if target.hashes else []),
                   *(["--upgrade"] if upgrade else [])]
        if target.cpu_torch:
            command += [arg for link in pip_find_links() for arg in ("--find-links", link)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            raise LockError(f"uv could not resolve {target.source} for Python {target.python}: "
                            f"{' '.join(result.stderr.split())[:1500]}")
        text = render(target, output.read_text(), options, scratch)
    torch = read_pins(text).get("torch")
    if target.cpu_torch and torch is not None and not torch.endswith("+cpu"):
        raise LockError(f"torch resolved to {torch}, the CUDA build (several GB of nvidia packages), not the CPU "
                        "build: "
                        "set LOCK_TORCH_FIND_LINKS to a folder or page holding PyTorch's CPU wheels (or UV_INDEX to "
                        "PyTorch's CPU index) and run `make lock` again")
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(out)
    return text


def diff_pins(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What moved between two sets of pins, one line each.

    >>> diff_pins({"a": "1", "b": "2"}, {"a": "1.1", "c": "3"})
    ['a 1 -> 1.1', 'b 2 removed', 'c 3 added']
    """
    lines = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            lines.append(f"{name} {old[name]} removed")
        elif name not in old:
            lines.append(f"{name} {new[name]} added")
        elif old[name] != new[name]:
            lines.append(f"{name} {old[name]} -> {new[name]}")
    return lines


# ---------------------------------------------------------------- installing a lock exactly
def sync(target: Target, python: str = sys.executable) -> None:
    """Install the lock into `python`'s environment exactly: pip checks every hash, then what the lock does not
    list is uninstalled (pip itself stays), so the environment is the lock and nothing else."""
    lock = REPO / target.lock
    text = lock.read_text()
    pins = read_pins(text)
    command = [python, "-m", "pip", "install", "--quiet", *(["--require-hashes"] if has_hashes(text) else []),
               "-r", str(lock)]
    if subprocess.run(command).returncode != 0:
        raise LockError(f"pip could not install {target.lock} (its output is above); if pip found no torch "
                        f"{pins.get('torch')}, give pip PyTorch's CPU wheels (PIP_EXTRA_INDEX_URL set to PyTorch's "
                        "CPU index) and rerun")
    strays = sorted(set(installed(python)) - set(pins) - {"pip"})
    if strays:
        print(f"uninstalling what {target.lock} does not list: {', '.join(strays)}")
        subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", *strays], check=True)


def installed(python: str = sys.executable) -> dict[str, str]:
    """{canonical name: version} of every distribution installed for `python` (asked in a fresh process, so what pip
    just installed or removed is seen whichever interpreter runs this)."""
    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version "
            "for d in m.distributions()}))")
    listing = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)
    return {canonical_name(name): version for name, version in listing.items()}


# ---------------------------------------------------------------- the upgrade check
def upgrade_check() -> int:
    """Resolve the newest versions the sources allow into SCRATCH (the committed locks stay), print what moved,
    install the dev lock's upgrade into a scratch virtualenv and run the fast tests there. Exit 1 if they fail."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    moved = {}
    for target in TARGETS.values():
        new = compile_lock(target, upgrade=True, out=SCRATCH / Path(target.lock).name)
        moved[target.name] = diff_pins(read_pins((REPO / target.lock).read_text()), read_pins(new))
        print(f"{target.lock}: {len(moved[target.name])} change(s) available")
        for line in moved[target.name]:
            print(f"  {line}")
    venv = SCRATCH / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    upgraded = Target(**{**TARGETS["dev"].__dict__, "lock": str((SCRATCH / "requirements-dev.lock").relative_to(REPO))})
    sync(upgraded, python)
    print(f"running the fast tests ({' '.join(FAST_TESTS)}) with the upgraded dev environment", flush=True)
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_TESTS], cwd=REPO,
                            env={**os.environ, "LOCK_UNDER_TEST": str(REPO / upgraded.lock)})
    if result.returncode == 0:
        print("upgrade check passed: `python scripts/lock.py --upgrade` (make lock UPGRADE=1) moves the locks forward; "
              "run `make test` before committing them")
        return 0
    print(f"upgrade check FAILED (pytest exit {result.returncode}): the failures above come with these moves in the "
          "dev environment:\n  " + "\n  ".join(moved["dev"] or ["(none)"]), file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="lock.py", description=(
        "Regenerate, check or install the lock files (requirements-*.lock) from the requirements files beside them."))
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true", help="say which locks are out of date with their sources; "
                      "offline; exit 1 if any")
    what.add_argument("--upgrade", action="store_true", help="regenerate every lock at the newest versions the "
                      "sources allow (default: keep the locked versions where the sources still allow them)")
    what.add_argument("--upgrade-check", action="store_true", help="the newest allowed versions into a scratch "
                      f"virtualenv ({SCRATCH.relative_to(REPO)}), the fast tests run there; the locks stay as they are")
    what.add_argument("--sync", choices=sorted(TARGETS), help="install that lock into this Python's environment "
                      "exactly (hashes checked, packages it does not list removed)")
    parser.add_argument("--only", choices=sorted(TARGETS), action="append", help="regenerate only these locks")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        targets = [TARGETS[name] for name in (args.only or TARGETS)]
        if args.check:
            problems = [problem for target in targets for problem in
                        staleness(REPO / target.lock, REPO / target.source, target.digest())]
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            if not problems:
                print(f"up to date: {', '.join(target.lock for target in targets)}")
            return 1 if problems else 0
        if args.sync:
            sync(TARGETS[args.sync])
            return 0
        if args.upgrade_check:
            return upgrade_check()
        for target in targets:
            lock = REPO / target.lock
            if not args.upgrade and not staleness(lock, REPO / target.source, target.digest()):
                print(f"{target.lock}: up to date")
                continue
            before = read_pins(lock.read_text()) if lock.is_file() else {}
            after = read_pins(compile_lock(target, args.upgrade, lock))
            changes = diff_pins(before, after)
            print(f"{target.lock}: {len(after)} packages, {len(changes)} change(s)"
                  + "".join(f"\n  {line}" for line in changes))
        return 0
    except UsageError as e:
        return e.report()
    except (LockError, install.InstallError, OSError, subprocess.CalledProcessError) as e:
        return report_problem(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
