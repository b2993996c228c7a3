"""Exports to formats other tools run: compressed-tensors (quantized weights for transformers and vLLM)."""
