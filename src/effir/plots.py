"""Figures, drawn with matplotlib's Agg backend (no display needed) and written atomically (tmp + rename)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from .files import atomic_path

COLUMNS = (("attention", "attention"), ("mlp", "MLP"), ("block", "block"))


def importance_heatmap(panels: Mapping[str, Mapping[str, Sequence[float | None]]], path: str | os.PathLike,
                       title: str = "") -> Path:
    """Heatmap of importance scores: one panel per side, rows = layers, columns = attention / MLP / block.

    Cells are coloured by their rank within the column (the groups are ranked separately, and one outlier layer,
    typically layer 0, would flatten a linear colour scale): dark = least important. Each cell shows the drop rank
    within its group (``#1`` = dropped first) and the score; already-dropped sub-layers are grey, marked ``dropped``.

    Args:
        panels: ``{panel title: {"attention": [L], "mlp": [L], "block": [L]}}``; ``None`` entries = dropped.
        path: output ``.png`` file.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .redundancy import ranks

    n_layers = max(len(s["attention"]) for s in panels.values())
    fig = Figure(figsize=(1.2 + 3.6 * len(panels), 1.4 + 0.32 * n_layers), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, scores) in zip(axes, panels.items(), strict=True):
        grid = np.full((n_layers, len(COLUMNS)), np.nan)
        for c, (key, _) in enumerate(COLUMNS):
            rank = ranks(scores[key])
            top = max((r for r in rank if r is not None), default=1)
            for i, (v, r) in enumerate(zip(scores[key], rank, strict=True)):
                if v is not None:
                    grid[i, c] = (r - 1) / max(top - 1, 1)  # colour = drop order, robust to outlier layers
                dark = v is not None and grid[i, c] < 0.55
                ax.text(c, i, "dropped" if v is None else f"#{r}\n{v:.3g}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
        ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0, vmax=1, interpolation="nearest")
        ax.set_facecolor("0.85")
        ax.set_xticks(range(len(COLUMNS)), [label for _, label in COLUMNS])
        ax.set_yticks(range(n_layers))
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=10)
    legend = "importance 1 - cos(x_in, x_out); #rank = drop order within column (dark = dropped first)"
    width = int(fig.get_figwidth() * 13)  # characters per line at fontsize 8
    fig.suptitle("\n".join(textwrap.wrap(f"{title}. {legend}" if title else legend, width)), fontsize=8)
    return _save(fig, path)


def width_plot(layers: Sequence[int], before: Sequence[int], after: Sequence[int], path: str | os.PathLike,
               title: str = "") -> Path:
    """Bar chart of MLP width per layer, before (light) and after (dark) width reduction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.28 * len(layers) + 1.5), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = range(len(layers))
    ax.bar(x, before, color="0.8", label="before")
    ax.bar(x, after, color="tab:blue", label="after")
    ax.set_xticks(list(x), [str(i) for i in layers], fontsize=7)
    ax.set_xlabel("layer (kept MLPs)")
    ax.set_ylabel("MLP width (neurons)")
    kept = sum(after) / max(sum(before), 1)
    ax.set_title(f"{title} - {kept:.1%} of neurons kept" if title else f"{kept:.1%} of neurons kept", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def quality_speed_plot(points: Mapping[str, tuple[Mapping[str, Mapping[str, float]], float]],
                       path: str | os.PathLike) -> Path:
    """Average nDCG@10 against measured speed-up, one panel per side (query, document), one point per model.

    Args:
        points: ``{label: ({"query": {"speedup": s}, "document": {...}}, avg_ndcg10)}``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sides = [s for s in ("query", "document") if any(s in speed for speed, _ in points.values())]
    fig = Figure(figsize=(4.2 * len(sides), 3.4 + 0.2 * len(points)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sides), squeeze=False)[0]
    markers = "osD^vP*X"
    for ax, side in zip(axes, sides, strict=True):
        for k, (label, (speed, quality)) in enumerate(points.items()):
            if side in speed:  # colour and marker per model, the same in every panel; named in the legend below
                ax.scatter(speed[side]["speedup"], quality, s=36, color=f"C{k % 10}", marker=markers[k % len(markers)],
                           label=label)
        ax.axvline(1.0, color="0.7", lw=0.8, ls="--")
        ax.margins(0.15)
        ax.set_xlabel(f"{side}-side speed-up vs original (x)")
        ax.set_ylabel("average nDCG@10")
        ax.set_title(f"{side} side", fontsize=9)
    # one legend under the panels: point labels inside the axes clip at the edges and collide with the titles
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        more = ax.get_legend_handles_labels()
        handles += [h for h, lab in zip(*more, strict=True) if lab not in labels]
        labels += [lab for lab in more[1] if lab not in labels]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 2), fontsize=8, frameon=False)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
