"""Export stage: merge the LoRA adapter into 16-bit weights, convert and quantize to GGUF with llama.cpp's own
tools, verify the result, and push it (see export/to_gguf.py)."""
