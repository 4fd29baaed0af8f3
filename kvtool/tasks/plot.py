"""The needle heatmap of a task report: depth (rows) × length (columns), one panel per method, exact first."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.util import atomic_write


def _grid(entry: dict[str, Any], lengths: list[int], depths: list[float]) -> list[list[float]]:
    """``(depths, lengths)`` accuracies of one method (NaN where a cell has no prompt)."""
    cell = {(c["length"], c["depth"]): c.get("accuracy") for c in entry["cells"]}
    return [[math.nan if cell.get((n, d)) is None else float(cell[(n, d)]) for n in lengths] for d in depths]


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def heatmap(report: dict[str, Any], path: Path | str, columns: int = 4) -> Path:
    """Write the heatmap of ``report`` (a task report) to ``path`` (PNG, or any format matplotlib knows from
    the suffix), atomically. Each cell shows its accuracy in %; its colour runs red (0) to green (1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in plt.gcf().canvas.get_supported_filetypes():
        plt.close("all")
        raise InputError(f"--plot {path}: matplotlib cannot write .{fmt} files; use .png, .svg or .pdf")
    plt.close("all")
    lengths, depths = list(report["lengths"]), list(report["depths"])
    panels = [report["exact"], *report["methods"]]
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * len(lengths) * cols + 1.6, 0.45 * len(depths) * rows + 1.2),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, entry in zip(axes.flat, panels, strict=False):
        grid = _grid(entry, lengths, depths)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
        acc = entry.get("accuracy")
        title = entry["label"] if len(entry["label"]) <= 34 else entry["label"][:32] + "…"
        ax.set_title(f"{title}\n{'' if acc is None else f'{100 * acc:.0f} %'}", fontsize=8)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("length (tokens)", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy")
    fig.suptitle(f"{report['task']} — {report.get('model', '')}, {report['samples']} sample(s) per cell, "
                 f"seed {report['seed']}", fontsize=9)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format=fmt), "the plot")
    finally:
        plt.close(fig)
    return path
