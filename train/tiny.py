"""A tiny, offline Llama-3.2-architecture model with the real Llama-3 tokenizer.

Tests and the offline demo cannot reach the Hugging Face Hub, so they train this model instead of
Llama-3.2-1B. Everything that matters for the pipeline is real: LlamaForCausalLM with tied embeddings,
llama3 rope scaling and grouped-query attention, the 128256-token vocabulary, Meta's tokenizer (rebuilt
from the tiktoken file that the `llama-models` package ships) and the Llama-3.2-Instruct chat template.
Only the size (hidden 256, 4 layers) and the weights (random, seeded) differ.

    python -m train.tiny            # builds it (once) and prints its path

The model is built on first use into a cache directory ($FINETOME_CACHE, default ~/.cache/finetome-pipeline)
under a name that changes whenever the recipe below changes, and written atomically (a temporary folder
renamed when complete), so a killed build never leaves a half-built model behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from common.llama3 import (
    BOS,
    BOS_ID,
    END_OF_MESSAGE_ID,
    END_OF_TEXT_ID,
    EOT,
    EOT_ID,
    PAD,
    PAD_ID,
    TEMPLATE_PATH,
    cache_root,
)

BUILTIN_PREFIX = "builtin:"  # --model-name values that name a model built here rather than a Hub id or a folder
TINY_MODEL_NAME = BUILTIN_PREFIX + "tiny-llama-3.2"  # the only one (train/config.py refuses any other)


def is_builtin(model_name: object) -> bool:
    """Whether a --model-name (or a run.json's) names a built-in model rather than a Hub id or a folder.

    >>> is_builtin(TINY_MODEL_NAME), is_builtin("unsloth/Llama-3.2-1B-Instruct"), is_builtin(None)
    (True, False, False)
    """
    return isinstance(model_name, str) and model_name.startswith(BUILTIN_PREFIX)

# Llama-3.2-1B-Instruct's config.json, shrunk. hidden_size and intermediate_size are multiples of 256 so
# that llama.cpp's k-quants (256-value super-blocks) really apply to every matrix at export.
TINY_CONFIG = dict(
    vocab_size=128256,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, 2 query heads per key/value head
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=True,
    bos_token_id=BOS_ID,
    eos_token_id=[END_OF_TEXT_ID, END_OF_MESSAGE_ID, EOT_ID],
    pad_token_id=PAD_ID,
    initializer_range=0.02,
)
_RECIPE_VERSION = 2  # bump when the build below changes in a way the config does not show


def tiny_model_dir(seed: int = 3407) -> Path:
    recipe = json.dumps([TINY_CONFIG, seed, _RECIPE_VERSION, TEMPLATE_PATH.read_text()], sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return cache_root() / f"tiny-llama-3.2-seed{seed}-{digest}"


def meta_tokenizer():
    """Meta's own tiktoken tokenizer from the llama-models package (the reference for ids)."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def build_tokenizer():
    """A Hugging Face fast tokenizer that behaves like Meta's Llama-3.2-Instruct tokenizer.json.

    Same ids as tiktoken on any text; the 256 special tokens; `<|begin_of_text|>` added by a
    TemplateProcessing post-processor (llama.cpp's converter hashes ids encoded *with* BOS to recognise
    the Llama-3 pre-tokenizer: without it the GGUF is labelled `smaug-bpe`); eos `<|eot_id|>`,
    pad `<|finetune_right_pad_id|>`; the Llama-3.1/3.2 chat template.
    """
    from llama_models.llama3 import tokenizer as meta_module
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = meta_tokenizer()
    special_tokens = sorted(meta.special_tokens, key=meta.special_tokens.get)
    backend = TikTokenConverter(
        vocab_file=str(Path(meta_module.__file__).parent / "tokenizer.model"),
        pattern=meta.pat_str,
        extra_special_tokens=special_tokens,
    ).converted()
    bos_id = meta.special_tokens[BOS]
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,  # transformers 5 ignores True for BPE and warns
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = TEMPLATE_PATH.read_text()
    return tokenizer


def build_tiny_model(seed: int = 3407):
    """The randomly initialised model itself (in memory), deterministic for a given seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY_CONFIG)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = TINY_CONFIG["eos_token_id"]
    model.generation_config.pad_token_id = TINY_CONFIG["pad_token_id"]
    model.generation_config.bos_token_id = TINY_CONFIG["bos_token_id"]
    return model


def ensure_tiny_model(seed: int = 3407) -> Path:
    """Build the tiny model and tokenizer into the cache (once) and return the folder."""
    import torch

    target = tiny_model_dir(seed)
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = build_tiny_model(seed)
        # Stored in bf16 like the real Llama-3.2 checkpoints, so export reads the same kind of file.
        model.to(torch.bfloat16).save_pretrained(staging)
        build_tokenizer().save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_tiny_model())
