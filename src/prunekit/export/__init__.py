"""Exports of pruned models to inference engines' formats (llama.cpp's GGUF)."""

from prunekit.export.gguf import QUANTS, GgufReport, export_gguf, export_gguf_model

__all__ = ["QUANTS", "GgufReport", "export_gguf", "export_gguf_model"]
