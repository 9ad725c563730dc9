"""The models the benchmarks measure: Llama-3.2-1B- and 3B-shaped, with random bf16 weights written tensor by tensor
into safetensors files (the full model never exists in memory), Meta's real tokenizer, and a random rank-16 LoRA
adapter on every projection, which is what the 1b/3b presets train.

    from bench.shapes import build_adapter, build_base
    base = build_base("1b", work)                  # work/llama-3.2-1b-shaped-random, built once
    adapter = build_adapter("1b", base, work)      # work/llama-3.2-1b-shaped-random-lora

Random weights cost the same to store, move and multiply as trained ones, so the speeds, memory and file sizes
are those of the real models; only the words are meaningless.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from bench import log
from export.safetensors_io import SINGLE_FILE, safetensors_header, write_index, write_tensor

# Llama-3.2-{1B,3B}-Instruct's config.json values that differ from the tiny model's (train/tiny.py), which
# otherwise copies them: vocabulary, rope scaling, tied embeddings, grouped-query attention.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128),
}
PUBLISHED_PARAMETERS = {"1b": 1_235_814_400, "3b": 3_212_749_824}  # the Hub repos' safetensors totals
LORA_RANK, LORA_TARGETS = 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 5 * 10**9  # the Hub checkpoints' shard limit: 1B is one file, 3B two


def shaped_config(size: str) -> dict:
    from train.tiny import TINY_CONFIG

    return {**TINY_CONFIG, **SHAPES[size]}


def tensor_layout(config: dict) -> list[tuple[str, list[int]]]:
    """Names and shapes of the checkpoint's tensors, from a model built on the meta device (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    tied = config.get("tie_word_embeddings")
    return [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")]


def shard(layout: list[tuple[str, list[int]]], value_bytes: int, limit: int = SHARD_BYTES) -> list[list]:
    """Consecutive tensors grouped into files of at most `limit` bytes (one tensor per file if larger).

    >>> [len(s) for s in shard([("a", [4]), ("b", [4]), ("c", [4])], 2, limit=16)]
    [2, 1]
    """
    shards, size = [[]], 0
    for name, shape in layout:
        nbytes = math.prod(shape) * value_bytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """The Hub's names for a checkpoint in `count` files.

    >>> shard_file_names(1), shard_file_names(2)
    (['model.safetensors'], ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'])
    """
    return [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_random(out, name: str, shape: list[int], generator) -> None:
    """One tensor of N(0, 0.02) values (norm weights: ones) in bf16, generated and written in row blocks."""
    import torch

    if name.endswith("norm.weight"):
        write_tensor(out, torch.ones(shape), torch.bfloat16)
        return
    rows_per_block = max(1, (1 << 24) // shape[-1])
    for start in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - start)
        block = torch.randn((rows, *shape[1:]), generator=generator).mul_(0.02)
        write_tensor(out, block, torch.bfloat16)


def write_random_model(config: dict, target: Path, seed: int = 0) -> Path:
    """A Hugging Face Llama folder for `config` with random bf16 weights, written tensor by tensor (atomically)."""
    import torch

    from train.tiny import build_tokenizer

    layout = tensor_layout(config)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shards = shard(layout, 2)
    names = shard_file_names(len(shards))
    for file_name, tensors in zip(names, shards):
        with (staging / file_name).open("wb") as out:
            out.write(safetensors_header(tensors, "BF16", 2))
            for name, shape in tensors:
                _write_random(out, name, shape, generator)
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, tensors in zip(names, shards) for name, _ in tensors}
        write_index(staging, weight_map, total_size=sum(math.prod(shape) for _, shape in layout) * 2)
    (staging / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config, "dtype": "bfloat16"}, indent=2))
    (staging / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": True,
         "temperature": 0.6, "top_p": 0.9}, indent=2))
    build_tokenizer().save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def write_random_adapter(config: dict, base: Path, target: Path, seed: int = 1) -> Path:
    """A random rank-16 LoRA adapter on every projection of every layer (the 1b/3b presets' targets), in PEFT's
    file layout, its adapter_config.json written by PEFT itself. Both factors are non-zero, so merging really
    changes every adapted weight."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_layout(config):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LORA_TARGETS:
            out_features, in_features = shape
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, in_features, generator=generator) / 50
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, LORA_RANK, generator=generator) / 50
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path=str(base), r=LORA_RANK, lora_alpha=LORA_RANK,
               lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none", fan_in_fan_out=False,
               use_rslora=False, init_lora_weights=True).save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def build_base(size: str, work: Path) -> Path:
    """The Llama-3.2-`size`-shaped model with random weights, built once into `work`."""
    target = work / f"llama-3.2-{size}-shaped-random"
    if (target / "config.json").exists():
        return target
    config = shaped_config(size)
    parameters = sum(math.prod(shape) for _, shape in tensor_layout(config))
    if parameters != PUBLISHED_PARAMETERS[size]:
        raise SystemExit(f"bench: the {size} shape has {parameters:,} parameters, not the published "
                         f"{PUBLISHED_PARAMETERS[size]:,}: fix SHAPES")
    log(f"building a {size}-shaped model with random weights ({parameters / 1e9:.2f}B parameters) in {target}")
    return write_random_model(config, target)


def build_adapter(size: str, base: Path, work: Path) -> Path:
    """The random LoRA adapter of the `size`-shaped model, built once into `work`."""
    target = work / f"llama-3.2-{size}-shaped-random-lora"
    if (target / "adapter_config.json").exists():
        return target
    return write_random_adapter(shaped_config(size), base, target)
