"""Install what training needs, keeping the torch a Colab runtime ships with: `scripts/install_train.py` runs this.

    python scripts/install_train.py             # on Colab: keeps its torch; elsewhere: pip install -r requirements-train.txt
    python scripts/install_train.py --print     # the pip commands, one a line; runs nothing
    python scripts/install_train.py --dry-run   # pip resolves each step and writes a JSON report; installs nothing

Why: unsloth declares `xformers` (Linux x86-64) and `torch>=2.4,<2.15`. Given an installed torch 2.9.0+cu126, pip
chooses the newest xformers, 0.0.35, which needs torch>=2.10, so `pip install -r requirements-train.txt` on Colab
replaces Colab's CUDA torch with a new one (and CUDA-13 libraries) that its driver may not run. Unsloth's own Colab
notebooks avoid this the way this module does: the plain dependencies first, then unsloth and the packages whose
dependencies lead to torch with `--no-deps`, plus the xformers (and torchao) built for the installed torch.

Everything here except `detect_colab`, `installed_torch` and `main` is pure (`plan` reads the requirements file it is
given), and the module imports only the standard library: it runs before torch, unsloth or packaging are importable,
and never imports torch to learn its version.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import EXIT_INTERRUPTED, UsageError, UsageParser, report_problem
from common.locks import canonical_name, read_pins

# The release of each compiled companion built against each torch release: what keeps their kernels loadable.
# xformers: unsloth 2026.10.9's own `cu126onlytorch*` extras (the mapping its Colab notebooks use), each checked
#   against the wheel's METADATA on PyPI: xformers pins the torch it was compiled against (`torch==2.9.0`), except
#   0.0.35, which asks for `torch>=2.10` and which unsloth names for torch 2.11 and 2.12. A torch missing here gets
#   no xformers at all, not the newest known one: unsloth then imports without it and attends with PyTorch's SDPA
#   (unsloth/models/_utils.py catches the ModuleNotFoundError; utils/attention_dispatch.py picks SDPA).
# torchao (unsloth_zoo wants >=0.13.0): the pairs torchao 0.16.0 lists in its `torchao_pytorch_compatible_versions`.
#   Newer torchao loads its kernels only on torch >= 2.11, and 0.18.0 on a torch below 2.10 breaks
#   `import transformers` until `import unsloth` patches it (unsloth's `fix_torchao_torch_symbol_skew`), which the
#   export stage, importing transformers alone, never does. A torch missing here gets unsloth_zoo's bound.
BUILT_FOR_TORCH = {
    "xformers": {
        "2.6.0": "0.0.29.post3", "2.7.0": "0.0.30", "2.7.1": "0.0.31.post1", "2.8.0": "0.0.32.post2",
        "2.9.0": "0.0.33.post1", "2.9.1": "0.0.33.post2", "2.10.0": "0.0.34",
        "2.11.0": "0.0.35", "2.12.0": "0.0.35", "2.12.1": "0.0.35",
    },
    "torchao": {"2.8.0": "0.14.0", "2.9.0": "0.14.1", "2.9.1": "0.15.0", "2.10.0": "0.16.0"},
}
TORCHAO_BOUND = "torchao>=0.13.0"

# unsloth 2026.10.9 declares `torch>=2.4.0,<2.15.0` (tests/test_install.py checks this against its METADATA). With
# --no-deps nothing else would hold a Colab torch outside it to account, so the plan refuses one.
UNSLOTH_TORCH_RANGE = ((2, 4), (2, 15))

# Installed with --no-deps: unsloth and the packages whose dependencies lead to torch (or, for bitsandbytes, pin a
# torch range of their own), then xformers and torchao as BUILT_FOR_TORCH matches them. Their pins come from
# requirements-train.txt; cut_cross_entropy is unsloth_zoo's unpinned dependency (it asks for torch and triton).
NO_DEPS = ("unsloth", "unsloth-zoo", "trl", "peft", "accelerate", "bitsandbytes")
NO_DEPS_UNPINNED = ("cut_cross_entropy",)

# What `--no-deps` would skip and is not torch's: every other Requires-Dist of unsloth and unsloth_zoo 2026.10.9,
# trl, peft, accelerate, bitsandbytes, cut_cross_entropy, xformers and torchao on Linux x86-64 (the strictest bound where
# several name the same package), less what requirements-train.txt pins itself. Pip skips whichever of them Colab
# already has at a version inside the bound; none of them depends on torch. tests/test_install.py fails, naming the
# package, if a pinned release declares a dependency that neither this list nor the file covers.
PLAIN_DEPENDENCIES = (
    "certifi>=2026.10.19", "click>=8.0", "diffusers", "einops", "filelock", "hf_transfer", "jinja2",
    "json5>=0.9.25", "msgspec", "nest-asyncio", "numpy>=1.17", "packaging>=24.1", "pillow", "protobuf", "psutil",
    "pydantic", "regex", "rich", "sentencepiece>=0.2.0", "structlog>=24.1.0", "typer>=0.19.0",
    "typing_extensions", "tyro", "wheel>=0.42.0",
)

# The packages that come with Colab's torch and that no step may install or replace.
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton")

# The torch release Colab ships as of this writing (2.9.0+cu126): requirements-colab.lock is resolved against it
# (scripts/lock.py), and on a Colab with this torch every package the plan installs comes with the lock's version
# and hash. Another torch keeps the lock's versions but gets the xformers and torchao built for it, unhashed.
COLAB_TORCH = "2.9.0"

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements-train.txt"
LOCK = REQUIREMENTS.with_name("requirements-colab.lock")


class InstallError(ValueError):
    """The plan cannot be made or carried out; the message names the value and the fix."""


@dataclass(frozen=True)
class Plan:
    """The pip argument lists to run in order (each without `python -m pip`), and one line saying what and why."""

    steps: list[list[str]]
    why: str
    keeps_torch: bool
    files: dict[Path, str] = field(default_factory=dict)  # written before the steps run (derived constraints)


def requirement_name(line: str) -> str:
    """The canonical name a requirement line is about.

    >>> requirement_name("unsloth_zoo==2026.10.9"), requirement_name("click>=8.0")
    ('unsloth-zoo', 'click')
    """
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not match:
        raise InstallError(f"cannot read a package name in requirement {line!r}")
    return canonical_name(match.group(1))


def read_requirements(text: str) -> list[str]:
    """The requirement lines of a requirements file, comments and blank lines dropped.

    >>> read_requirements("# pins\\nunsloth==2026.10.9  # the trainer\\n\\ntqdm==4.70.1\\n")
    ['unsloth==2026.10.9', 'tqdm==4.70.1']
    """
    lines = [line.split(" #")[0].strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    options = [line for line in lines if line.startswith("-")]
    if options:  # -r, -c, --index-url...: this module splits requirements by name and would silently drop them
        raise InstallError(f"requirements-train.txt may hold only requirements, not pip options: {options[0]!r}")
    return lines


def pinned_version(requirements: list[str], name: str) -> str | None:
    """The version a `name==version` line pins, or None.

    >>> pinned_version(["unsloth==2026.10.9", "tqdm>=4"], "unsloth"), pinned_version(["tqdm>=4"], "tqdm")
    ('2026.10.9', None)
    """
    for line in requirements:
        if requirement_name(line) == canonical_name(name):
            match = re.search(r"==\s*([^\s;,]+)", line)
            return match.group(1) if match else None
    return None


def torch_release(version: str) -> tuple[int, int, int] | None:
    """(major, minor, micro) of a torch final release, local build label ignored; None for anything else.

    A pre-release or nightly (`2.10.0a0+git1234`, `2.9.0.dev20250801`) is not the release an xformers wheel was
    built against, so it gets None and, from the plan, no xformers.

    >>> torch_release("2.9.0+cu126"), torch_release("2.10.0"), torch_release("2.10.0a0+git1234")
    ((2, 9, 0), (2, 10, 0), None)
    """
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(\+[A-Za-z0-9.]+)?", version.strip())
    return (int(match.group(1)), int(match.group(2)), int(match.group(3))) if match else None


def built_for(package: str, torch_version: str) -> str | None:
    """The release of a compiled companion (BUILT_FOR_TORCH) built against this torch, or None when none is known.

    >>> built_for("xformers", "2.9.0+cu126"), built_for("torchao", "2.9.0+cu126"), built_for("xformers", "2.10.0")
    ('0.0.33.post1', '0.14.1', '0.0.34')
    >>> built_for("xformers", "2.14.0"), built_for("xformers", "2.9.0a0")
    (None, None)
    """
    release = torch_release(torch_version)
    return BUILT_FOR_TORCH[package].get(".".join(map(str, release))) if release else None


def _in_unsloth_range(torch_version: str) -> bool:
    """Whether unsloth's torch bound admits this version; both bounds are minor releases, so major.minor decides."""
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if not match:
        return False
    low, high = UNSLOTH_TORCH_RANGE
    return low <= (int(match.group(1)), int(match.group(2))) < high


def plan(torch_version: str | None, on_colab: bool, requirements: Path) -> Plan:
    """The pip steps that install requirements-train.txt here: a pure function of the installed torch and Colab.

    Not on Colab, or on a Colab without torch: `install -r requirements-train.txt`, as pip resolves it (it may
    install a torch). On Colab with torch: two steps that never touch torch (see the module's docstring).
    """
    if not on_colab or torch_version is None:
        where = "not on Colab" if not on_colab else "Colab without torch"
        torch_note = (f"it may replace torch {torch_version} (--colab keeps it)" if torch_version
                      else "it installs a torch unsloth accepts")
        return Plan(steps=[["install", "-r", str(requirements)]], keeps_torch=False,
                    why=f"{where}: installing {requirements.name} as pip resolves it; {torch_note}")
    lines = read_requirements(requirements.read_text())
    unsloth = pinned_version(lines, "unsloth")
    if unsloth is None:
        raise InstallError(f"{requirements.name} pins no unsloth (a line `unsloth==VERSION`): the Colab install is "
                           "built around it; add the pin")
    if not _in_unsloth_range(torch_version):
        low, high = (".".join(map(str, bound)) for bound in UNSLOTH_TORCH_RANGE)
        raise InstallError(f"Colab's torch {torch_version} is outside what unsloth {unsloth} supports (>={low}, "
                           f"<{high}); pin an unsloth that supports it in {requirements.name}, or run with --no-colab "
                           "to let pip install a torch unsloth accepts")
    no_deps = [line for line in lines if requirement_name(line) in NO_DEPS] + list(NO_DEPS_UNPINNED)
    pinned_names = {requirement_name(line) for line in lines}
    plain = [line for line in lines if requirement_name(line) not in NO_DEPS]
    plain += [dependency for dependency in PLAIN_DEPENDENCIES if requirement_name(dependency) not in pinned_names]
    names = ", ".join(requirement_name(line) for line in no_deps)
    xformers, torchao = built_for("xformers", torch_version), built_for("torchao", torch_version)
    if xformers:
        no_deps.append(f"xformers=={xformers}")
    no_deps.append(f"torchao=={torchao}" if torchao else TORCHAO_BOUND)
    companions = [f"xformers=={xformers} matched to it" if xformers
                  else "no xformers (none is known built for it: unsloth uses PyTorch's SDPA)",
                  f"torchao=={torchao} matched to it" if torchao else f"{TORCHAO_BOUND} (no build known for it)"]
    return Plan(steps=[["install", *plain], ["install", "--no-deps", *no_deps]], keeps_torch=True,
                why=f"Colab's torch {torch_version} kept: installing {requirements.name}'s other pins and unsloth's "
                    f"plain dependencies, then {names} (unsloth {unsloth}) with --no-deps, {', '.join(companions)}")


def with_lock(plan_: Plan, torch_version: str | None, lock: Path = LOCK) -> Plan:
    """The plan held to the Colab lock, so that what pip installs does not change when something upstream releases.

    On a Colab whose torch is COLAB_TORCH, the lock was resolved against that very torch: one step installs exactly
    its packages with --no-deps and --require-hashes (pip checks every file's hash; the lock has no torch package,
    so none is touched). With any other torch (another Colab release, or off Colab where pip chooses the torch), the
    plan's own steps, constrained to the lock's versions, less xformers and torchao, which must match that torch
    (BUILT_FOR_TORCH), and without hashes (pip before 24 ignores a constraint's hash and then refuses the step): a
    file of its own, held in `files`.
    """
    if not lock.is_file():
        raise InstallError(f"{lock} not found: it pins every package the training install adds; restore it from the "
                           "repository (git checkout -- requirements-colab.lock) or regenerate it with `make lock`")
    if plan_.keeps_torch and torch_version and torch_release(torch_version) == torch_release(COLAB_TORCH):
        return Plan(steps=[["install", "--no-deps", "--require-hashes", "-r", str(lock)]], keeps_torch=True,
                    why=f"{plan_.why}; exactly {lock.name} (resolved against this torch), every hash checked")
    pins = {name: version for name, version in read_pins(lock.read_text()).items() if name not in BUILT_FOR_TORCH}
    constraints = Path(tempfile.gettempdir()) / "install-train-constraints.txt"
    steps = [[step[0], f"--constraint={constraints}", *step[1:]] for step in plan_.steps]
    return Plan(steps=steps, keeps_torch=plan_.keeps_torch,
                files={constraints: "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))},
                why=f"{plan_.why}; versions from {lock.name} (made for torch {COLAB_TORCH}: without its hashes, and "
                    f"without its {' and '.join(BUILT_FOR_TORCH)}, which must match this torch)")


def would_install(report: dict) -> dict[str, str]:
    """{canonical name: version} of what a `pip install --dry-run --report` JSON report would install.

    >>> would_install({"install": [{"metadata": {"name": "Torch", "version": "2.14.1"}}]})
    {'torch': '2.14.1'}
    """
    return {canonical_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


def torch_packages(names) -> list[str]:
    """Those of the names that belong to torch's installation: torch, its companions, NVIDIA's CUDA libraries.

    >>> torch_packages(["trl", "torch", "nvidia-cublas", "cuda-toolkit", "triton"])
    ['torch', 'nvidia-cublas', 'cuda-toolkit', 'triton']
    """
    return [name for name in names if canonical_name(name) in TORCH_FAMILY
            or canonical_name(name).startswith(("nvidia-", "cuda-"))]


def detect_colab(environ=None) -> bool:
    """Whether this is a Google Colab runtime: it sets COLAB_RELEASE_TAG, and ships the `google.colab` package."""
    if (os.environ if environ is None else environ).get("COLAB_RELEASE_TAG"):
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # no `google` package at all
        return False


def installed_torch() -> str | None:
    """The installed torch's version from its metadata; importing torch would be slow, and wrong before a reinstall."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="install_train.py", description=(
        "Install what training needs (requirements-train.txt). On Colab, keep Colab's torch: the plain dependencies "
        "first, then unsloth and its torch-bound companions with --no-deps and the xformers built for that torch."))
    parser.add_argument("--dry-run", action="store_true", help=(
        "let pip resolve each step (`pip install --dry-run --report`) and say what it would install; installs nothing"))
    parser.add_argument("--report-dir", type=Path, help=(
        "where --dry-run writes pip's JSON reports, step-1.json, step-2.json (default: a new temporary folder)"))
    parser.add_argument("--colab", action=argparse.BooleanOptionalAction, default=None, help=(
        "treat this machine as Colab (keep its torch) or not; default: detected (COLAB_RELEASE_TAG, google.colab)"))
    parser.add_argument("--print", dest="print_only", action="store_true", help=(
        "print why (a # line), then the pip commands, one a line; run nothing"))
    return parser


def _pip(step: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", *step]


def _summarize(report_path: Path, plan_: Plan, index: int) -> str:
    """One line for a dry-run step; raises InstallError when a step meant to keep torch would install some of it."""
    packages = would_install(json.loads(report_path.read_text()))
    touched = torch_packages(packages)
    if plan_.keeps_torch and touched:
        raise InstallError(f"step {index} would install {', '.join(f'{n}=={packages[n]}' for n in touched)} "
                           f"despite keeping Colab's torch (report: {report_path})")
    torch_note = (f"; of torch's: {', '.join(f'{n}=={packages[n]}' for n in touched)}" if touched
                  else "; nothing of torch's")
    return f"step {index} would install {len(packages)} packages{torch_note} (report: {report_path})"


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.report_dir is not None and not args.dry_run:
            raise UsageError(["--report-dir goes with --dry-run; add --dry-run, or leave --report-dir out"])
        on_colab = detect_colab() if args.colab is None else args.colab
        torch_before = installed_torch()
        plan_ = with_lock(plan(torch_before, on_colab, REQUIREMENTS), torch_before)
        for path, text in plan_.files.items():
            path.write_text(text)
    except UsageError as e:
        return e.report()
    except (InstallError, OSError) as e:
        return report_problem(e)
    if args.print_only:
        print("\n".join([f"# {plan_.why}", *(shlex.join(["python", "-m", "pip", *step]) for step in plan_.steps)]))
        return 0
    print(plan_.why, flush=True)
    report_dir = args.report_dir or (Path(tempfile.mkdtemp(prefix="install-train-")) if args.dry_run else None)
    try:
        for index, step in enumerate(plan_.steps, start=1):
            extra = []
            if args.dry_run:
                report_dir.mkdir(parents=True, exist_ok=True)
                extra = ["--dry-run", "--report", str(report_dir / f"step-{index}.json")]
            status = subprocess.run(_pip([*step, *extra]), check=False).returncode
            if status != 0:
                raise InstallError(f"pip failed at step {index} of {len(plan_.steps)} (exit {status}): its output "
                                   "above says why; rerunning continues (pip skips what is installed), --print shows "
                                   "the commands")
            if args.dry_run:
                print(_summarize(report_dir / f"step-{index}.json", plan_, index), flush=True)
        importlib.invalidate_caches()  # pip installed into this interpreter's site-packages behind its finders' back
        if plan_.keeps_torch and not args.dry_run and installed_torch() != torch_before:
            raise InstallError(f"torch changed from {torch_before} to {installed_torch()} although the plan keeps it: "
                               "restart the runtime (Colab: Runtime > Disconnect and delete runtime) and report this")
    except (InstallError, OSError) as e:
        return report_problem(e)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
