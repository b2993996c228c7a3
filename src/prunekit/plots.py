"""Figures a person would rather look at than read (matplotlib, no display needed)."""

from __future__ import annotations

import io


def loss_curve_png(losses: list[float], phases: list[dict], title: str) -> bytes:
    """The training loss per optimizer step, phases (e.g. CPT then LoRA) marked, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2)
    start = 0
    for phase in phases:
        if len(phases) > 1:
            ax.axvspan(start + 0.5, start + phase["steps"] + 0.5, alpha=0.08, color="C1" if start else "C0")
            ax.text(start + 1, max(losses), phase["mode"], va="top", fontsize=8)
        start += phase["steps"]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
