"""The benchmarks (bench/, run as scripts/bench.py): the shaped models it measures are what it says, its two merge
paths produce the same model, and its report states the figures and verdicts that its raw results imply. (The speeds
themselves are measured by running the script, never asserted here; the package's doctests run with the suite.)"""

import math
import subprocess
import sys

import pytest

from bench import harness, shapes, summary
from bench.report import render_chart, render_report
from conftest import REPO


@pytest.mark.parametrize("size", ["1b", "3b"])
def test_shapes_have_the_published_parameter_counts(size):
    layout = shapes.tensor_layout(shapes.shaped_config(size))  # meta device: no memory
    assert sum(math.prod(shape) for _, shape in layout) == shapes.PUBLISHED_PARAMETERS[size]
    assert "lm_head.weight" not in dict(layout)  # tied embeddings, as in the Hub checkpoints
    files = shapes.shard(layout, 2)
    assert len(files) == (1 if size == "1b" else 2)  # the Hub repos: one file for 1B, two for 3B


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """The tiny model's shape written the way the benchmarks write 1B/3B: tensor by tensor, plus a random LoRA."""
    from train.tiny import TINY_CONFIG

    folder = tmp_path_factory.mktemp("bench")
    config = {**TINY_CONFIG, "num_hidden_layers": 2}
    base = shapes.write_random_model(config, folder / "base")
    return config, base, shapes.write_random_adapter(config, base, folder / "adapter")


def test_random_model_loads_in_transformers(random_model):
    import torch
    from transformers import AutoModelForCausalLM

    config, base, _ = random_model
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    weights = model.model.layers[0].mlp.up_proj.weight
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)  # N(0, 0.02) as the builder says
    assert torch.equal(model.model.norm.weight, torch.ones(config["hidden_size"]))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_streaming_and_naive_merge_write_the_same_model(random_model, tmp_path):
    """Both export paths that the benchmarks compare, each through its measuring worker (a separate process)."""
    from safetensors import safe_open

    _, base, adapter = random_model
    ours = harness.measured("merge", base=str(base), adapter=str(adapter), out=str(tmp_path / "ours"))
    naive = harness.measured("naive_merge", base=str(base), adapter=str(adapter), out=str(tmp_path / "naive"))
    for figures in (ours, naive):
        assert figures["wall_s"] > 0 and figures["peak_rss"] >= figures["peak_anon"] > 0
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "naive" / "model.safetensors"), "pt") as b, \
            safe_open(str(base / "model.safetensors"), "pt") as original:
        assert set(a.keys()) == set(b.keys()) == set(original.keys())
        changed = 0
        for name in a.keys():
            ours_tensor, naive_tensor = a.get_tensor(name).float(), b.get_tensor(name).float()
            # PEFT merges in the weights' fp16, we in fp32 then round: at most one fp16 step apart.
            assert (ours_tensor - naive_tensor).abs().max().item() <= 2 ** -10 * max(1.0, ours_tensor.abs().max().item())
            # (bf16 → fp16 alone moves only values below fp16's normal range, by less than 1e-7)
            changed += (ours_tensor - original.get_tensor(name).float()).abs().max().item() > 1e-4
    assert changed == 2 * len(shapes.LORA_TARGETS)  # every adapted projection of both layers, nothing else


def fake_results() -> dict:
    run = lambda rate, ttft=0.5: {"tokens_per_s": rate, "ttft_s": ttft, "tokens": 128}  # noqa: E731
    space_run = lambda rate, server, updates: {"tokens_per_s": rate, "ttft_s": 0.4, "server_tokens_per_s": server,  # noqa: E731
                                              "updates": updates, "tokens": 128}
    step = lambda wall, rss: {"wall_s": wall, "peak_rss": rss, "peak_anon": rss / 2}  # noqa: E731
    turns = [{"ttft_s": t} for t in (0.4, 0.45, 0.5, 0.5, 0.55, 0.6)]
    return {
        "command": "python scripts/bench.py", "date": "2026-11-21",
        "machine": {"cpu": "Test CPU", "cores": 2, "ram_gb": 24, "python": "3.11", "torch": "2", "transformers": "5",
                    "llama_cpp_python": "0.3"},
        "sections": {
            "bandwidth": {"measured": "d", "threads_1": 30e9, "threads_2": 40e9},
            "generation": {"measured": "d", "prompt_tokens": 101, "new_tokens": 128,
                           "gguf_bytes": {"1b": 0.8e9}, "merged_parameters": {"1b": 1e9},
                           "runs": {"llama.cpp q4_k_m 1b": [run(30), run(34), run(36)],
                                    "transformers float32 1b": [run(3), run(4), run(5)],
                                    "transformers bfloat16 1b": [run(2), run(2), run(2)]},
                           "paths": {"llama.cpp q4_k_m 1b": {"size": "1b", "dtype": None, "threads": 2},
                                     "transformers float32 1b": {"size": "1b", "dtype": "float32", "threads": 2},
                                     "transformers bfloat16 1b": {"size": "1b", "dtype": "bfloat16", "threads": 2}}},
            "space": {"measured": "d", "new_tokens": 128, "turn_tokens": 64, "intervals": [0.1, 0.0],
                      "throughput": {"raw": [run(34), run(34), run(34)],
                                     "space 0.1": [space_run(33, 33.5, 40)] * 3,
                                     "space 0.0": [space_run(25, 26, 128)] * 3},
                      "conversations": [turns, turns, turns]},
            "export": {"measured": "d", "3b": {"bytes": {"base": 6.4e9, "merged": 6.4e9, "f16": 6.4e9, "q4_k_m": 2e9},
                                               "runs": {"merge": [step(30, 1e9)], "convert": [step(60, 2e9)],
                                                        "quantize": [step(120, 3e9)],
                                                        "naive_merge": [step(90, 8e9)]}}},
        },
    }


def test_summary_and_verdicts_follow_from_the_raw_figures(tmp_path):
    results = fake_results()
    s = summary.summary(results)
    assert s["bandwidth"] == 40e9
    llama = s["generation"]["llama.cpp q4_k_m 1b"]
    assert llama["tokens_per_s"] == 34 and llama["bound"] == pytest.approx(50) and llama["share"] == pytest.approx(0.68)
    assert s["generation"]["transformers float32 1b"]["weight_bytes"] == 4e9  # fp32: 4 bytes per parameter
    assert s["llama_vs_fp32"] == pytest.approx(8.5)
    assert s["space"]["share"] == pytest.approx(33 / 34) and s["space"]["ttft_ratio"] == pytest.approx(1.5)
    export = s["export"]["3b"]
    assert export["ours_wall_s"] == 210 and export["ours_peak_rss"] == 3e9 and export["naive_peak_rss"] == 8e9
    verdicts = {target: ok for target, _, ok, _ in summary.target_rows(s)}
    assert verdicts == {
        "Space ≥ 97% of raw llama-cpp-python tokens/s (1B)": "**met**",          # 97.1%
        "raw ≥ 85% of the memory-bandwidth bound (1B q4_k_m)": "**missed**",      # 68%
        "q4_k_m through llama.cpp ≥ 9× transformers fp32 (1B)": "**missed**",     # 8.5×
        "every later turn's TTFT ≤ 1.3× turn 1's (1B, through the Space, 6 turns)": "**missed**",  # 1.5×
        "3B export ≤ 2.5 GB peak RSS": "**missed**",                              # 3 GB
        "3B export ≤ 4 minutes": "**met**",                                       # 3.5 min
    }
    s["machine_line"] = "Test CPU"
    report = render_report(results, s)
    for figure in ("34.00", "97.1%", "8.5×", "1.50×", "3.00 GB", "3.5 min", "40.0 GB/s"):
        assert figure in report
    render_chart(s, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_are_reported_at_once(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts/bench.py"), "--sections", "speed", "--sizes", "7b",
                             "--repeats", "0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line.split(":")[1].strip() for line in result.stderr.splitlines()] == ["--sections", "--sizes", "--repeats 0"]


def test_finetome_shaped_rows_have_the_schema_and_the_mean_size():
    import json

    from bench.startup import finetome_shaped_lines
    from train.conversations import standardize_row

    lines = list(finetome_shaped_lines(count=400, mean_bytes=2490))
    mean = sum(len(line.encode()) + 1 for line in lines) / len(lines)
    assert abs(mean - 2490) / 2490 < 0.01
    rows = [json.loads(line) for line in lines]
    assert all(standardize_row(row) for row in rows) and all({"source", "score"} <= set(row) for row in rows)
    assert len({row["conversations"][0]["value"] for row in rows}) == 400  # no two rows alike


def test_startup_section_renders_against_its_targets():
    run = {"ready_s": 30.0, "ready_peak_rss": 1.5e9, "first_step": 1, "first_step_s": 50.0, "peak_rss": 4e9,
           "reused": False}
    resumed = {**run, "ready_s": 12.0, "first_step": 2, "first_step_s": 30.0, "reused": True}
    section = {"measured": "2026-12-02 22:00", "cpu": "Test CPU", "cores": 2, "rows": 100_000,
               "dataset_bytes": 249_000_000, "command": "--preset tiny", "runs": {"fresh": [run], "resume": [resumed]}}
    s = summary.summary({"sections": {"startup": section}})
    assert [ok for _, _, ok, _ in summary.target_rows(s)] == ["**met**"] * 3
    s["startup"]["fresh"]["ready_peak_rss"] = 2.5e9
    assert [ok for _, _, ok, _ in summary.target_rows(s)] == ["**met**", "**missed**", "**met**"]
    from bench.startup import render

    text = "\n".join(render(section))
    assert "| fresh | **30.0 s** |" in text and "| resume | **12.0 s** |" in text and "1.50 GB" in text


def test_waves_section_renders_against_its_target():
    from bench import waves

    mib = 2**20
    rows = [{"wave": wave, "seconds": 500.0, "errors": 0, "rss": rss * mib, "anon": (rss - 1500) * mib,
             "memory_line": "memory: RSS 1 MiB; saved prompt states (at most 128 MiB per model): A 126 MiB in 36"}
            for wave, rss in (("start", 189), ("warm-up", 3400), ("1", 3450), ("2", 3480), ("3", 3500))]
    section = {"measured": "2026-12-03 09:54", "cpu": "Test CPU", "cores": 2, "models": ["1b-Q4_K_M.gguf"] * 2,
               "gguf_bytes": [808_000_000] * 2, "conversations": 100, "parallel": 20, "new_tokens": 64,
               "cache_mb": 128, "max_sessions": 100, "rows": rows, "tracebacks": 0}
    s = summary.summary({"sections": {"waves": section}})
    (target, measured, ok, _), = summary.target_rows(s)
    assert ok == "**met**" and measured.startswith("+2.9% (3.32 → 3.42 GiB; 0 errors, 0 tracebacks)"), measured
    text = "\n".join(waves.render(section))
    assert "| warm-up | 500 s | 0 | 3,400 MiB | 1,900 MiB | A 126 MiB in 36 |" in text and "within the 5%" in text
    rows[-1]["rss"] = 3600 * mib  # +5.9%: over
    s = summary.summary({"sections": {"waves": section}})
    assert summary.target_rows(s)[0][2] == "**missed**" and "**over**" in "\n".join(waves.render(section))


def test_concurrency_section_renders_and_reads_the_targets(tmp_path):
    from bench import concurrency

    def figures(aggregate, per_user, p50, p95, gap=0.05, rss=900 * 2**20):
        return {"users": 0, "wall_s": 1.0, "tokens": 128, "aggregate_tokens_per_s": aggregate,
                "per_user_tokens_per_s": per_user, "ttft_p50_s": p50, "ttft_p95_s": p95, "gap_p95_s": gap,
                "peak_rss_bytes": rss}

    section = {"measured": "2026-12-06 07:00", "cpu": "Test CPU", "cores": 2, "gguf": "1b-Q4_K_M.gguf",
               "gguf_bytes": 807_694_048, "new_tokens": 128, "runs": {
                   "engine": {"1": [figures(33, 33, 0.3, 0.3)], "2": [figures(36, 18, 0.4, 0.5)],
                              "4": [figures(40, 10, 0.9, 1.1, gap=0.2)]},
                   "llama-server": {"1": [figures(30, 30, 0.3, 0.3)], "2": [figures(35, 17, 0.5, 0.6)],
                                    "4": [figures(45, 11, 0.9, 1.2, gap=0.1, rss=None)]}}}
    text = "\n".join(concurrency.render(section))
    assert "| 4 | engine | **40.0** | 40.0 | 10.0 | 0.90 s | 1.10 s | 1.10 | 0.200 s | 900 MiB |" in text
    assert "| 4 | llama-server | **45.0** | 45.0 | 11.0 | 0.90 s | 1.20 s | 1.20 | 0.100 s | n/a |" in text
    assert "2 users: **met** (tokens/s in all 1.03× llama-server's, p95 first token −0.10 s)" in text
    assert "4 users: **missed** (tokens/s in all 0.89× llama-server's, p95 first token −0.10 s)" in text
    assert "Repetition by repetition" not in text  # one repetition: the medians are it
    section["runs"] = {path: {n: runs * 2 for n, runs in by_n.items()} for path, by_n in section["runs"].items()}
    section["runs"]["engine"]["2"][1] = figures(30, 15, 0.4, 0.5)
    text = "\n".join(concurrency.render(section))
    assert "Repetition by repetition: 1: 2 users: **met**" in text and "; 2: 2 users: **missed** (tokens/s in all 0.86×" in text
    s = summary.summary({"sections": {"concurrency": section}})
    assert s["concurrency"]["engine"][4]["ttft_p95_s"] == 1.1
    render_chart(s, tmp_path / "chart.png")


@pytest.mark.parametrize("times, tokens, asked, reason", [
    ([1.0, 1.00001], None, 128, "2 tokens of the 128 asked: the answer ended early"),  # the 150,012 tok/s run
    ([1.0, 1.2], 2, 64, "2 tokens of the 64 asked"),  # through the Space: its stats line counts the tokens
    ([1.0], 64, 64, "64 tokens arrived in 1 streamed update: no interval"),
    ([], 0, 16, "0 tokens of the 16 asked"),
])
def test_a_speed_run_short_of_the_tokens_asked_is_rejected_not_divided(times, tokens, asked, reason):
    from bench.rates import RejectedRun, decoding_rate

    with pytest.raises(RejectedRun, match=reason):
        decoding_rate(times, 0.5, asked, tokens)
    assert decoding_rate([1.0, 1.5, 3.0], 0.5, 3)["tokens_per_s"] == pytest.approx(1.0)


def test_users_whose_answers_end_early_are_rejected_not_counted():
    from bench.concurrency import _run_users
    from bench.rates import RejectedRun
    from space.replies import Reply

    def answer(prompt: str, started: float, finish="length") -> tuple[Reply, list[float]]:
        return Reply(text="x", ttft_s=0.1, tokens=16, tokens_per_s=30.0, finish_reason=finish, done=True), [1.0, 1.25]

    figures = _run_users(answer, 2)
    assert figures["tokens"] == 32 and figures["gap_p95_s"] == 0.25
    with pytest.raises(RejectedRun, match="1 of 2 answers ended before the tokens asked \\(finish reason 'stop'\\)"):
        _run_users(lambda prompt, started: answer(prompt, started, "stop" if "sky" in prompt else "length"), 2)


def test_end_of_generation_is_suppressed_so_an_answer_runs_to_the_tokens_asked(tiny_gguf):
    """The raw path of the space section: with eog_logit_bias, llama-cpp-python generates max_tokens (finish reason
    "length") on the tiny GGUF even when the model wants to end its turn at once (here: every other token pushed far
    down, as a random model's weights sometimes put end-of-turn first). One logit_bias carries both: llama-cpp-python
    0.3.36 drops its logits_processor list when logit_bias is also given (`list.extend` returns None)."""
    from bench.rates import eog_logit_bias
    from common.llama_runtime import open_gguf
    from common.llama3 import END_OF_MESSAGE_ID, END_OF_TEXT_ID, EOT_ID

    llm = open_gguf(str(tiny_gguf), n_ctx=512)
    no_end = eog_logit_bias(llm)
    assert {EOT_ID, END_OF_TEXT_ID, END_OF_MESSAGE_ID} <= set(no_end) and set(no_end.values()) == {float("-inf")}
    wants_to_stop = {token: -1e4 for token in range(llm.n_vocab()) if token not in no_end}
    message = [{"role": "user", "content": "What is the secret word?"}]
    for bias, finish, tokens in ((wants_to_stop, "stop", 0), ({**wants_to_stop, **no_end}, "length", 16)):
        answer = llm.create_chat_completion(message, temperature=0.0, max_tokens=16, logit_bias=bias)
        assert (answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]) == (finish, tokens)
