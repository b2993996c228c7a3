"""A teacher's top-k logits, precomputed once for every training example and streamed from disk.

Distilling from a teacher run alongside costs a teacher forward per step and the teacher's memory;
precomputed, it costs one pass and a file of ``examples x (seqlen - 1) x k`` values and token ids.
The file is safetensors; each step reads only its examples' rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunekit.errors import PrunekitError
from prunekit.recover.data import TrainData


class TeacherTopK:
    def __init__(self, path: str | Path, data: TrainData):
        self.path = Path(path)
        if not self.path.is_file():
            raise PrunekitError(f"no precomputed teacher logits at {self.path}; make them with precompute_teacher_topk")
        with safe_open(self.path, framework="pt") as f:
            meta = f.metadata() or {}
        expected = {"examples": str(len(data)), "seqlen": str(data.seqlen), "data_sha256": data.sha256}
        if any(meta.get(key) != value for key, value in expected.items()):
            raise PrunekitError(
                f"{self.path} was computed for other training data ({meta}); recompute it for {expected}"
            )
        self.k = int(meta["k"])

    def read(self, indices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k logits ``[b, seqlen - 1, k]`` and their token ids for the examples ``indices``."""
        with safe_open(self.path, framework="pt") as f:
            values, ids = f.get_slice("values"), f.get_slice("token_ids")
            rows = [(values[i : i + 1], ids[i : i + 1]) for i in indices.tolist()]
        return (
            torch.cat([v for v, _ in rows]).to(device),
            torch.cat([t for _, t in rows]).to(device=device, dtype=torch.long),
        )


@torch.no_grad()
def precompute_teacher_topk(teacher, data: TrainData, k: int, path: str | Path, batch_size: int = 4) -> TeacherTopK:
    """Run ``teacher`` over every example once and keep its ``k`` largest logits per position (float32)."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 0 < k <= vocab:
        raise PrunekitError(f"--teacher-topk must lie in [1, {vocab}] (the vocabulary), got {k}")
    device = next(teacher.parameters()).device
    teacher.eval()
    values, token_ids = [], []
    for batch in data.input_ids.split(batch_size):
        logits = teacher(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float()
        top = logits.topk(k, dim=-1)
        values.append(top.values.cpu())
        token_ids.append(top.indices.to(torch.int32).cpu())
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    meta = {"examples": str(len(data)), "seqlen": str(data.seqlen), "data_sha256": data.sha256, "k": str(k)}
    save_file({"values": torch.cat(values), "token_ids": torch.cat(token_ids)}, partial, metadata=meta)
    os.replace(partial, path)
    return TeacherTopK(path, data)
