"""Exports to the formats inference engines run: llama.cpp's GGUF (``gguf``) and compressed-tensors
(``compressed``: quantized weights for transformers and vLLM)."""
