"""The streaming LoRA merge (export/merge.py) against PEFT's own merge_and_unload(), on small in-process models."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors import safe_open

from export.errors import ExportError
from export.merge import (MANIFEST, base_model_name, merge_lora_streaming, merged_is_complete, read_adapter_config,
                          to_16bit_name)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# PEFT computes W + (B @ A) * scale in float32 with the same operations, in the same order, as the streaming
# merge, and both cast the result once: the weights come out bit-identical here. The test still allows one unit
# in the last place of the output dtype (rtol = eps, 2**-10 for float16, 2**-7 for bfloat16; atol for values
# near zero), because a float32 matmul may round its last bit differently under another BLAS kernel or thread
# count, and one float32 bit can flip the final rounding. Real mistakes (a wrong scale, a missed transpose or
# module) are far larger: the random LoRA factors move every adapted weight by more than 1e-2, which is over
# 40 ulps even in bfloat16 at the largest weights here, and the test checks that they do.
def tolerance(dtype):
    return dict(rtol=torch.finfo(dtype).eps, atol=1e-6)


def copy_tokenizer(source, target):
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, target / name)


def save_small_base(folder, seed=0, max_shard_size=None, **overrides):
    """A small random Llama in bf16, like the real checkpoints; no tokenizer (the adapter brings it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, **overrides}))
    options = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(torch.bfloat16).save_pretrained(folder, **options)
    return folder


def save_adapter(base_dir, folder, tokenizer_dir=None, seed=0, **lora_options):
    """A PEFT LoRA adapter of base_dir with random (seeded) factors, saved like training saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": PROJECTIONS,
                                                     **lora_options}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts lora_B at zero, which would make the merge a no-op
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(folder)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, folder)
    return folder


def peft_merged(base_dir, adapter_dir):
    """The reference: PEFT's merge_and_unload() on the base loaded in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {name: tensor.detach() for name, tensor in merged.state_dict().items()}


def read_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            tensors.update((name, handle.get_tensor(name)) for name in handle.keys())
    return tensors


def assert_equals_peft(out_dir, base_dir, adapter_dir, dtype=torch.float16):
    merged, base, expected = read_tensors(out_dir), read_tensors(base_dir), peft_merged(base_dir, adapter_dir)
    assert merged.keys() == base.keys()  # same tensors: none added (a tied lm_head stays tied), none dropped
    for name, tensor in merged.items():
        assert tensor.dtype == dtype, name
        torch.testing.assert_close(tensor, expected[name].to(dtype), **tolerance(dtype), msg=name)
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as handle:
        adapted = [key.removeprefix("base_model.model.").replace(".lora_A.", ".") for key in handle.keys()
                   if ".lora_A." in key]
    assert adapted
    for name in adapted:
        assert (merged[name].float() - base[name].float()).abs().max() > 1e-2, name


def leftovers(out_dir):
    """Anything a merge into out_dir could leave behind: the folder itself or hidden temporary siblings."""
    return sorted(p.name for p in out_dir.parent.iterdir() if p.name == out_dir.name or p.name.startswith("."))


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model_dir):
    return tiny_model_dir  # the real Llama-3 tokenizer and chat template


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    return save_small_base(tmp_path_factory.mktemp("small") / "base")


@pytest.fixture(scope="module")
def small_adapter(small_base, tokenizer_dir, tmp_path_factory):
    return save_adapter(small_base, tmp_path_factory.mktemp("small") / "adapter", tokenizer_dir)


@pytest.mark.parametrize("lora_options", [
    {},
    {"use_rslora": True},  # scale alpha / sqrt(r) instead of alpha / r
    {"rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2},  # PEFT matches patterns against dotted suffixes
     "alpha_pattern": {"v_proj": 32, "model.layers.0.self_attn.o_proj": 5}},
], ids=["plain", "rslora", "rank-and-alpha-patterns"])
def test_merge_equals_peft_merge_and_unload(small_base, tokenizer_dir, tmp_path, lora_options):
    adapter = save_adapter(small_base, tmp_path / "adapter", tokenizer_dir, **lora_options)
    out_dir = merge_lora_streaming(small_base, adapter, tmp_path / "merged", progress=False)
    assert_equals_peft(out_dir, small_base, adapter)
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "float16"
    assert merged_is_complete(out_dir)
    assert leftovers(out_dir) == ["merged"]


def test_fan_in_fan_out_weights_equal_peft(tokenizer_dir, tmp_path):
    """GPT-2 stores its linear layers as Conv1D, (in, out): PEFT's fan_in_fan_out transposes the update."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)).to(
        torch.bfloat16).save_pretrained(tmp_path / "base")
    # attn.c_proj is square (64, 64): there only the values can show a missed transpose
    adapter = save_adapter(tmp_path / "base", tmp_path / "adapter", tokenizer_dir,
                           target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    out_dir = merge_lora_streaming(tmp_path / "base", adapter, tmp_path / "merged", progress=False)
    assert_equals_peft(out_dir, tmp_path / "base", adapter)


def test_sharded_base_gives_sharded_output_that_transformers_loads(tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_small_base(tmp_path / "base", max_shard_size="100KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    adapter = save_adapter(base, tmp_path / "adapter", tokenizer_dir)
    out_dir = merge_lora_streaming(base, adapter, tmp_path / "merged", progress=False)

    assert sorted(p.name for p in out_dir.glob("*.safetensors")) == shards
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors = read_tensors(out_dir)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert_equals_peft(out_dir, base, adapter)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.dtype == torch.float16
    torch.testing.assert_close(model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                               tensors["model.layers.1.mlp.down_proj.weight"], rtol=0, atol=0)


def test_bfloat16_output_on_request(small_base, small_adapter, tmp_path):
    out_dir = merge_lora_streaming(small_base, small_adapter, tmp_path / "merged", dtype="bfloat16", progress=False)
    assert_equals_peft(out_dir, small_base, small_adapter, dtype=torch.bfloat16)
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_unknown_dtype_is_refused(small_base, small_adapter, tmp_path):
    with pytest.raises(ExportError, match="unknown dtype 'fp16'; choose one of: float16, bfloat16"):
        merge_lora_streaming(small_base, small_adapter, tmp_path / "merged", dtype="fp16", progress=False)


def add_to_adapter(adapter, tensors):
    """Add tensors to a saved adapter file, as another PEFT configuration would have saved them."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    save_file({**load_file(path), **tensors}, path, metadata={"format": "pt"})
    return adapter


def dora_adapter(base, folder, tokenizer_dir):
    return save_adapter(base, folder, tokenizer_dir, use_dora=True)


def modules_to_save_adapter(base, folder, tokenizer_dir):
    return save_adapter(base, folder, tokenizer_dir, modules_to_save=["lm_head"])


def adapter_of_a_wider_model(base, folder, tokenizer_dir):
    return save_adapter(save_small_base(folder.parent / "wide", hidden_size=128), folder, tokenizer_dir)


def embedding_lora_adapter(base, folder, tokenizer_dir):
    return add_to_adapter(save_adapter(base, folder, tokenizer_dir), {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 512)})


def adapter_for_a_deeper_model(base, folder, tokenizer_dir):
    return add_to_adapter(save_adapter(base, folder, tokenizer_dir), {
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8)})


@pytest.mark.parametrize("make_adapter,message", [
    (dora_adapter, r"cannot merge this adapter into plain weights, use_dora: true \(DoRA rescales .*\); "
                   r"retrain with plain LoRA"),
    (modules_to_save_adapter, r'modules_to_save: \["lm_head"\] \(it holds whole trained copies of those modules\)'),
    (adapter_of_a_wider_model,
     r"does not fit base .*: model\.layers\.0\.mlp\.down_proj\.weight is \[64, 128\] in the base but the "
     r"adapter's B@A is \[128, 128\] \(and 13 more\); it was trained on .*wide, pass the right --base"),
    (embedding_lora_adapter, r"1 tensor\(s\) that are not lora_A/lora_B weights of a linear layer \(first: "
                             r"base_model\.model\.model\.embed_tokens\.lora_embedding_A\), e\.g\. LoRA on embeddings"),
    (adapter_for_a_deeper_model, r"has no tensor model\.layers\.7\.self_attn\.q_proj\.weight that the adapter .* "
                                 r"adapts \(it was trained on .*base\); pass the right --base"),
], ids=["dora", "modules-to-save", "shape-mismatch", "lora-on-embeddings", "weight-not-in-base"])
def test_never_a_silent_wrong_merge(small_base, tokenizer_dir, tmp_path, make_adapter, message):
    adapter = make_adapter(small_base, tmp_path / "adapter", tokenizer_dir)
    out_dir = tmp_path / "out" / "merged"
    with pytest.raises(ExportError, match=message) as raised:
        merge_lora_streaming(small_base, adapter, out_dir, progress=False)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_truncated_base_file_is_named(small_base, small_adapter, tmp_path):
    base = shutil.copytree(small_base, tmp_path / "base")
    weights = base / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    out_dir = tmp_path / "merged"
    with pytest.raises(ExportError, match=rf"cannot read {weights}: .*\(truncated or corrupt\?\); re-download") \
            as raised:
        merge_lora_streaming(base, small_adapter, out_dir, progress=False)
    assert "\n" not in str(raised.value)
    assert leftovers(out_dir) == []


def test_quantized_base_is_refused_with_its_16bit_name(small_base, small_adapter, tmp_path):
    base = shutil.copytree(small_base, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    adapter = shutil.copytree(small_adapter, tmp_path / "adapter")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ExportError, match=r"is a quantized model .*; merging needs the 16-bit weights: pass the "
                                          r"unquantized model as --base, e\.g\. unsloth/Llama-3\.2-1B-Instruct$"):
        merge_lora_streaming(base, adapter, tmp_path / "merged", progress=False)


@pytest.mark.parametrize("damage,message", [
    (lambda adapter: shutil.rmtree(adapter), r"adapter folder .*adapter does not exist; pass the adapter/ folder"),
    (lambda adapter: (adapter / "adapter_model.safetensors").unlink(),
     r"adapter_model\.safetensors is missing; pass a folder holding a complete adapter"),
    (lambda adapter: (adapter / "adapter_config.json").write_text("{"),
     r"adapter_config\.json is unreadable \(.*\); re-save the adapter"),
    (lambda adapter: (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00"),
     r"cannot read .*adapter_model\.safetensors: .*\(truncated or corrupt\?\)"),
], ids=["no-folder", "no-weights", "bad-config", "corrupt-weights"])
def test_broken_adapter_is_named(small_base, small_adapter, tmp_path, damage, message):
    adapter = shutil.copytree(small_adapter, tmp_path / "adapter")
    damage(adapter)
    out_dir = tmp_path / "merged"
    with pytest.raises(ExportError, match=message) as raised:
        merge_lora_streaming(small_base, adapter, out_dir, progress=False)
    assert "\n" not in str(raised.value)
    assert leftovers(out_dir) == []


@pytest.mark.parametrize("name,expected", [
    ("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "unsloth/Llama-3.2-1B-Instruct"),
    ("unsloth/Llama-3.2-3B-Instruct-bnb-4bit", "unsloth/Llama-3.2-3B-Instruct"),
    ("unsloth/Llama-3.2-1B-Instruct-unsloth-bnb-4bit", "unsloth/Llama-3.2-1B-Instruct"),
    ("unsloth/Llama-3.2-3B-Instruct-unsloth-bnb-4bit", "unsloth/Llama-3.2-3B-Instruct"),
    ("unsloth/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-1B-Instruct"),
    ("meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-3B-Instruct"),
    ("someone/bnb-4bit-notes", "someone/bnb-4bit-notes"),  # only a suffix counts
    ("/content/models/llama-bnb-4bit-merged", "/content/models/llama-bnb-4bit-merged"),
])
def test_to_16bit_name(name, expected):
    assert to_16bit_name(name) == expected


def test_base_model_name_reads_the_adapter_config(small_adapter, tmp_path):
    adapter = shutil.copytree(small_adapter, tmp_path / "adapter")
    config = read_adapter_config(adapter)
    assert base_model_name(adapter) == config["base_model_name_or_path"]
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": "unsloth/Llama-3.2-3B-Instruct-unsloth-bnb-4bit"}))
    assert base_model_name(adapter) == "unsloth/Llama-3.2-3B-Instruct"


def test_real_tiny_model_merges_into_a_loadable_chat_model(tiny_model_dir, tmp_path):
    """Tied embeddings, the real tokenizer and chat template, and a base generation_config without <|eot_id|>
    (like Meta's Llama-3.2 base models, whose eos is <|end_of_text|> only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    generation = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 128001}))
    adapter = save_adapter(base, tmp_path / "adapter", tiny_model_dir)
    template = (adapter / "chat_template.jinja").read_text() + "{# fine-tuned #}"
    (adapter / "chat_template.jinja").write_text(template)  # the adapter's copy wins over the base's

    out_dir = merge_lora_streaming(base, adapter, tmp_path / "merged", progress=False)
    assert_equals_peft(out_dir, base, adapter)
    assert "lm_head.weight" not in read_tensors(out_dir)
    assert json.loads((out_dir / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert model.dtype == torch.float16 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 128009 in model.generation_config.eos_token_id
    assert tokenizer.chat_template == template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    output = model.float().generate(**prompt, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 3


def test_manifest_tells_a_finished_merge_from_a_damaged_one(small_base, small_adapter, tmp_path):
    out_dir = merge_lora_streaming(small_base, small_adapter, tmp_path / "merged", progress=False)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in out_dir.iterdir()} - {MANIFEST}
    assert manifest["adapted_tensors"] == 14 and manifest["dtype"] == "float16"
    assert merged_is_complete(out_dir)
    weights = out_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 2)
    assert not merged_is_complete(out_dir)
    (out_dir / MANIFEST).unlink()
    assert not merged_is_complete(out_dir)
    assert not merged_is_complete(tmp_path / "nowhere")


def test_existing_output_is_replaced_only_by_a_complete_merge(small_base, small_adapter, tmp_path, monkeypatch):
    out_dir = merge_lora_streaming(small_base, small_adapter, tmp_path / "merged", progress=False)
    before = (out_dir / MANIFEST).read_text()

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", disk_full)
        with pytest.raises(ExportError, match=r"writing the merged model to .*\.merged\.tmp-\d+ failed \(\[Errno 28\] "
                                              r"No space left on device\); check free disk space"):
            merge_lora_streaming(small_base, small_adapter, out_dir, dtype="bfloat16", progress=False)
    assert (out_dir / MANIFEST).read_text() == before and merged_is_complete(out_dir)
    assert leftovers(out_dir) == ["merged"]

    merge_lora_streaming(small_base, small_adapter, out_dir, dtype="bfloat16", progress=False)
    assert json.loads((out_dir / MANIFEST).read_text())["dtype"] == "bfloat16"
    assert leftovers(out_dir) == ["merged"]


def test_leftovers_of_killed_merges_are_removed(small_base, small_adapter, tmp_path):
    dead, alive = subprocess.Popen(["true"]), os.getppid()
    dead.wait()
    for name in (f".merged.tmp-{dead.pid}", f".merged.old-{dead.pid}", f".merged.tmp-{alive}"):
        (tmp_path / name).mkdir()
    merge_lora_streaming(small_base, small_adapter, tmp_path / "merged", progress=False)
    assert leftovers(tmp_path / "merged") == [f".merged.tmp-{alive}", "merged"]  # another merge may be running
