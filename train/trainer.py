"""One training run: resume decision, data, model, TRL SFTTrainer, outputs.

Order matters for failing early and cheaply: the config is validated, the checkpoint to resume from is
chosen and checked, and the data is read and cleaned before any model is loaded.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from common.cli import UsageError
from common.files import temporary_path
from common.log import stage_logger
from common.machine import process_age

from . import checkpoints
from .backends import (
    BACKENDS,
    cuda_available,
    gpu_unusable,
    resolve_model_path,
    select_backend,
    unsloth_installed,
)
from .checkpoints import ResumeError
from .config import TrainConfig
from .prepared import PreparedStore, summary_lines, train_rows_needed
from .summary import RunSummary, read_run_summary, write_run_summary

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "unsloth",
             "unsloth_zoo", "bitsandbytes")


log = stage_logger("train").info


def compat_info(config: TrainConfig) -> dict:
    """What must match for a checkpoint to be resumable by this run."""
    return {
        "model_name": config.model_name,
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(config.target_modules),
    }


def choose_checkpoint(config: TrainConfig, output_dir: Path, compat: dict | None = None) -> Path | None:
    """Apply --resume auto|never|PATH (and --overwrite) to what is in the output folder; `compat` is what a
    checkpoint must have been made with (default: this SFT run's compat_info)."""
    if config.resume == "never":
        existing = checkpoints.list_checkpoints(output_dir)
        if existing and not config.overwrite:
            names = ", ".join(p.name for p in existing)
            raise ResumeError(f"--resume never: {output_dir} already holds {names}; use --resume auto to "
                              "continue, --overwrite to delete them and start over, or another --output-dir")
        for path in existing:
            shutil.rmtree(path)
        return None
    if config.resume == "auto":
        chosen = checkpoints.find_resume_checkpoint(output_dir, warn=log)
    else:
        chosen = Path(config.resume).expanduser()
        reason = checkpoints.verify(chosen)
        if reason is not None:
            raise ResumeError(f"--resume {config.resume}: not a complete checkpoint ({reason}); "
                              "use --resume auto to pick the newest complete one")
    if chosen is not None:
        checkpoints.check_compatible(chosen, compat or compat_info(config))
    return chosen


def _versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["python"] = platform.python_version()
    return found


def _peak_memory() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux.
    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    import torch

    if torch.cuda.is_available():
        peak["peak_vram_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return peak


def run_facts(config: TrainConfig, backend_name: str, loaded, state, resume_from: Path | None) -> dict:
    """What run.json says of every run, SFT or DPO: its settings, where it ran, with what, how far, and its peak
    memory (each stage adds its own figures)."""
    return {"config": config.to_dict(), "backend": backend_name, "device": loaded.device, "dtype": loaded.dtype,
            "base_model": loaded.base_path, "versions": _versions(), "steps": state.global_step,
            "max_steps": state.max_steps, "resumed_from": str(resume_from) if resume_from else None,
            **_peak_memory()}


def _callbacks(config: TrainConfig, output_dir: Path, compat: dict | None = None):
    """The progress bar and the checkpoint sealer, as transformers TrainerCallbacks (`compat`: what the sealed
    checkpoints record as the run's identity, default compat_info)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One bar: step, loss, tokens/s, ETA (tqdm's). Replaces the Trainer's dict printing."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_time, self.start_step = time.perf_counter(), state.global_step
            self.start_tokens = state.num_input_tokens_seen
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout,
                            disable=not state.is_world_process_zero)  # one bar under `accelerate launch`
            self.postfix = {}
            if state.is_world_process_zero and (age := process_age()) is not None:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
                self.bar.write(f"start-up: ready to train {age:.1f} s after the command started "
                               f"(data, model{', checkpoint' if state.global_step else ''}; peak RSS {peak:.2f} GB)",
                               file=sys.stdout)

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.start_time
            if state.num_input_tokens_seen:  # DPO's trainer does not count them
                self.postfix["tok/s"] = f"{(state.num_input_tokens_seen - self.start_tokens) / max(elapsed, 1e-9):.0f}"
            self.bar.set_postfix(self.postfix, refresh=False)
            if self.bar.n == self.start_step and state.is_world_process_zero and (age := process_age()) is not None:
                # Start-up (imports, data, model, resume) is what a resumed Colab run waits through every time.
                self.bar.write(f"step {state.global_step}: the first optimizer step of this run ended "
                               f"{age:.1f} s after the command started", file=sys.stdout)
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.postfix["loss"] = f"{logs['loss']:.4f}"
            if "rewards/margins" in logs:  # DPO: the chosen-minus-rejected reward and how often it is positive
                self.postfix["margin"] = f"{logs['rewards/margins']:.3f}"
                self.postfix["acc"] = f"{logs['rewards/accuracies']:.2f}"
            if "eval_loss" in logs:
                self.postfix["eval"] = f"{logs['eval_loss']:.4f}"
                self.bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")
            self.bar.set_postfix(self.postfix)  # the Trainer logs after on_step_end: show this step's loss

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    class Sealer(TrainerCallback):
        """After the Trainer has written checkpoint-N: seal it, then rotate old sealed ones."""

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            checkpoint = output_dir / f"checkpoint-{state.global_step}"
            checkpoints.seal(checkpoint, {"compat": compat or compat_info(config)})
            removed = checkpoints.rotate(output_dir, config.save_total_limit)
            note = f" (removed {', '.join(p.name for p in removed)})" if removed else ""
            tqdm.write(f"saved {checkpoint}{note}", file=sys.stdout)

    return [Progress(), Sealer()]


def shared_arguments(config: TrainConfig, output_dir: Path, optimizer: str, dtype: str, has_eval: bool) -> dict:
    """The settings every stage's TRL config (SFTConfig, DPOConfig) takes from TrainConfig, as keyword arguments."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        optim=optimizer,
        seed=config.seed,
        data_seed=config.seed,
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,  # rotation is ours: it never deletes the last sealed checkpoint too early
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps or config.save_steps,
        report_to=[] if config.report_to == "none" else [config.report_to],
        fp16=dtype == "fp16",
        bf16=dtype == "bf16",  # DPOConfig defaults to bf16 unless told: never on a CPU
        dataset_num_proc=None,
        disable_tqdm=True,  # our Progress callback draws the bar
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda_available(),  # pinning needs an accelerator; on CPU it only warns
        gradient_checkpointing=False,  # the backend already set it up on the model
        save_only_model=False,
    )


def _training_arguments(config: TrainConfig, output_dir: Path, backend_optimizer: str, dtype: str, has_eval: bool):
    # With the unsloth backend, importing unsloth (at model load, before this) has replaced trl.SFTConfig with
    # Unsloth's patched subclass, UnslothSFTConfig: that is the class built here then.
    from trl import SFTConfig

    return SFTConfig(**shared_arguments(config, output_dir, backend_optimizer, dtype, has_eval),
                     max_length=config.max_seq_length, packing=False,
                     include_num_input_tokens_seen="non_padding")


def sft_trainer_class():
    """TRL's SFTTrainer, able to run where TRL's Triton loss kernels cannot (on CPU).

    TRL 1.15's SFTTrainer always computes the loss through a fused LM head whose kernels are Triton, which
    needs a GPU; on CPU it fails with `'NoneType' object has no attribute 'apply'`. There, the loss is the
    model's own causal-LM cross-entropy over the same labels (what TRL's fused head computes, without its
    entropy/accuracy metrics). On CUDA the parent class's loss runs: TRL's own with the hf backend; with the unsloth
    backend, importing unsloth has already replaced trl.SFTTrainer (and trl.SFTConfig) with Unsloth's patched
    subclasses, so this class derives from UnslothSFTTrainer and the loss is Unsloth's.
    """
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    class PipelineSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            kernels_usable = trl_utils._ChunkedLogProbFunction is not None and self.args.device.type in ("cuda", "xpu")
            if kernels_usable:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PipelineSFTTrainer


def save_adapter(model, tokenizer, output_dir: Path, adapters: list[str] | None = None) -> Path:
    """Write <output>/adapter atomically: to a temporary folder, then swapped in (`adapters`: which of the model's
    PEFT adapters, default all; PEFT writes a "default" one at the top of the folder)."""
    final = output_dir / "adapter"
    staging = output_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, **({"selected_adapters": adapters} if adapters else {}))
    tokenizer.save_pretrained(staging)
    previous = output_dir / f".adapter.old-{os.getpid()}"
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def plot_losses(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evaluation:
        axis.plot(*zip(*evaluation), "o-", label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (assistant tokens)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    temporary = temporary_path(path)
    figure.savefig(temporary, format="png")
    plt.close(figure)
    os.replace(temporary, path)


def previous_run(output_dir: Path) -> RunSummary:
    """The run.json an earlier run of this folder wrote when it finished (empty when there is none or it is
    unreadable)."""
    return read_run_summary(output_dir) or RunSummary()


def is_finished(config: TrainConfig, output_dir: Path, previous: RunSummary, resume_from: Path | None) -> bool:
    """Whether the run in this folder already reached --max-steps (its newest checkpoint, adapter and run.json all at
    that step). Rerunning the same command after a finished run must not train more: on Colab, rerunning every
    cell after a disconnect is what users do."""
    if resume_from is None or config.max_steps == -1:
        return False
    step = json.loads((resume_from / "trainer_state.json").read_text()).get("global_step", 0)
    adapter = output_dir / "adapter" / "adapter_model.safetensors"
    return step >= config.max_steps and previous.steps == step and adapter.is_file()


def schedule_note(config: TrainConfig, previous: RunSummary, resume_from: Path | None) -> str | None:
    """One line when a finished run is continued on purpose with a larger --max-steps: what happens to the schedule."""
    if resume_from is None:
        return None
    done = previous.steps
    if not done or previous.max_steps != done or config.max_steps in (-1, done):
        return None
    if config.lr_scheduler in ("constant", "constant_with_warmup"):
        return (f"resume: the finished {done}-step run continues to {config.max_steps} steps; the {config.lr_scheduler} "
                "learning rate is unchanged")
    return (f"resume: the finished {done}-step run continues to {config.max_steps} steps; the {config.lr_scheduler} "
            f"learning-rate schedule now spans {config.max_steps} steps, so step {done + 1} restarts from that longer "
            "schedule's value instead of ending at its end")


def run(config: TrainConfig) -> RunSummary:
    started = time.perf_counter()
    output_dir = Path(config.output_dir).expanduser()
    backend_name = select_backend(config.backend, has_cuda=cuda_available(), has_unsloth=unsloth_installed(),
                                  gpu_unusable=gpu_unusable())
    backend = BACKENDS[backend_name]
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = choose_checkpoint(config, output_dir)
    previous = previous_run(output_dir)
    if is_finished(config, output_dir, previous, resume_from):
        log(f"done: the run in {output_dir} is complete ({previous.steps} steps, --max-steps {config.max_steps}); "
            f"adapter: {previous.adapter}. Nothing was changed; raise --max-steps to train further")
        return previous
    if note := schedule_note(config, previous, resume_from):
        log(note)

    store = PreparedStore(output_dir)
    manifest, why = store.find(config)
    prepared = None
    main_process = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch`, the others take its data
    if manifest is None and main_process:
        data_started = time.perf_counter()
        log(f"data: preparing from {config.dataset} ({why})")
        prepared = store.scan(config)
        for line in prepared.summary():
            log(line)
        log(f"data: scanned in {time.perf_counter() - data_started:.1f} s")
    elif manifest is not None:
        log(f"data: reusing what was prepared in {store.folder} (same source and settings)")
        for line in summary_lines(manifest):
            log(line)

    model_path = resolve_model_path(config.model_name, config.seed)
    log(f"model: loading {model_path} with the {backend_name} backend")
    loaded = backend.load(config, model_path)
    log(f"model: {loaded.device}, {loaded.dtype}")

    from accelerate import PartialState

    data_started = time.perf_counter()
    with PartialState().main_process_first():  # a no-op in one process
        if manifest is None and prepared is None:  # not the main process: what it prepared, or its own when absent
            manifest, _ = store.find(config)
            prepared = store.scan(config) if manifest is None else None
        data = store.finish(config, manifest, prepared, loaded.tokenizer, log)
    info = data.info
    if not data.reused:
        needed = train_rows_needed(config)
        use = f" (what {config.max_steps} steps read)" if needed is not None else ""
        log(f"data: tokenized {info['train']} train{use} / {info['eval']} eval conversations in "
            f"{time.perf_counter() - data_started:.1f} s, kept in {store.folder}")
    if info["truncated"] or info["dropped"]:
        log(f"data: {info['truncated']} conversations longer than --max-seq-length {config.max_seq_length} "
            f"truncated, {info['dropped']} of them dropped (no assistant token left)")
    if not info["train"]:
        raise UsageError([f"--max-seq-length {config.max_seq_length}: every conversation lost all its "
                           "assistant tokens to truncation; raise it"])

    import datasets
    from transformers.trainer_callback import PrinterCallback

    datasets.disable_progress_bars()  # TRL's per-split map() bars would bury our one progress bar
    train_dataset, eval_dataset = data.train, data.eval
    arguments = _training_arguments(config, output_dir, backend.optimizer(config), loaded.dtype, eval_dataset is not None)
    trainer = sft_trainer_class()(
        model=loaded.model,
        args=arguments,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=loaded.tokenizer,
        callbacks=_callbacks(config, output_dir),
    )
    trainer.remove_callback(PrinterCallback)
    if resume_from is not None:
        log(f"resume: continuing from {resume_from}")
    train_started = time.perf_counter()
    tokens_before = 0
    if resume_from is not None:
        tokens_before = json.loads((resume_from / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - train_started
    if not trainer.is_world_process_zero():
        return RunSummary()  # under `accelerate launch` (several processes, one model replica each) rank 0 writes the outputs

    adapter = save_adapter(loaded.model, loaded.tokenizer, output_dir)
    state = trainer.state
    history = state.log_history
    losses = [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e]
    eval_losses = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in history if "eval_loss" in e]
    tokens_this_run = state.num_input_tokens_seen - tokens_before
    summary = {
        **run_facts(config, backend_name, loaded, state, resume_from),
        "train_loss": losses[-1]["loss"] if losses else None,
        "eval_loss": eval_losses[-1]["eval_loss"] if eval_losses else None,
        "losses": losses,
        "eval_losses": eval_losses,
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_this_run": tokens_this_run,
        "tokens_per_second": round(tokens_this_run / train_seconds, 1) if train_seconds > 0 else None,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "data": {**info, "reused": data.reused},
        "adapter": str(adapter),
        "train_metrics": result.metrics,
    }
    summary_file = write_run_summary(output_dir, summary)
    plot_losses(history, output_dir / "loss.png")
    log(f"done: {state.global_step} steps, train loss {summary['train_loss']}, eval loss {summary['eval_loss']}, "
        f"{summary['tokens_per_second']} tokens/s")
    log(f"adapter: {adapter}")
    log(f"run summary: {summary_file}, loss curve: {output_dir / 'loss.png'}")
    return RunSummary(summary)
