"""Preference tuning (DPO) on top of a finished SFT run: TRL's DPOTrainer, the SFT adapter as policy and reference.

    python train/run.py --preset tiny-dpo --sft-adapter outputs/tiny/adapter --output-dir outputs/tiny-dpo

The SFT adapter is loaded twice onto one copy of the base weights: as PEFT's trainable "default" adapter (the
policy, which starts as the SFT model) and, by TRL's DPOTrainer, as a frozen copy named "ref" (the reference).
The policy adapter therefore carries SFT and DPO together: <output-dir>/adapter/ is a plain LoRA adapter of the
base, exported by export/to_gguf.py exactly like an SFT adapter. The pairs are read once, split with the seed into
held-out / evaluation / training pairs, and kept in <output-dir>/pairs/, so a resumed run trains on exactly the
pairs it started with even when the vote log has grown since. Checkpoints, resume, rotation and the finished-run
check are the SFT stage's (train/trainer.py, train/checkpoints.py). Before and after training, the held-out pairs
are scored: preference accuracy (how often the model's mean per-token log-probability of the chosen answer beats
the rejected one's) and DPO's reward margin (beta x how much more the policy moved towards chosen than towards
rejected, relative to the SFT reference: 0 before by construction).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common.cli import UsageError
from common.files import sha256_file, swap_in_folder, temporary_path, write_json_atomic
from common.llama3 import TEMPLATE_DATE
from common.log import stage_logger

from .backends import BACKENDS, cuda_available, gpu_unusable, resolve_model_path, select_backend, unsloth_installed
from .config import TrainConfig, sft_adapter_dir, sft_run_summary
from .preferences import read_pairs, split_pairs
from .summary import RunSummary, write_run_summary
from .trainer import (
    _callbacks,
    choose_checkpoint,
    is_finished,
    previous_run,
    run_facts,
    save_adapter,
    schedule_note,
    shared_arguments,
)

POLICY = "default"  # PEFT's name for the adapter loaded first: the one trained, saved and exported
SPLITS = ("heldout", "eval", "train")
LOG_PROB_CHUNK = 1024  # tokens projected onto the vocabulary at once by the CPU log-probabilities


log = stage_logger("train").info


def compat_info(config: TrainConfig, sft_sha256: str) -> dict:
    """What must match for a DPO checkpoint to be resumable by this run."""
    return {"stage": "dpo", "model_name": config.model_name, "sft_adapter_sha256": sft_sha256, "beta": config.beta,
            "loss_type": config.loss_type}


# ---------------------------------------------------------------------- TRL on a CPU
class TorchChunkedLogProb:
    """TRL's `ChunkedLogProbFunction` interface (its fused LM head's per-token log-probabilities) in plain torch, for
    machines without Triton. TRL 1.15's DPOTrainer always scores through that Triton kernel, which a CPU build of
    torch lacks (`'NoneType' object has no attribute 'apply'`). Each chunk of tokens is projected onto the vocabulary
    under activation checkpointing, so the logits of one chunk at a time exist, in the backward pass too; the extra
    outputs (entropy, mean logit, top-1) are logged metrics only and computed without gradients."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        import torch
        from torch.utils.checkpoint import checkpoint

        def logits_of(states):
            z = states @ weight.t()
            if bias is not None:
                z = z + bias
            z = z.float() * logit_scale
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            return z / temperature

        def log_probs(states, wanted):
            z = logits_of(states)
            return z.gather(1, wanted[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)

        starts = range(0, hidden.shape[0], LOG_PROB_CHUNK)
        pieces = [checkpoint(log_probs, hidden[s:s + LOG_PROB_CHUNK], targets[s:s + LOG_PROB_CHUNK],
                             use_reentrant=False) for s in starts]
        result = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
        extras = {name: [] for name in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")}
        with torch.no_grad():
            for s in starts:
                z = logits_of(hidden[s:s + LOG_PROB_CHUNK].detach())
                log_p = torch.log_softmax(z, dim=1)
                wanted = targets[s:s + LOG_PROB_CHUNK]
                extras["entropy"].append(-(log_p.exp() * log_p).sum(1))
                extras["log_sum_sq_probs"].append(torch.logsumexp(2 * log_p, dim=1))
                extras["mean_logits"].append(z.mean(1))
                extras["is_top1"].append(z.argmax(1) == wanted)
        empty = {"is_top1": torch.bool}
        return (result, *(
            (torch.cat(extras[name]) if extras[name] else hidden.new_zeros(0, dtype=empty.get(name, torch.float32)))
            if name in outputs else None for name in extras))


def use_torch_log_probs_without_triton() -> bool:
    """Give TRL the plain-torch log-probabilities where its Triton kernel cannot run; True when it did."""
    from trl.trainer import utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is not None and cuda_available():
        return False
    trl_utils._ChunkedLogProbFunction = TorchChunkedLogProb  # read by the fused head at every call
    return True


def dpo_trainer_class():
    """TRL's DPOTrainer whose checkpoints hold the policy adapter only.

    Saved whole, a checkpoint would also hold the frozen "ref" adapter in a `ref/` subfolder, and transformers 5.17's
    resume, on finding adapter subfolders, loads only those: the policy would silently restart from the SFT weights.
    With the policy alone at the top, resume loads it into the policy adapter; "ref" is rebuilt from the SFT adapter
    by DPOTrainer itself, as it was at the start."""
    import torch
    from trl import DPOTrainer

    class PipelineDPOTrainer(DPOTrainer):
        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, selected_adapters=[POLICY])
            self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    return PipelineDPOTrainer


# ---------------------------------------------------------------------- the pairs a run trains on
def pairs_snapshot(config: TrainConfig, output_dir: Path, resuming: bool) -> dict:
    """{"heldout", "eval", "train": [pair, ...], "info": {...}}: kept from the run's start when resuming, else read
    from --pairs now, split with the seed and written to <output-dir>/pairs/ (atomically)."""
    folder = output_dir / "pairs"
    if resuming and (folder / "pairs.json").is_file():
        info = json.loads((folder / "pairs.json").read_text())
        log(f"pairs: reusing the {info['counts']['pairs']} pairs this run started with ({folder})")
        return {"info": info, **{split: [json.loads(line) for line in
                                         (folder / f"{split}.jsonl").read_text().splitlines() if line.strip()]
                                 for split in SPLITS}}
    found = read_pairs(config.pairs, config.dataset_split)
    for line in found.summary():
        log(line)
    heldout, evaluation, train = split_pairs(found.pairs, seed=config.seed, heldout=config.heldout_pairs,
                                             evaluation=config.eval_samples)
    info = {"sources": found.sources, "counts": found.counts(), "problems": found.problems, "seed": config.seed,
            "split": {"heldout": len(heldout), "eval": len(evaluation), "train": len(train)}}
    staging = temporary_path(folder)
    staging.mkdir(parents=True, exist_ok=True)
    for split, pairs in zip(SPLITS, (heldout, evaluation, train)):
        (staging / f"{split}.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    write_json_atomic(staging / "pairs.json", info)
    swap_in_folder(staging, folder)
    return {"info": info, "heldout": heldout, "eval": evaluation, "train": train}


def token_ids(tokenizer, pair: dict, answer: str, max_length: int) -> tuple[list[int], int]:
    """(prompt + answer token ids cut to max_length, where the answer starts) as TRL's DPOTrainer tokenizes them: the
    Llama-3 chat template (with the SFT stage's fixed date), the prompt ending in the assistant header."""
    prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, date_string=TEMPLATE_DATE)["input_ids"]
    full = tokenizer.apply_chat_template(pair["prompt"] + pair[answer], tokenize=True, return_dict=True,
                                         date_string=TEMPLATE_DATE)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    return full[:max_length], start


def prompt_fits(tokenizer, pair: dict, limit: int) -> bool:
    prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, date_string=TEMPLATE_DATE)["input_ids"]
    return len(prompt) <= limit


def answer_log_probs(model, tokenizer, pairs: list[dict], max_length: int) -> list[tuple[float, int, float, int]]:
    """Per pair: (sum of the chosen answer's token log-probabilities, its tokens, the same for rejected)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    with torch.no_grad():
        for pair in pairs:
            row = []
            for answer in ("chosen", "rejected"):
                ids, start = token_ids(tokenizer, pair, answer, max_length)
                tensor = torch.tensor([ids], device=device)
                logits = model(input_ids=tensor).logits[0, :-1].float()
                per_token = torch.log_softmax(logits, dim=-1).gather(1, tensor[0, 1:, None]).squeeze(1)
                picked = per_token[max(start - 1, 0):]
                row += [picked.sum().item(), int(picked.numel())]
            scores.append(tuple(row))
    model.train(was_training)
    return scores


def preference_report(before: list[tuple], after: list[tuple] | None, beta: float) -> dict:
    """Held-out figures before and after DPO: preference accuracy (mean per-token log-probability of chosen above
    rejected's) and the reward margin beta * ((after - before)[chosen] - (after - before)[rejected]), with the share
    of pairs whose margin is positive (DPO's reward accuracy).

    >>> report = preference_report([(-10.0, 5, -4.0, 2)], [(-8.0, 5, -5.0, 2)], beta=0.1)
    >>> report["before"]["preference_accuracy"], report["after"]["preference_accuracy"], report["after"]["reward_margin"]
    (0.0, 1.0, 0.3)
    """
    def accuracy(scores):
        return round(sum(c / max(nc, 1) > r / max(nr, 1) for c, nc, r, nr in scores) / len(scores), 4)

    if not before:
        return {"pairs": 0}
    report = {"pairs": len(before), "before": {"preference_accuracy": accuracy(before), "reward_margin": 0.0}}
    if after is not None:
        margins = [beta * ((a[0] - b[0]) - (a[2] - b[2])) for a, b in zip(after, before)]
        report["after"] = {"preference_accuracy": accuracy(after),
                           "reward_margin": round(sum(margins) / len(margins), 4),
                           "reward_accuracy": round(sum(m > 0 for m in margins) / len(margins), 4)}
    return report


# ---------------------------------------------------------------------- outputs
def plot_dpo(log_history: list[dict], path: Path) -> None:
    """loss.png for a DPO run: the DPO loss (train, eval), and the reward margin and preference accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        return [(entry["step"], entry[key]) for entry in log_history if key in entry]

    figure, (losses, rewards) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for key, label in (("loss", "train DPO loss"), ("eval_loss", "eval DPO loss")):
        if points := series(key):
            losses.plot(*zip(*points), "-" if key == "loss" else "o-", label=label, linewidth=1.2)
    for key, label in (("rewards/margins", "reward margin (train)"), ("rewards/accuracies", "reward accuracy (train)"),
                       ("eval_rewards/margins", "reward margin (eval)")):
        if points := series(key):
            rewards.plot(*zip(*points), label=label, linewidth=1.2)
    for axis, ylabel in ((losses, "DPO loss"), (rewards, "reward margin / accuracy")):
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    temporary = temporary_path(path)
    figure.savefig(temporary, format="png")
    plt.close(figure)
    os.replace(temporary, path)


def _arguments(config: TrainConfig, output_dir: Path, optimizer: str, dtype: str, has_eval: bool):
    from trl import DPOConfig

    return DPOConfig(**shared_arguments(config, output_dir, optimizer, dtype, has_eval), beta=config.beta,
                     loss_type=[config.loss_type], max_length=config.max_prompt_length + config.max_answer_length)


def run_dpo(config: TrainConfig) -> RunSummary:
    started = time.perf_counter()
    output_dir = Path(config.output_dir).expanduser()
    backend_name = select_backend(config.backend, has_cuda=cuda_available(), has_unsloth=unsloth_installed(),
                                  gpu_unusable=gpu_unusable())
    backend = BACKENDS[backend_name]
    sft_dir = sft_adapter_dir(config.sft_adapter)
    sft_sha = sha256_file(sft_dir / "adapter_model.safetensors")
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = choose_checkpoint(config, output_dir, compat_info(config, sft_sha))
    previous = previous_run(output_dir)
    if is_finished(config, output_dir, previous, resume_from):
        log(f"done: the run in {output_dir} is complete ({previous.steps} steps, --max-steps {config.max_steps}); "
            f"adapter: {previous.adapter}. Nothing was changed; raise --max-steps to train further")
        return previous
    if note := schedule_note(config, previous, resume_from):
        log(note)
    data = pairs_snapshot(config, output_dir, resuming=resume_from is not None)

    model_path = resolve_model_path(config.model_name, config.seed)
    log(f"model: loading {model_path} + the SFT adapter {sft_dir} (policy, and frozen reference) with the "
        f"{backend_name} backend")
    loaded = backend.load_dpo(config, model_path, sft_dir)
    log(f"model: {loaded.device}, {loaded.dtype}")
    max_length = config.max_prompt_length + config.max_answer_length
    kept = {split: [p for p in data[split] if prompt_fits(loaded.tokenizer, p, config.max_prompt_length)]
            for split in SPLITS}
    too_long = {split: len(data[split]) - len(kept[split]) for split in SPLITS}
    if any(too_long.values()):
        log(f"pairs: left out, prompt longer than --max-prompt-length {config.max_prompt_length}: "
            + ", ".join(f"{count} {split}" for split, count in too_long.items()))
    if not kept["train"]:
        raise UsageError([f"--max-prompt-length {config.max_prompt_length}: no training pair's prompt fits; raise it"])
    log(f"pairs: {len(kept['train'])} train / {len(kept['eval'])} eval / {len(kept['heldout'])} held out")

    import datasets
    from transformers.trainer_callback import PrinterCallback

    datasets.disable_progress_bars()
    if use_torch_log_probs_without_triton():
        log("dpo: log-probabilities in plain torch (TRL's fused Triton kernel needs a GPU)")

    def as_dataset(pairs):
        return datasets.Dataset.from_list([{**p, "chat_template_kwargs": {"date_string": TEMPLATE_DATE}}
                                           for p in pairs]) if pairs else None

    trainer = dpo_trainer_class()(
        model=loaded.model,
        args=_arguments(config, output_dir, backend.optimizer(config), loaded.dtype, bool(kept["eval"])),
        train_dataset=as_dataset(kept["train"]),
        eval_dataset=as_dataset(kept["eval"]),
        processing_class=loaded.tokenizer,
        callbacks=_callbacks(config, output_dir, compat_info(config, sft_sha)),
    )
    trainer.remove_callback(PrinterCallback)
    # The policy is still the SFT adapter here (a checkpoint is loaded inside train()): the reference's scores.
    before = answer_log_probs(trainer.model, loaded.tokenizer, kept["heldout"], max_length)
    if resume_from is not None:
        log(f"resume: continuing from {resume_from}")
    train_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - train_started
    if not trainer.is_world_process_zero():
        return RunSummary()

    after = answer_log_probs(trainer.model, loaded.tokenizer, kept["heldout"], max_length)
    heldout = preference_report(before, after, config.beta)
    adapter = save_adapter(trainer.accelerator.unwrap_model(trainer.model), loaded.tokenizer, output_dir, [POLICY])
    state = trainer.state
    history = state.log_history
    losses = [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e]
    rewards = [{"step": e["step"], "margin": e["rewards/margins"], "accuracy": e["rewards/accuracies"]}
               for e in history if "rewards/margins" in e]
    eval_losses = [{"step": e["step"], "eval_loss": e["eval_loss"], "eval_margin": e.get("eval_rewards/margins")}
                   for e in history if "eval_loss" in e]
    sft_run = sft_run_summary(sft_dir)
    summary = {
        "stage": "dpo",
        **run_facts(config, backend_name, loaded, state, resume_from),
        "sft": {"adapter": str(sft_dir), "adapter_sha256": sft_sha, "dataset": sft_run.dataset, "steps": sft_run.steps},
        "pairs": {**data["info"], "prompt_too_long": too_long,
                  "used": {split: len(kept[split]) for split in SPLITS}},
        "heldout": heldout,
        "train_loss": losses[-1]["loss"] if losses else None,
        "eval_loss": eval_losses[-1]["eval_loss"] if eval_losses else None,
        "losses": losses,
        "rewards": rewards,
        "eval_losses": eval_losses,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / max(state.global_step - (_step(resume_from)), 1), 3),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "adapter": str(adapter),
        "train_metrics": result.metrics,
    }
    summary_file = write_run_summary(output_dir, summary)
    plot_dpo(history, output_dir / "loss.png")
    if heldout.get("pairs"):
        b, a = heldout["before"], heldout["after"]
        log(f"held-out pairs ({heldout['pairs']}): preference accuracy {b['preference_accuracy']:.2f} (SFT) -> "
            f"{a['preference_accuracy']:.2f} (DPO), reward margin {a['reward_margin']:+.3f}, reward accuracy "
            f"{a['reward_accuracy']:.2f}")
    log(f"done: {state.global_step} steps, DPO loss {summary['train_loss']}, eval loss {summary['eval_loss']}")
    log(f"adapter: {adapter} (SFT and DPO in one LoRA adapter: export it like an SFT adapter)")
    log(f"run summary: {summary_file}, curves: {output_dir / 'loss.png'}")
    return RunSummary(summary)


def _step(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0)

