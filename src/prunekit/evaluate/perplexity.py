"""Perplexity over non-overlapping windows, loss accumulated in float32."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunekit.data import Text, adds_bos, eval_windows, tokenize
from prunekit.errors import PrunekitError

log = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    dataset: str
    dataset_sha256: str
    seqlen: int
    windows: int
    tokens: int  # predicted tokens: (seqlen - 1) per window
    bos: str
    nll: float  # mean negative log-likelihood per predicted token
    ppl: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.dataset} perplexity {self.ppl:.3f} (seqlen {self.seqlen}, {self.windows} windows, "
            f"{self.tokens} tokens)"
        )


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: Text,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    bos: str = "stream",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text``.

    ``bos="stream"`` tokenises the corpus once the tokenizer's default way and cuts the stream into
    windows (the GPTQ / SparseGPT / Wanda convention); ``bos="window"`` starts every window with BOS
    when the tokenizer uses one.
    """
    if bos not in ("stream", "window"):
        raise PrunekitError(f"--bos must be 'stream' or 'window', got {bos!r}")
    if batch_size < 1:
        raise PrunekitError(f"--batch-size must be at least 1, got {batch_size}")
    bos_id = tokenizer.bos_token_id if bos == "window" and adds_bos(tokenizer) else None
    windows = eval_windows(tokenize(tokenizer, text), seqlen, max_windows, bos_id)
    device = next(model.parameters()).device
    start = time.perf_counter()
    total_nll = torch.zeros((), dtype=torch.float64)
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc=f"ppl {text.name}", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += loss.double().cpu()
    tokens = windows.shape[0] * (seqlen - 1)
    nll = (total_nll / tokens).item()
    return PerplexityResult(
        dataset=text.name,
        dataset_sha256=text.sha256,
        seqlen=seqlen,
        windows=windows.shape[0],
        tokens=tokens,
        bos=bos,
        nll=nll,
        ppl=math.exp(nll),
        seconds=time.perf_counter() - start,
    )
