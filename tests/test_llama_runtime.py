"""common/llama_runtime.py, the one place GGUFs are opened: the AMX detection and the override, table-driven on the system
info of real CPUs; the safe path forced on this machine (whatever its CPU) with a real decode through the Space's
engine; the setting reaching llama.cpp itself; and no other place in the project constructing a Llama."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import llama_runtime as runtime
from common.llama_runtime import (EXTRA_BUFFERS_ENV, LlamaSetupError, choose_extra_buffers, open_gguf,
                          parse_system_info)

REPO = Path(__file__).resolve().parents[1]

# llama_print_system_info() of llama-cpp-python builds (native, the pip default) on each kind of CPU.
SAPPHIRE_RAPIDS = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
                   "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
                   "REPACK = 1 | ")
HASWELL_AVX2 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
                "OPENMP = 1 | REPACK = 1 | ")
AMD_EPYC_ZEN3 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
                 "OPENMP = 1 | REPACK = 1 | ")
AMD_EPYC_ZEN4 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
                 "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
GRAVITON = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | MATMUL_INT8 = 1 | SVE = 1 | DOTPROD = 1 | SVE_CNT = 32 | " \
           "OPENMP = 1 | REPACK = 1 | "
CUDA_ON_SAPPHIRE_RAPIDS = "CUDA : ARCHS = 750,890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | " + SAPPHIRE_RAPIDS
PORTABLE_ON_SAPPHIRE_RAPIDS = HASWELL_AVX2  # GGML_NATIVE=OFF: the same library on every x86-64 CPU


@pytest.mark.parametrize("info, override, enabled, reason", [
    (SAPPHIRE_RAPIDS, None, False, "AMX_INT8 = 1"),
    (CUDA_ON_SAPPHIRE_RAPIDS, None, False, "AMX_INT8 = 1"),
    (HASWELL_AVX2, None, True, "no AMX path"),
    (AMD_EPYC_ZEN3, None, True, "no AMX path"),
    (AMD_EPYC_ZEN4, None, True, "no AMX path"),  # AVX-512 without AMX: llama.cpp's AVX-512 kernels, no crash
    (GRAVITON, None, True, "no AMX path"),
    (PORTABLE_ON_SAPPHIRE_RAPIDS, None, True, "no AMX path"),
    ("", None, True, "no AMX path"),  # nothing reported: the library's default
    (SAPPHIRE_RAPIDS, "auto", False, "AMX_INT8 = 1"),
    (SAPPHIRE_RAPIDS, "", False, "AMX_INT8 = 1"),
    (SAPPHIRE_RAPIDS, "on", True, f"{EXTRA_BUFFERS_ENV}=on"),  # a user who knows better, both ways
    (SAPPHIRE_RAPIDS, "1", True, f"{EXTRA_BUFFERS_ENV}=1"),
    (AMD_EPYC_ZEN3, "off", False, f"{EXTRA_BUFFERS_ENV}=off"),
    (AMD_EPYC_ZEN3, " OFF ", False, f"{EXTRA_BUFFERS_ENV}= OFF "),
    (AMD_EPYC_ZEN3, "false", False, f"{EXTRA_BUFFERS_ENV}=false"),
])
def test_choice_from_system_info_and_override(info, override, enabled, reason):
    choice = choose_extra_buffers(info, override)
    assert choice.enabled is enabled and reason in choice.reason
    assert ("default path" if enabled else "safe path") in choice.describe() and EXTRA_BUFFERS_ENV in choice.describe()


@pytest.mark.parametrize("override", ["maybe", "2", "amx"])
def test_an_unknown_override_is_one_line_naming_value_and_fix(override):
    with pytest.raises(LlamaSetupError) as error:
        choose_extra_buffers(AMD_EPYC_ZEN3, override)
    message = str(error.value)
    assert "\n" not in message and f"{EXTRA_BUFFERS_ENV}={override!r}" in message and "on, off or auto" in message


def test_system_info_parsing_keeps_backends_apart():
    parsed = parse_system_info(CUDA_ON_SAPPHIRE_RAPIDS)
    assert parsed["CPU"]["AMX_INT8"] == "1" and "AMX_INT8" not in parsed["CUDA"]
    assert parsed["CUDA"]["ARCHS"] == "750,890"


def test_this_machine_is_decided_from_its_own_llama_cpp(monkeypatch):
    monkeypatch.delenv(EXTRA_BUFFERS_ENV, raising=False)
    info = runtime.system_info()
    assert info.startswith("CPU : ")  # the loaded library answers in the format parsed above
    assert runtime.extra_buffers() == choose_extra_buffers(info)
    assert runtime.extra_buffers().enabled is (parse_system_info(info)["CPU"].get("AMX_INT8") != "1")


# ---------------------------------------------------------------------- the real library, on this machine
def _has_amx_path() -> bool:
    """Whether the loaded llama.cpp has its AMX path (built on an AMX CPU): decoding a k-quant there with extra buffer
    types forced on segfaults (llama.cpp issue 20824), the crash the safe path exists to avoid."""
    return parse_system_info(runtime.system_info())["CPU"].get("AMX_INT8") == "1"


AMX_CRASH = "this llama.cpp has its AMX path: decoding with extra buffer types on segfaults here (llama.cpp issue 20824)"


@pytest.mark.parametrize("setting, expected", [("off", False), ("on", True)])
def test_forced_path_decodes_through_the_engine(tiny_gguf, monkeypatch, setting, expected):
    """The safe path is exercised on every machine, not only on Intel: forced, then a real chat through the engine."""
    from space.catalog import catalog_from_paths
    from space.engine import Engine
    from space.replies import Sampling

    if setting == "on" and _has_amx_path():
        pytest.skip(AMX_CRASH)
    monkeypatch.setenv(EXTRA_BUFFERS_ENV, setting)
    engine = Engine(catalog_from_paths([str(tiny_gguf)]), n_ctx=512)
    label = engine.labels[0]
    replies = list(engine.stream_chat(label, "Hello!", sampling=Sampling(temperature=0, max_new_tokens=12)))
    assert replies[-1].done and replies[-1].error is None and replies[-1].tokens > 0
    assert engine.get(label).model_params.use_extra_bufts is expected  # what llama.cpp was given


def test_both_paths_give_the_same_greedy_tokens(tiny_gguf, monkeypatch):
    """Turning the extra buffer types off changes where the weights live, not what the model computes."""
    if _has_amx_path():
        pytest.skip(AMX_CRASH)
    answers = {}
    for setting in ("on", "off"):
        monkeypatch.setenv(EXTRA_BUFFERS_ENV, setting)
        llm = open_gguf(tiny_gguf, n_ctx=256)
        tokens = llm.tokenize(b"The quick brown fox", add_bos=True)
        answers[setting] = [token for _, token in zip(range(16), llm.generate(tokens, temp=0.0))]
        llm.close()
    assert answers["on"] == answers["off"] and len(answers["on"]) == 16


LOAD_AND_PRINT = """
import sys
from common.llama_runtime import open_gguf
llm = open_gguf(sys.argv[1], n_ctx=256, verbose=True)  # the buffer lines come with the load; no decode (AMX: crash)
"""


def _model_buffers(tiny_gguf, setting: str) -> str:
    """llama.cpp's own log of where it put the weights (its `model buffer size` lines), in a fresh process."""
    result = subprocess.run([sys.executable, "-c", LOAD_AND_PRINT, str(tiny_gguf)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, EXTRA_BUFFERS_ENV: setting})
    assert result.returncode == 0, result.stderr[-2000:]
    return "\n".join(line for line in result.stderr.splitlines() if "model buffer size" in line)


def test_the_setting_reaches_llama_cpp(tiny_gguf):
    """Off: every weight in the plain (memory-mapped) CPU buffer, as llama.cpp itself reports. On: the extra buffer
    types this library has (REPACK here: "repack tensor blk.0.attn_q.weight with q4_K_8x8") take the ones they can."""
    off, on = _model_buffers(tiny_gguf, "off"), _model_buffers(tiny_gguf, "on")
    assert "CPU_Mapped model buffer size" in off and "REPACK" not in off and "AMX" not in off, off
    if parse_system_info(runtime.system_info())["CPU"].get("REPACK") == "1":
        assert "CPU_REPACK model buffer size" in on or "AMX model buffer size" in on, on


# ---------------------------------------------------------------------- one place
def _constructions(path: Path) -> list[str]:
    """Calls in a file that construct a llama_cpp.Llama: Llama(...), llama_cpp.Llama(...), Llama.from_pretrained(...)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        name = ast.unparse(function)
        if name in ("Llama", "llama_cpp.Llama") or name.endswith(".Llama") or name.endswith("Llama.from_pretrained"):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}(...)")
    return found


def test_nothing_else_constructs_a_llama():
    sources = [path for folder in ("common", "train", "export", "space", "scripts", "tests")
               for path in (REPO / folder).rglob("*.py")]
    assert len(sources) > 30
    constructions = [found for path in sources if path != REPO / "common" / "llama_runtime.py" for found in _constructions(path)]
    assert constructions == []
    assert len(_constructions(REPO / "common" / "llama_runtime.py")) == 2  # open_gguf and open_gguf_from_hub


def test_the_space_and_the_export_reject_a_bad_setting_in_one_line(tiny_gguf, trained_adapter, tmp_path):
    env = {**os.environ, EXTRA_BUFFERS_ENV: "sometimes"}
    space = subprocess.run([sys.executable, "space/app.py", "--model", str(tiny_gguf)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    export = subprocess.run([sys.executable, "export/to_gguf.py", "--adapter", str(trained_adapter),
                             "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    for result in (space, export):
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
        assert f"{EXTRA_BUFFERS_ENV}='sometimes' is not a setting; use on, off or auto" in lines[0]
    assert not (tmp_path / "out").exists()

