"""Merge a PEFT LoRA adapter into its base model, one tensor at a time, as a 16-bit Hugging Face folder.

    python -c "from export.merge import merge_lora_streaming as merge; merge('base', 'outputs/demo/adapter', 'merged')"

For every adapted weight W (the adapter's `lora_A`/`lora_B` pair for that module) the merged weight is
W + scale · (B @ A), computed in float32 and cast once to the output dtype, exactly as PEFT's
`merge_and_unload()` does it on a float32 model; every other tensor is only cast. Memory stays bounded by
the largest tensor: base tensors are read one by one and the output safetensors files are written tensor by
tensor behind a header computed up front, so neither a whole model nor a whole shard is ever in memory
(a Llama-3.2-3B-shaped bf16 model, two shards of 3.6 and 2.8 GB, merged at 1.05 GB peak RSS in 29 s on 2 CPU
cores; the 788 MB embedding matrix is the largest tensor). The safetensors reading and writing is
export/safetensors_io.py; this module is the merge.

The output is built in a hidden sibling folder (`.<name>.tmp-<pid>`); `merge_manifest.json`, listing every
file with its size, is written last and the folder is renamed into place only then, so a crash never leaves a
partial folder under the final name and `merged_is_complete()` can tell a finished merge from anything else.

Anything a plain W + scale · B·A merge would get wrong (DoRA and the other LoRA variants, modules_to_save,
LoRA on embeddings, weights the base does not have, shapes that do not fit) is refused with an ExportError
before anything is written: never a silent wrong merge.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from common.files import remove_stale_temporaries, sha256_file, swap_in_folder, temporary_path
from common.llama3 import EOT
from export.errors import ExportError
from export.safetensors_io import (INDEX_FILE, Shard, open_safetensors, read_json, read_layout, read_tensor,
                                   safetensors_header, write_index, write_tensor)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "merge_manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")

# --dtype → safetensors dtype code and bytes per value.
OUTPUT_DTYPES = {"float16": ("F16", 2), "bfloat16": ("BF16", 2)}
BASE_DTYPES = ("BF16", "F16", "F32")

# PEFT's key for a LoRA factor: base_model.model.<module>.lora_A.weight (PEFT drops the adapter name on save).
LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")

# adapter_config.json fields that, when set, make W + scale·B·A the wrong merge (PEFT 0.21's LoraConfig: the
# fields tagged `is_lora_variant`, plus the ones that train something besides the lora_A/lora_B matrices).
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA rescales each merged weight by a learned magnitude",
    "modules_to_save": "it holds whole trained copies of those modules",
    "lora_bias": "it trains a bias next to lora_B",
    "trainable_token_indices": "it trains single embedding rows",
    "target_parameters": "it adapts raw parameters, not linear layers",
    "layer_replication": "it duplicates layers of the base",
    "use_qalora": "QA-LoRA pools the layer input",
    "use_bdlora": "a LoRA variant with its own forward pass",
    "velora_config": "a LoRA variant with its own forward pass",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "monteclora_config": "a LoRA variant with its own forward pass",
    "arrow_config": "a LoRA variant with its own forward pass",
    "kasa_config": "a LoRA variant with its own forward pass",
}
# init_lora_weights values that leave the base weights untouched. The others (pissa…, corda, olora, loftq,
# lora_ga, mica) subtract their initial LoRA from the base, so the adapter only fits that modified base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def to_16bit_name(name: str) -> str:
    """The 16-bit original of an Unsloth bitsandbytes 4-bit repository name; any other name unchanged.

    >>> to_16bit_name("unsloth/Llama-3.2-1B-Instruct-bnb-4bit")
    'unsloth/Llama-3.2-1B-Instruct'
    >>> to_16bit_name("unsloth/Llama-3.2-3B-Instruct-unsloth-bnb-4bit")
    'unsloth/Llama-3.2-3B-Instruct'
    >>> to_16bit_name("meta-llama/Llama-3.2-1B-Instruct")
    'meta-llama/Llama-3.2-1B-Instruct'
    """
    for suffix in ("-unsloth-bnb-4bit", "-bnb-4bit"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unsupported_features(config: dict) -> list[str]:
    """What in a parsed adapter_config.json a plain LoRA merge cannot reproduce (empty: mergeable).

    >>> _unsupported_features({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": False})
    []
    >>> _unsupported_features({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head"]})
    ['modules_to_save: ["lm_head"] (it holds whole trained copies of those modules)']
    """
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type: {json.dumps(config.get('peft_type'))} (only LORA adapters can be merged)")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{field}: {json.dumps(value)} (must be a positive number)")
    for field, reason in UNSUPPORTED_FIELDS.items():
        if config.get(field):
            problems.append(f"{field}: {json.dumps(config[field])} ({reason})")
    if config.get("bias", "none") != "none":
        problems.append(f"bias: {json.dumps(config['bias'])} (it trains the base's biases)")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        problems.append(f"init_lora_weights: {json.dumps(config['init_lora_weights'])} (it changes the base "
                        "weights; save the adapter with PEFT's path_initial_model_for_weight_conversion)")
    return problems


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's parsed adapter_config.json, once the folder is known to hold a mergeable LoRA adapter."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ExportError(f"adapter folder {adapter_dir} does not exist; pass the adapter/ folder that "
                          "train/run.py wrote (<output-dir>/adapter)")
    config = read_json(adapter_dir / ADAPTER_CONFIG, "re-save the adapter, or pass the adapter/ folder that "
                                                     "train/run.py wrote")
    if not isinstance(config, dict):
        raise ExportError(f"{adapter_dir / ADAPTER_CONFIG} is not a JSON object; re-save the adapter")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS} is missing; pass a folder holding a complete "
                          "adapter (adapter_config.json and adapter_model.safetensors)")
    problems = _unsupported_features(config)
    if problems:
        raise ExportError(f"{adapter_dir / ADAPTER_CONFIG}: cannot merge this adapter into plain weights, "
                          f"{'; '.join(problems)}; retrain with plain LoRA (as train/run.py does) or merge "
                          "it with PEFT's merge_and_unload()")
    return config


def base_model_name(adapter_dir: Path) -> str:
    """The base the adapter was trained on (adapter_config.json), a 4-bit name mapped to its 16-bit original."""
    name = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise ExportError(f"{Path(adapter_dir) / ADAPTER_CONFIG} has no base_model_name_or_path ({name!r}); "
                          "pass the base model explicitly with --base")
    return to_16bit_name(name)


def merged_is_complete(out_dir: Path) -> bool:
    """True when out_dir holds a finished merge: its manifest lists files that are all there, at their size."""
    out_dir = Path(out_dir)
    try:
        files = json.loads((out_dir / MANIFEST).read_text())["files"]
        return bool(files) and all((out_dir / name).is_file() and (out_dir / name).stat().st_size == size
                                   for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def merge_lora_streaming(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = "float16",
                         progress: bool = True) -> Path:
    """Write base + LoRA as a `dtype` Hugging Face model folder at out_dir (replacing it when complete)."""
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if dtype not in OUTPUT_DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of: {', '.join(OUTPUT_DTYPES)}")
    adapter_config = read_adapter_config(adapter_dir)
    if not base_dir.is_dir():
        raise ExportError(f"base folder {base_dir} does not exist; pass a local Hugging Face model folder "
                          "(config.json + *.safetensors) with --base")
    if out_dir.resolve() in (base_dir.resolve(), adapter_dir.resolve()):
        raise ExportError(f"output folder {out_dir} is the base or the adapter folder; choose another one")

    # Everything that can be wrong is checked before the first byte is written.
    base_config = read_json(base_dir / "config.json", "pass a complete Hugging Face model folder with --base")
    if "quantization_config" in base_config:
        trained_on = str(adapter_config.get("base_model_name_or_path"))
        raise ExportError(f"{base_dir} is a quantized model (its config.json has a quantization_config); merging "
                          f"needs the 16-bit weights: pass the unquantized model as --base, e.g. "
                          f"{to_16bit_name(trained_on)}")
    shards = read_layout(base_dir, BASE_DTYPES)
    base_shapes = {name: shape for shard in shards for name, shape in shard.tensors}
    with open_safetensors(adapter_dir / ADAPTER_WEIGHTS) as adapter_file:
        updates = _plan_updates(adapter_config, adapter_file, base_shapes, adapter_dir, base_dir)
    tokenizer_dir = _tokenizer_source(adapter_dir, base_dir)
    # Chat replies end with <|eot_id|>, not with eos: generation must stop on it too.
    generation_config = _generation_config(base_dir, base_config, _added_token_id(tokenizer_dir, EOT))

    staging = temporary_path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent, prefix=f".{out_dir.name}.")
    staging.mkdir()
    try:
        _write_weights(staging, base_dir, adapter_dir, shards, updates, dtype, progress)
        # transformers 5 writes the weights' dtype as "dtype"; its 4.x name "torch_dtype" is dropped so the
        # two can never disagree.
        _write_json(staging / "config.json", {**{key: value for key, value in base_config.items()
                                                 if key != "torch_dtype"}, "dtype": dtype})
        _write_json(staging / "generation_config.json", generation_config)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, staging / name)
        _write_manifest(staging, base_dir, adapter_dir, dtype, len(updates))
        swap_in_folder(staging, out_dir)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"writing the merged model to {staging} failed ({error}); check free disk space "
                          f"and permissions under {out_dir.parent}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _LoraUpdate:
    a_key: str
    b_key: str
    scale: float
    fan_in_fan_out: bool


def _pattern_value(patterns: dict, module: str, default):
    """A rank_pattern/alpha_pattern lookup with PEFT's semantics (peft.utils.other.get_pattern_key): the value of
    the first pattern, in file order, that as a regex matches the module name or a suffix of it after a dot.

    >>> _pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", 8)
    4
    >>> _pattern_value({"layers.1.self_attn.v_proj": 32}, "model.layers.11.self_attn.v_proj", 8)
    8
    """
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _plan_updates(config: dict, adapter_file, base_shapes: dict[str, list[int]], adapter_dir: Path,
                  base_dir: Path) -> dict[str, _LoraUpdate]:
    """Base weight name → its LoRA update, after checking every adapter tensor has a place in the base."""
    factors: dict[str, dict[str, str]] = {}
    foreign = []
    for key in adapter_file.keys():
        match = LORA_KEY.fullmatch(key)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = key
        else:
            foreign.append(key)
    adapter_path = adapter_dir / ADAPTER_WEIGHTS
    if foreign:
        raise ExportError(f"{adapter_path} holds {len(foreign)} tensor(s) that are not lora_A/lora_B weights of a "
                          f"linear layer (first: {foreign[0]}), e.g. LoRA on embeddings or trained copies of whole "
                          "modules; a plain merge would drop them, so retrain with LoRA on the projections only")

    updates, missing, misfits = {}, [], []
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, keys in sorted(factors.items()):
        if set(keys) != {"A", "B"}:
            present = next(iter(keys))
            raise ExportError(f"{adapter_path}: {module} has lora_{present} but no lora_{'AB'.replace(present, '')}; "
                              "the adapter file is incomplete, re-save it")
        weight = f"{module}.weight"
        if weight not in base_shapes:
            missing.append(weight)
            continue
        a_shape = list(adapter_file.get_slice(keys["A"]).get_shape())
        b_shape = list(adapter_file.get_slice(keys["B"]).get_shape())
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if a_shape[0] != rank or b_shape[1] != rank:
            raise ExportError(f"{adapter_path}: {module} has lora_A {a_shape} and lora_B {b_shape} but "
                              f"{ADAPTER_CONFIG} gives rank {rank}; the two files do not belong together, re-save "
                              "the adapter")
        delta_shape = [b_shape[0], a_shape[1]]
        if fan_in_fan_out:  # the base stores this weight as (in, out), like GPT-2's Conv1D
            delta_shape.reverse()
        if base_shapes[weight] != delta_shape:
            misfits.append(f"{weight} is {base_shapes[weight]} in the base but the adapter's B@A is {delta_shape}")
            continue
        # PEFT's LoraLayer.update_layer: scaling = alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA.
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        updates[weight] = _LoraUpdate(keys["A"], keys["B"], scale, fan_in_fan_out)

    trained_on = config.get("base_model_name_or_path")
    if missing:
        raise ExportError(f"{base_dir} has no tensor {missing[0]}" + _and_more(missing) + " that the adapter "
                          f"{adapter_dir} adapts (it was trained on {trained_on}); pass the right --base")
    if misfits:
        raise ExportError(f"adapter {adapter_dir} does not fit base {base_dir}: {misfits[0]}" + _and_more(misfits)
                          + f"; it was trained on {trained_on}, pass the right --base")
    return updates


def _and_more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _tokenizer_source(adapter_dir: Path, base_dir: Path) -> Path:
    """Training saves the tokenizer (and its chat template) next to the adapter; older adapters rely on the base."""
    for folder in (adapter_dir, base_dir):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    raise ExportError(f"no tokenizer in {adapter_dir} or {base_dir} (tokenizer_config.json); copy the tokenizer "
                      "files of the training run into the adapter folder")


def _added_token_id(tokenizer_dir: Path, token: str) -> int | None:
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    added = read_json(tokenizer_dir / "tokenizer.json", "re-save the tokenizer").get("added_tokens", [])
    return next((entry["id"] for entry in added if entry.get("content") == token), None)


def _with_end_of_turn(generation_config: dict, end_of_turn_id: int | None) -> dict:
    """generation_config with end_of_turn_id among its eos ids, so generation stops at the end of a reply.

    >>> _with_end_of_turn({"eos_token_id": 128001}, 128009)
    {'eos_token_id': [128001, 128009]}
    >>> _with_end_of_turn({"eos_token_id": [128001, 128009]}, 128009)
    {'eos_token_id': [128001, 128009]}
    """
    eos = generation_config.get("eos_token_id")
    eos_ids = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if end_of_turn_id is not None and end_of_turn_id not in eos_ids:
        eos_ids.append(end_of_turn_id)
    return {**generation_config, "eos_token_id": eos_ids} if eos_ids else dict(generation_config)


def _generation_config(base_dir: Path, base_config: dict, end_of_turn_id: int | None) -> dict:
    if (base_dir / "generation_config.json").is_file():
        generation = read_json(base_dir / "generation_config.json", "re-download the base model")
    else:  # what transformers derives from config.json when a model has no generation_config.json
        generation = {key: base_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if base_config.get(key) is not None}
    return _with_end_of_turn(generation, end_of_turn_id)


# ---------------------------------------------------------------------------------------------- writing


def _write_weights(staging: Path, base_dir: Path, adapter_dir: Path, shards: list[Shard],
                   updates: dict[str, _LoraUpdate], dtype: str, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm

    dtype_code, value_bytes = OUTPUT_DTYPES[dtype]
    torch_dtype = getattr(torch, dtype)
    weight_map = {}
    total = sum(len(shard.tensors) for shard in shards)
    with open_safetensors(adapter_dir / ADAPTER_WEIGHTS) as adapter_file, \
            tqdm(total=total, desc="merge", unit="tensor", disable=not progress, file=sys.stdout) as bar:
        for shard in shards:
            path = staging / shard.file_name
            with open_safetensors(base_dir / shard.file_name) as base_file, path.open("wb") as out:
                out.write(safetensors_header(shard.tensors, dtype_code, value_bytes))
                for name, _ in shard.tensors:
                    tensor = read_tensor(base_file, name, base_dir / shard.file_name)
                    if name in updates:
                        tensor = _merge(tensor, updates[name], adapter_file)
                    write_tensor(out, tensor, torch_dtype)
                    del tensor  # before the next one is read: at most one base tensor alive
                    bar.update()
                _durable(out)
            weight_map.update((name, shard.file_name) for name, _ in shard.tensors)
    if (base_dir / INDEX_FILE).is_file():
        total_size = sum(math.prod(shape) * value_bytes for shard in shards for _, shape in shard.tensors)
        write_index(staging, weight_map, total_size)


def _merge(weight, update: _LoraUpdate, adapter_file):
    """W + scale·(B @ A) in float32, in the order of operations PEFT's merge uses (so the results are identical)."""
    import torch

    delta = adapter_file.get_tensor(update.b_key).float() @ adapter_file.get_tensor(update.a_key).float()
    if update.fan_in_fan_out:
        delta = delta.T
    delta *= update.scale
    merged = weight.to(torch.float32)
    merged += delta
    return merged


def _durable(handle) -> None:
    # Google Drive and other network mounts may hold written data back; have it on disk before the rename.
    handle.flush()
    os.fsync(handle.fileno())


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_manifest(staging: Path, base_dir: Path, adapter_dir: Path, dtype: str, adapted: int) -> None:
    """Written last: its presence, and every file at its listed size, is what makes the folder complete."""
    adapter_sha256 = sha256_file(adapter_dir / ADAPTER_WEIGHTS)
    files = {path.name: path.stat().st_size for path in sorted(staging.iterdir()) if path.is_file()}
    manifest = {"base": str(base_dir.resolve()), "adapter": str(adapter_dir.resolve()),
                "adapter_sha256": adapter_sha256, "dtype": dtype, "adapted_tensors": adapted, "files": files}
    with (staging / MANIFEST).open("w") as handle:
        handle.write(json.dumps(manifest, indent=2) + "\n")
        _durable(handle)
