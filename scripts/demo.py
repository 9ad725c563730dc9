#!/usr/bin/env python
"""The whole pipeline offline, in a few minutes on a laptop CPU: `make demo` runs this.

    python scripts/demo.py                 # train -> (kill, resume) -> export -> chat -> serve the Space
    DEMO_NO_LAUNCH=1 python scripts/demo.py   # everything but serving (what the tests run)
    DEMO_OUT=/tmp/demo python scripts/demo.py # somewhere other than outputs/demo

It trains the `tiny` preset (a randomly initialised Llama-3.2-architecture model with the real Llama-3 tokenizer)
on the shipped sample, kills the run with SIGKILL right after a checkpoint and resumes it (what a dead Colab
runtime does to you), exports a verified q4_k_m GGUF, answers one scripted chat turn through llama-cpp-python,
prints a summary, then serves the Space on the exported model until Ctrl-C.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.llama import extra_buffers, open_gguf  # noqa: E402

KILL_AFTER_STEP = 4


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def train_with_a_crash(out: Path) -> dict:
    """Train 6 steps, SIGKILL the run right after its step-4 checkpoint is sealed, then rerun the same command."""
    command = [sys.executable, str(REPO / "train/run.py"), "--preset", "tiny", "--output-dir", str(out),
               "--max-steps", "6", "--save-steps", "2"]
    process = subprocess.Popen(command, cwd=REPO)
    sealed = out / f"checkpoint-{KILL_AFTER_STEP}" / "checkpoint_manifest.json"
    while not sealed.exists():
        if process.poll() is not None:
            raise SystemExit(f"demo: training stopped before checkpoint-{KILL_AFTER_STEP} (exit {process.returncode})")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    banner(f"killed the training run with SIGKILL after checkpoint-{KILL_AFTER_STEP} (a dead runtime); "
           "rerunning the same command")
    subprocess.run(command, cwd=REPO, check=True)
    return json.loads((out / "run.json").read_text())


def chat_once(gguf: Path) -> tuple[str, float, int]:
    llm = open_gguf(gguf, n_ctx=1024)
    started, tokens, text = time.perf_counter(), 0, ""
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": "What is LoRA, in one sentence?"}],
                                            max_tokens=64, temperature=0.7, top_p=0.9, stream=True):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            text, tokens = text + piece, tokens + 1
    return text, tokens / (time.perf_counter() - started), tokens


def main() -> None:
    out = Path(os.environ.get("DEMO_OUT", REPO / "outputs" / "demo")).resolve()
    train_dir, export_dir = out / "train", out / "gguf"
    started = time.perf_counter()
    print("demo: the tiny model is randomly initialised: it shows the mechanics (training, resume, export,\n"
          "verification, serving) in a few minutes, and its words are meaningless. The README shows the real\n"
          "1B/3B commands.")
    shutil.rmtree(train_dir, ignore_errors=True)  # a fresh run each time, so the crash happens again

    banner("1/4 train the tiny preset (6 steps, checkpoint every 2)")
    summary = train_with_a_crash(train_dir)
    banner("2/4 export to q4_k_m with llama.cpp's converter and quantizer, and verify it")
    run(str(REPO / "export/to_gguf.py"), "--adapter", str(train_dir / "adapter"), "--out", str(export_dir))
    report = json.loads((export_dir / "report.json").read_text())
    gguf = export_dir / report["files"][0]["name"]
    banner("3/4 one chat turn through llama-cpp-python")
    answer, tokens_per_second, tokens = chat_once(gguf)
    print(f"user: What is LoRA, in one sentence?\nassistant: {answer.strip()[:300]}")

    banner("summary")
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    q4 = report["quantization"].get("q4_k_m", {})
    print(f"training:  {summary['steps']} steps, resumed from {Path(summary['resumed_from']).name}, "
          f"train loss {summary['train_loss']:.4f}, eval loss {summary['eval_loss']:.4f}, "
          f"{summary['tokens_per_second']:.0f} tokens/s after the resume")
    print(f"adapter:   {train_dir / 'adapter'}")
    print(f"gguf:      {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB)")
    print(f"verified:  {len(report['checks']) - len(failed)}/{len(report['checks'])} checks passed; f16 vs merged "
          f"top-1 {report['logits_f16_vs_merged']['top1_agreement_ties']:.2%}; q4_k_m mean KLD "
          f"{q4.get('kld_mean', float('nan')):.5f}")
    print(f"chat:      {tokens} tokens at {tokens_per_second:.0f} tokens/s (llama-cpp-python, q4_k_m)")
    print(f"runtime:   {extra_buffers().describe()}")
    print(f"report:    {export_dir / 'report.json'}, model card {export_dir / 'README.md'}")
    print(f"total:     {time.perf_counter() - started:.0f} s")

    if os.environ.get("DEMO_NO_LAUNCH") == "1":
        return
    banner("4/4 serving the Space on the exported model: http://localhost:7860 (Ctrl-C to stop)")
    try:
        run(str(REPO / "space/app.py"), "--model", str(gguf))
    except KeyboardInterrupt:
        print("\ndemo: stopped")


if __name__ == "__main__":
    main()
