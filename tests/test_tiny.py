"""The offline tiny model: Llama-3.2 architecture, and a tokenizer that is Meta's, id for id."""

import json

import pytest

from train.tiny import meta_tokenizer

CORPUS = [
    "Hello, world! This is a plain English sentence.",
    "Accents: café, naïve, résumé, Ångström, São Paulo, Dvořák, Ærøskøbing.",
    "中文：机器学习是人工智能的一个分支。日本語：今日はいい天気ですね。한국어 문장입니다.",
    "Emoji 🎉🚀🦙 and a family 👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;  -- sql",
    "Whitespace runs:     five spaces,\t\ttabs,\n\n\nthree newlines,   \n trailing   ",
    "Digits 1234567890 3.14159 1e-10 0x1F 2026-11-21 $1,299.99 100%",
    "Mixed CASE words, APIs like HTTPServer, and contractions: don't, I'll, we've, she'd.",
    "Русский текст, ελληνικά, עברית, العربية, हिन्दी.",
    "",
    " ",
]


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_tiktoken_on_varied_text(tokenizer, text):
    meta = meta_tokenizer()
    assert tokenizer(text)["input_ids"] == meta.encode(text, bos=True, eos=False)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == meta.encode(text, bos=False, eos=False)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_special_tokens_match_meta(tokenizer):
    meta = meta_tokenizer()
    assert len(tokenizer) == 128256
    for token, token_id in meta.special_tokens.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|eot_id|>", 128009)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|finetune_right_pad_id|>", 128004)
    # Special tokens written in text are parsed as such, as Meta's Hugging Face tokenizer does.
    assert tokenizer("<|start_header_id|>user<|end_header_id|>", add_special_tokens=False)["input_ids"] == [
        128006, 882, 128007]


def test_bos_comes_from_a_template_processing_post_processor(tiny_model_dir):
    data = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    processors = data["post_processor"]["processors"]
    template = next(p for p in processors if p["type"] == "TemplateProcessing")
    assert template["single"][0] == {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    assert template["special_tokens"]["<|begin_of_text|>"]["ids"] == [128000]


def test_chat_template_is_llama_3_1(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True, date_string="26 Jul 2024")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_model_is_llama_3_2_shaped(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 32.0
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0  # k-quants apply
    assert 2 <= config["num_hidden_layers"] <= 4 and config["vocab_size"] == 128256
    assert config["dtype"] == "bfloat16"
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert 128009 in generation["eos_token_id"]


def test_build_is_deterministic_and_cached(tiny_model_dir, cache_dir):
    import torch

    from train.tiny import build_tiny_model, ensure_tiny_model

    assert ensure_tiny_model() == tiny_model_dir  # second call: the cached folder, no rebuild
    a, b = build_tiny_model(seed=3407), build_tiny_model(seed=3407)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_tiny_model(seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.model.embed_tokens.weight.data_ptr() == a.lm_head.weight.data_ptr()  # tied
    assert not list(cache_dir.glob(".tiny-*"))  # no staging folder left behind
