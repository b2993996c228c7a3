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


PANELS = (  # x key, x label, x higher is better, y key, y label, y higher is better
    ("params_share", "non-embedding parameters (share of dense)", False, "ppl", "perplexity", False),
    ("prefill_speedup", "prefill speed-up over dense (1 x prompt)", True, "ppl", "perplexity", False),
    ("decode_speedup", "decode speed-up over dense (tokens/s)", True, "ppl", "perplexity", False),
    ("params_share", "non-embedding parameters (share of dense)", False, "zeroshot_avg", "zero-shot accuracy", True),
)


BIT_MARKERS = {8: "s", 4: "^", 3: "v", 2: "D"}  # 16-bit points stay circles


def pareto(points: list[tuple[float, float]], x_high: bool, y_high: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes, in x order."""

    def better(a, b, high):
        return a >= b if high else a <= b

    front = [
        p
        for p in points
        if not any(
            q != p and better(q[0], p[0], x_high) and better(q[1], p[1], y_high) and (q[0] != p[0] or q[1] != p[1])
            for q in points
        )
    ]
    return sorted(front)


def _method_curves(ax, rows: list[dict], xk: str, yk: str, colours: dict) -> None:
    """One thin line through each method's ratios (dotted once recovered), so a method reads as a curve."""
    groups: dict[tuple[str, bool], list[dict]] = {}
    for r in rows:
        if r["method"] != "dense":
            groups.setdefault((r["method"], r["recovered"]), []).append(r)
    for (method, recovered), members in groups.items():
        if len(members) > 1:
            members = sorted(members, key=lambda r: r.get("ratio", 0.0))
            ax.plot([r[xk] for r in members], [r[yk] for r in members], color=colours[method], lw=0.9,
                    ls=":" if recovered else "-", alpha=0.7, zorder=2)  # fmt: skip


SIZE_PANEL = ("megabytes", "size (MB: quantized linears at their bits, the rest at 16)", False, "ppl", "perplexity",
              False)  # fmt: skip


def study_png(rows: list[dict], title: str, chance: float | None = None, sizes: list[dict] | None = None) -> bytes:
    """The study's views in one figure: perplexity against size, prefill and decode speed, and (when
    measured) zero-shot accuracy against size with the ``chance`` level of guessing; one colour per
    method, hollow markers for recovered points, the Pareto front as a thick grey line. Speed-ups carry
    their interquartile range as a bar; a ratio too spread to read is drawn grey with a "?" and left out
    of the front. ``sizes`` (when some are quantized) adds perplexity against megabytes: every point at 16
    bits and quantized, a marker per bit width."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    panels = [(p, rows) for p in PANELS if any(r.get(p[3]) is not None for r in rows)]  # no empty panel
    if sizes and any(s["quant"] for s in sizes):
        panels.append((SIZE_PANEL, sizes))
    shape = (1, len(panels)) if len(panels) <= 3 else (2, -(-len(panels) // 2))
    fig, axes = plt.subplots(*shape, figsize=(5.5 * shape[1], 4.6 * shape[0]), dpi=110, squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")  # an odd panel count leaves one cell empty: no empty axes drawn
    for ax, ((xk, xl, x_high, yk, yl, y_high), panel_rows) in zip(axes.flat, panels, strict=False):
        usable = [r for r in panel_rows if r.get(yk) is not None]
        readable = [r for r in usable if r.get(f"{xk}_readable", True)]
        for r in usable:
            colour = colours[r["method"]] if r in readable else "grey"
            face = "none" if r["recovered"] else colour
            if f"{xk}_q1" in r:  # the interquartile range of the per-round speed ratios
                ax.plot([r[f"{xk}_q1"], r[f"{xk}_q3"]], [r[yk], r[yk]], color=colour, lw=1, alpha=0.6, zorder=2)
            marker = BIT_MARKERS.get(r.get("bits"), "o")
            ax.scatter(r[xk], r[yk], s=40, marker=marker, edgecolors=colour, facecolors=face, zorder=3)
            label = r["point"].split(" ", 1)[-1] if r["method"] != "dense" else "dense"
            ax.annotate(label + ("" if r in readable else " ?"), (r[xk], r[yk]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        _method_curves(ax, [r for r in readable if r.get("bits", 16) == 16], xk, yk, colours)
        front = pareto([(r[xk], r[yk]) for r in readable], x_high, y_high)
        if front:
            ax.plot(*zip(*front, strict=True), ls="--", color="grey", lw=2.5, alpha=0.4, zorder=1)
        if yk == "ppl":  # perplexities span orders of magnitude: log scale, plain numbers
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5, 7)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if yk == "zeroshot_avg" and chance is not None:
            ax.axhline(chance, color="black", ls=":", lw=1)
            ax.annotate("chance", (0, chance), xycoords=("axes fraction", "data"), xytext=(3, 3),
                        textcoords="offset points", fontsize=7)  # fmt: skip
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[m], label=m) for m in methods]
    handles.append(plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", color="black", label="recovered"))
    if sizes and any(s["quant"] for s in sizes):
        for bits in sorted({s["bits"] for s in sizes if s["quant"]}, reverse=True):
            handles.append(plt.Line2D([], [], marker=BIT_MARKERS.get(bits, "o"), ls="", color="black", label=f"{bits}-bit"))
    handles.append(plt.Line2D([], [], ls="--", color="grey", lw=2.5, alpha=0.4, label="Pareto front"))
    handles.append(plt.Line2D([], [], marker="o", ls="-", color="grey", label="speed spread too wide (?)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if shape[0] == 1 else 0.04, 1, 0.95))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
