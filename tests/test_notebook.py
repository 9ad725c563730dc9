"""notebooks/finetome_colab.ipynb, executed headless as Colab would run it, on the CPU with the tiny preset.

The parameters are overridden the way papermill does it (a cell tagged `injected-parameters` right after the one
tagged `parameters`), the notebook runs in a real IPython kernel of this Python through nbclient, and the outcomes
are checked on disk: the adapter, run.json, the GGUF and the Space's dry-run tree. Then the training cell runs a
second time in the same kernel, as a user rerunning it after the run finished: it must say so and touch nothing.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, TINY_GGUF_NAME
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = REPO / "notebooks" / "finetome_colab.ipynb"
KERNEL = "finetome-notebook-test"
STEPS = 2


def tagged(notebook, tag: str) -> int:
    [index] = [i for i, cell in enumerate(notebook.cells) if tag in cell.metadata.get("tags", [])]
    return index


def stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def overrides(tmp_path: Path) -> dict:
    """What the test sets: the tiny preset, folders under tmp_path, nothing installed, mounted or uploaded."""
    return {"PRESET": "tiny", "OUTPUT_DIR": str(tmp_path / "run"), "MAX_STEPS": STEPS,
            # 2 conversations of at most 256 tokens a step: the mechanics, not the learning, are under test here
            "EXTRA_TRAIN_ARGS": ["--save-steps", str(STEPS), "--eval-samples", "2", "--grad-accum", "1",
                                 "--max-seq-length", "256"],
            "EXPORT_DIR": str(tmp_path / "gguf"), "INSTALL": False, "MOUNT_DRIVE": False, "PUSH": False,
            "SPACE_DRY_RUN_DIR": str(tmp_path / "space"), "CHAT_MAX_TOKENS": 16}


def run_code(client: NotebookClient, notebook, source: str) -> str:
    """Run `source` in the notebook's kernel as one more cell; its printed text."""
    notebook.cells.append(nbformat.v4.new_code_cell(source))
    client.execute_cell(notebook.cells[-1], len(notebook.cells) - 1)
    return stream_text(notebook.cells[-1])


def with_parameters(notebook, values: dict):
    """`notebook` with papermill's injected-parameters cell after the parameters cell."""
    source = "# Parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(tagged(notebook, "parameters") + 1, cell)
    return notebook


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec for this very Python, in a private JUPYTER_PATH: no user or system kernelspec is read, nothing
    is written under the home folder, and the kernel's environment is this process's (FINETOME_CACHE included)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "finetome test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core's future default; silences its warning
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the tiny preset needs no Hub: prove it
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    return KERNEL


def test_the_notebook_is_committed_clean():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "clear the outputs"
    assert notebook.metadata["colab"]["gpuType"] == "T4" and notebook.metadata["accelerator"] == "GPU"
    assert notebook.cells[tagged(notebook, "parameters")].cell_type == "code"


def test_every_code_cell_but_the_parameters_is_explained_by_a_markdown_cell_after_it():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    unexplained = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
                   and "parameters" not in cell.metadata.get("tags", [])
                   and (i + 1 == len(notebook.cells) or notebook.cells[i + 1].cell_type != "markdown")]
    assert unexplained == []


def test_the_notebook_trains_exports_and_dry_runs_the_deploy(tmp_path, kernel, tiny_model_dir):
    out, export_dir, space_dir = tmp_path / "run", tmp_path / "gguf", tmp_path / "space"
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), overrides(tmp_path))
    client = NotebookClient(notebook, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(REPO)}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
        outputs = {tag: stream_text(notebook.cells[tagged(notebook, tag)])
                   for tag in ("train", "export", "deploy", "chat")}

        run_json = out / "run.json"
        before = run_json.read_bytes(), run_json.stat().st_mtime_ns
        train = tagged(notebook, "train")
        client.execute_cell(notebook.cells[train], train)  # Run all again after the run finished
        again = stream_text(notebook.cells[train])

        # The install cell's check after installing (INSTALL skipped it here): the export's modules import.
        exports = run_code(client, notebook, "print([importable(module) for module in EXPORT_MODULES])")

    everything = "".join(stream_text(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert "repo: already inside it, nothing to clone" in everything
    assert "INSTALL is False" in everything and "PUSH is False" in everything

    assert f"$ python train/run.py --preset tiny --output-dir {out} --max-steps {STEPS}" in outputs["train"]
    assert "model: cpu, fp32" in outputs["train"] and f"done: {STEPS} steps" in outputs["train"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads(before[0])["steps"] == STEPS

    gguf = export_dir / f"{TINY_GGUF_NAME}-Q4_K_M.gguf"
    assert gguf.is_file() and json.loads((export_dir / "report.json").read_text())["passed"]
    assert f"export: {gguf}" in outputs["export"]

    repo_id = f"your-username/{TINY_GGUF_NAME}-GGUF"
    assert "dry run: the Space your-username/finetome-chat would get these files" in outputs["deploy"]
    assert "nothing was uploaded" in outputs["deploy"]
    assert (space_dir / "space" / "app.py").is_file() and (space_dir / "README.md").is_file()
    catalog = json.loads(json.loads((space_dir / ".space_variables.json").read_text())["variables"]["SPACE_MODELS"])
    assert [model["repo_id"] for model in catalog] == [repo_id]

    assert "assistant: " in outputs["chat"] and f"tokens/s ({gguf.name}, CPU)" in outputs["chat"]

    assert exports.strip() == "[True, True, True]"

    # A finished run stays finished: the rerun says so and changes nothing.
    assert f"done: the run in {out} is complete ({STEPS} steps" in again and "Nothing was changed" in again
    assert (run_json.read_bytes(), run_json.stat().st_mtime_ns) == before
    assert sorted(path.name for path in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]


def test_outside_the_repo_the_notebook_clones_it_once(tmp_path, kernel):
    """Colab's case: the notebook starts in an empty folder, clones REPO_URL (here this checkout's last commit) and
    works inside the clone; a rerun in the same runtime reuses it; the placeholder URL is refused with the fix."""
    start = tmp_path / "content"
    start.mkdir()
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), {"REPO_URL": f"file://{REPO}"})
    clone = tagged(notebook, "clone")
    client = NotebookClient(notebook, timeout=120, kernel_name=kernel, resources={"metadata": {"path": str(start)}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells[: clone + 1]):
            client.execute_cell(cell, index)
        first = stream_text(notebook.cells[clone])
        client.execute_cell(notebook.cells[clone], clone)
        second = stream_text(notebook.cells[clone])

        run_code(client, notebook, f"os.chdir({str(start)!r})")  # a restarted kernel starts in /content again
        client.execute_cell(notebook.cells[clone], clone)
        restarted = stream_text(notebook.cells[clone])

        run_code(client, notebook, f"os.chdir({str(start)!r})\nREPO_URL = 'https://github.com/<owner>/<this-repo>.git'")
        with pytest.raises(CellExecutionError, match="is a placeholder: set it in the parameters cell"):
            client.execute_cell(notebook.cells[clone], clone)

    cloned = start / REPO.name
    assert (cloned / "train" / "run.py").is_file()
    assert f"$ git clone --depth 1 file://{REPO} {cloned}" in first and f"repo: working in {cloned}" in first
    assert "repo: already inside it, nothing to clone" in second  # the first run moved into the clone
    assert f"repo: {cloned} was cloned earlier in this runtime" in restarted and "$ git clone" not in restarted


def test_every_override_names_a_parameter(tmp_path):
    """An injected name the parameters cell lacks would be set and never read: the test would not test that."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = notebook.cells[tagged(notebook, "parameters")].source
    names = {line.split("=")[0].strip() for line in source.splitlines() if "=" in line and not line.startswith("#")}
    assert set(overrides(tmp_path)) <= names
