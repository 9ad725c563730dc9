#!/usr/bin/env python
"""The whole pipeline offline, in a few minutes on a laptop CPU, proving that training taught the model something:
`make demo` runs this.

    python scripts/demo.py                 # ask -> train -> (kill, resume) -> export -> ask again -> serve the Space
    DEMO_NO_LAUNCH=1 python scripts/demo.py   # everything but serving (what the tests run)
    DEMO_OUT=/tmp/demo python scripts/demo.py # somewhere other than outputs/demo
    python scripts/demo.py --help             # this text; does nothing else (the demo takes no flags)

It asks the tiny model (a randomly initialised Llama-3.2-architecture model with the real Llama-3 tokenizer) one
of the questions in train/data/taught.jsonl (noise comes back), trains the `demo` preset on them with LoRA, kills
the run with SIGKILL right after a checkpoint and resumes it (what a dead Colab runtime does to you), exports
verified q4_k_m and q8_0 GGUFs (with behaviour probes: every taught question, merged model vs each GGUF), asks
the Space's engine the same question of the q4_k_m GGUF (the taught answer comes back), prints a summary, then
serves the Space on the exported model, with the taught questions as its chat examples, until Ctrl-C.
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

from common.cli import UsageError, UsageParser  # noqa: E402
from common.llama_runtime import extra_buffers  # noqa: E402
from export.probes import TAUGHT_DATASET, read_taught  # noqa: E402
from train.summary import RunSummary, load_run_summary  # noqa: E402

PRESET = "demo"  # train/presets/demo.yaml: 40 steps, a checkpoint every 10
KILL_AFTER_STEP = 20


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def train_with_a_crash(out: Path) -> RunSummary:
    """Train the demo preset, SIGKILL the run right after its checkpoint-20 is sealed, then rerun the same command."""
    command = [sys.executable, str(REPO / "train/run.py"), "--preset", PRESET, "--output-dir", str(out)]
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
    return load_run_summary(out)


def base_answer(question: str) -> str:
    """The untrained tiny model's greedy answer (transformers), as the merged model is probed in the export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.probes import Probe, answer_text, merged_answers
    from train.tiny import ensure_tiny_model

    folder = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return answer_text(tokenizer, merged_answers(model, tokenizer, [Probe(question)], 24)[0])


def engine_answer(gguf: Path, question: str):
    """The Space engine's answer from the GGUF, greedy (temperature 0), through its own chat template."""
    from space.catalog import catalog_from_paths
    from space.engine import Engine
    from space.replies import Sampling

    engine = Engine(catalog_from_paths([str(gguf)]), n_ctx=1024)
    reply = None
    for reply in engine.stream_chat(engine.labels[0], question, sampling=Sampling(temperature=0.0, max_new_tokens=64)):
        pass
    if reply is None or reply.error:
        raise SystemExit(f"demo: the Space engine did not answer ({reply.error if reply else 'no reply'})")
    return reply


def probe_lines(probes: dict) -> list[str]:
    lines = [f"  {'file':<8} {'taught answers':>15} {'identical to merged':>20}  first divergence"]
    for quant, stats in probes["per_quant"].items():
        divergence = stats["first_divergence"]
        where = (f"{divergence['prompt']!r} token {divergence['token']}: {divergence['merged']!r} vs "
                 f"{divergence['gguf']!r}" if divergence else "none")
        lines.append(f"  {quant:<8} {stats['taught']:>9}/{stats['probes']:<5} {stats['identical']:>14}/"
                     f"{stats['probes']:<5}  {where}")
    return lines


def parse_args(argv: list[str] | None = None) -> None:
    """--help and a bad flag are answered before anything is deleted or trained (the demo takes no flags: its two
    settings are environment variables)."""
    import argparse

    parser = UsageParser(prog="python scripts/demo.py", description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        parse_args(argv)
    except UsageError as error:
        return error.report()
    out = Path(os.environ.get("DEMO_OUT", REPO / "outputs" / "demo")).resolve()
    train_dir, export_dir = out / "train", out / "gguf"
    started = time.perf_counter()
    taught = read_taught(TAUGHT_DATASET)
    question = taught[0].prompt
    print(f"demo: the tiny model starts from random weights, so it babbles. The demo teaches it the "
          f"{len(taught)} short\nquestion -> answer conversations of {TAUGHT_DATASET.relative_to(REPO)} with LoRA "
          "(about 29 s on 2 cores), and shows\nthe answers surviving the merge, the GGUF conversion and 4-bit "
          "quantization. The README shows the real\n1B/3B commands.")
    shutil.rmtree(train_dir, ignore_errors=True)  # a fresh run each time, so the crash happens again

    banner("1/5 before training: the base model's greedy answer (transformers)")
    before = base_answer(question)
    print(f"user: {question}\nassistant: {before[:200]}")

    banner(f"2/5 train the {PRESET} preset (train/presets/{PRESET}.yaml: 40 steps, checkpoint every 10)")
    train_started = time.perf_counter()
    summary = train_with_a_crash(train_dir)
    train_seconds = time.perf_counter() - train_started
    banner("3/5 export to q4_k_m and q8_0 with llama.cpp's converter and quantizer, verify, probe the taught answers")
    run(str(REPO / "export/to_gguf.py"), "--adapter", str(train_dir / "adapter"), "--out", str(export_dir),
        "--quant", "q4_k_m", "q8_0")
    report = json.loads((export_dir / "report.json").read_text())
    gguf = export_dir / report["files"][0]["name"]
    banner("4/5 after: the Space engine's answer from the q4_k_m GGUF (greedy)")
    reply = engine_answer(gguf, question)
    print(f"user: {question}\nassistant: {reply.text.strip()[:300]}")

    banner("summary")
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    q4 = report["quantization"].get("q4_k_m", {})
    print(f"question:  {question}")
    print(f"before:    {before[:120]!r} (the untrained base model)")
    print(f"after:     {reply.text.strip()[:120]!r} (q4_k_m GGUF through the Space engine; taught: "
          f"{taught[0].expected!r})")
    print(f"training:  {summary.steps} steps in {train_seconds:.0f} s (two processes: killed, resumed from "
          f"{Path(summary.resumed_from).name}), train loss {summary.train_loss:.4f}, "
          f"{summary.tokens_per_second:.0f} tokens/s after the resume")
    print(f"adapter:   {train_dir / 'adapter'}")
    print(f"gguf:      {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB)")
    print(f"verified:  {len(report['checks']) - len(failed)}/{len(report['checks'])} checks passed; f16 vs merged "
          f"top-1 {report['logits_f16_vs_merged']['top1_agreement_ties']:.2%}; q4_k_m mean KLD "
          f"{q4.get('kld_mean', float('nan')):.5f}")
    probes = report["probes"]
    print(f"probes:    greedy answers to the {probes['prompts']} taught questions; merged model (transformers): "
          f"{probes['merged_taught']}/{probes['prompts']} taught answers")
    print("\n".join(probe_lines(probes)))
    print(f"chat:      {reply.tokens} tokens at {reply.tokens_per_s or 0:.0f} tokens/s (Space engine, q4_k_m)")
    print(f"runtime:   {extra_buffers().describe()}")
    print(f"report:    {export_dir / 'report.json'}, model card {export_dir / 'README.md'}")
    print(f"total:     {time.perf_counter() - started:.0f} s")

    if os.environ.get("DEMO_NO_LAUNCH") == "1":
        return 0
    banner("5/5 serving the Space on the exported model: http://localhost:7860 (Ctrl-C to stop); "
           "its chat examples are the taught questions")
    examples = [arg for probe in taught for arg in ("--example", probe.prompt)]
    try:
        run(str(REPO / "space/app.py"), "--model", str(gguf), *examples)
    except KeyboardInterrupt:
        print("\ndemo: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
