"""Compare GGUF chat models as the Space serves them (held-out perplexity, speed, stopping, answers side by side).

    python scripts/compare.py --model q4=exports/tiny/Tiny-Llama-3.2-FineTome-Q4_K_M.gguf \\
                              --model q8=exports/tiny/Tiny-Llama-3.2-FineTome-Q8_0.gguf --max-tokens 64

One module per job: models (the --model arguments and loading them), heldout (the held-out conversations and
their perplexity), prompts (the shipped prompts, the answers to them and their figures), report (compare.md,
compare.json and compare.png) and cli (the config, the flags and main, which scripts/compare.py runs).
"""
