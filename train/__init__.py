"""Training stage: LoRA fine-tuning of Llama-3.2 on FineTome (see train/run.py).

Importing this package, or any module in it, never imports unsloth: only train.backends.load_unsloth does.
"""
