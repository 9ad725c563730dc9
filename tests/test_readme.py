"""What the README states about the code and the benchmarks is what they say: the benchmark figures it quotes are in
docs/benchmarks.md, its dates span the sections' own, the install's xformers table is train/install.py's, the
presets it lists are the ones in train/presets/, and the demo's training time is the one the demo and its preset
state."""

import json
import re

from bench.report import measured_span
from conftest import REPO
from train.install import BUILT_FOR_TORCH

README = (REPO / "README.md").read_text()
BENCHMARKS = (REPO / "docs" / "benchmarks.md").read_text()


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_the_turn_figures_quoted_from_the_benchmarks_are_there():
    """README's time to first token by turn is docs/benchmarks.md's median row: turn 1, and the range of the others."""
    quoted = re.search(r"through the Space, 1B-shaped, 2 cores\): turn 1 (\d\.\d\d) s, turns 2-(\d) (\d\.\d\d)-(\d\.\d\d) s",
                       one_line(README))
    assert quoted, "README's engine paragraph quotes the turn figures"
    row = re.search(r"^\| median TTFT \(s\) \| (.*) \|$", BENCHMARKS, re.MULTILINE).group(1)
    turns = [float(value) for value in row.split(" | ")]
    assert len(turns) == int(quoted.group(2))
    assert (quoted.group(1), quoted.group(3), quoted.group(4)) == (
        f"{turns[0]:.2f}", f"{min(turns[1:]):.2f}", f"{max(turns[1:]):.2f}")


def test_the_benchmark_dates_span_every_sections_own():
    span = measured_span(json.loads((REPO / "docs" / "benchmarks.json").read_text()))
    assert " to " in span  # the sections were measured on different days
    assert f"), {span} by `python scripts/bench.py`" in README and f"), {span}, by `python scripts/bench.py`" in BENCHMARKS


def test_the_xformers_the_install_picks_are_the_ones_the_readme_names():
    """README's `torch 2.8 → xformers 0.0.32.post2, ..., 2.11 and 2.12 → 0.0.35` is BUILT_FOR_TORCH, from 2.8 on."""
    paragraph = one_line(README[README.index("`scripts/install_train.py` decides"):])[:1500]
    named = {}
    for releases, xformers in re.findall(r"((?:\d+\.\d+(?:\.\d+)?(?: and )?)+) → (?:xformers )?(\d[\w.]+\w)", paragraph):
        for release in releases.split(" and "):
            named[release] = xformers
    expected = {torch: xformers for torch, xformers in BUILT_FOR_TORCH["xformers"].items()
                if tuple(map(int, torch.split("."))) >= (2, 8)}
    for torch, xformers in expected.items():
        release = torch if torch in named else torch.rsplit(".", 1)[0]
        assert named.get(release) == xformers, (torch, xformers, named)
    assert "a torch it does not list gets no xformers" in paragraph


def test_every_preset_is_listed_in_the_training_cli_reference():
    presets = sorted(path.stem for path in (REPO / "train" / "presets").glob("*.yaml"))
    assert f"[--preset {{{','.join(presets)}}}]" in README


def test_the_demos_training_time_is_one_figure_everywhere():
    demo = (REPO / "scripts" / "demo.py").read_text()
    preset = (REPO / "train" / "presets" / "demo.yaml").read_text()
    seconds = re.search(r"the demo's 40 took about (\d+) s of training \(both processes", one_line(README)).group(1)
    assert f"about {seconds} s on 2 cores" in demo
    assert f"about {seconds} s of training on a 2-core CPU in `make demo`" in one_line(preset.replace("#", ""))
