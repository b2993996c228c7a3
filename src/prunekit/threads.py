"""Intra-op thread count, fixed for a stretch of work and restored after it."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fixed_threads(threads: int | None):
    """Run with ``threads`` intra-op threads (None: as set), restored afterwards; yields the count in use.

    Small dense factorisations (eigh, Cholesky of a few-thousand-wide matrix) run under ``fixed_threads(1)``:
    on a CPU shared with other work their multi-threaded LAPACK paths measured 10-60x slower than one
    thread here (eigh of 576 x 576 in float64: 6.2 s on 2 threads against 0.1 s on 1, with a busy core)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
