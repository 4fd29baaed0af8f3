"""PNG figures of an analysis result: what a person would rather look at than read.

Built only from the JSON-safe result of :func:`kvtool.analysis.analyze`, so the same figures can be
redrawn from a saved ``--json`` document. Uses ``matplotlib.figure.Figure`` directly (the Agg canvas,
no pyplot state, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from kvtool.analysis.similarity import SHARE_COSINE
from kvtool.analysis.spectrum import ENERGIES
from kvtool.util import atomic_write

DPI = 110
ANNOTATE_MAX_CELLS = 400  # write the number into each heatmap cell only while it stays legible


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write every figure the result supports into ``out_dir``; returns the paths written."""
    layers = result["layers"]
    if not layers:
        return []
    drawers = [("ranks.png", _ranks), ("spectra.png", _spectra), ("channels.png", _channels),
               ("similarity.png", _similarity)]
    if any(e.get("attention") for e in layers):
        drawers.insert(1, ("attention.png", _attention))
    written = []
    for name, draw in drawers:
        fig = draw(result)
        if fig is not None:
            path = out_dir / name
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=DPI, format="png"), "a plot")
            written.append(path)
    return written


def _layer_labels(result: dict[str, Any]) -> list[int]:
    return [e["layer"] for e in result["layers"]]


def _heatmap(fig: Figure, ax: Any, grid: np.ndarray, title: str, labels: list[int], xlabel: str,
             fmt: str, **kw: Any) -> None:
    """grid: (layers, heads). Rows are labelled with the layer indices actually analysed."""
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", **kw)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    step = max(1, len(labels) // 16)
    ax.set_yticks(range(0, len(labels), step), [str(x) for x in labels[::step]])
    ax.set_xticks(range(grid.shape[1]))
    fig.colorbar(im, ax=ax, shrink=0.85)
    if grid.size <= ANNOTATE_MAX_CELLS:
        mid = np.nanmean(grid)
        for (r, c), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=7,
                        color="black" if v > mid else "white")


def _grid(result: dict[str, Any], pick: Any) -> np.ndarray:
    """(layers, heads) from a per-layer list picker; layers without the figure become NaN rows."""
    rows = [pick(e) for e in result["layers"]]
    width = max((len(r) for r in rows if r is not None), default=0)
    return np.array([r if r is not None else [np.nan] * width for r in rows], dtype=float)


def _ranks(result: dict[str, Any]) -> Figure:
    labels, d = _layer_labels(result), result["head_dim"]
    fig = Figure(figsize=(10, 1.5 + 0.25 * len(labels)), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, name in zip(axes, ("keys", "values"), strict=True):
        grid = _grid(result, lambda e, n=name: e["spectrum"][n]["per_head"]["rank95"])
        _heatmap(fig, ax, grid, f"{name}: effective rank at 95 % energy (of {d})", labels, "kv head", ".0f",
                 cmap="viridis", vmin=0, vmax=d)
    fig.suptitle("Low rank: fewer dimensions needed = a rank-r projection pays", fontsize=11)
    return fig


def _attention(result: dict[str, Any]) -> Figure:
    labels = _layer_labels(result)
    panels = [("sink_mass", "sink mass (first 4 tokens)", "magma", (0, 1)),
              ("entropy_normalized", "entropy / log(visible keys)", "cividis", (0, 1)),
              ("local_mass", "local mass (last 64 tokens)", "magma", (0, 1)),
              ("heavy_hitter_fraction", "keys holding 90 % of mass", "viridis", (0, None))]
    fig = Figure(figsize=(16, 1.5 + 0.25 * len(labels)), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (key, title, cmap, (lo, hi)) in zip(axes, panels, strict=True):
        grid = _grid(result, lambda e, k=key: e["attention"][k] if e.get("attention") else None)
        _heatmap(fig, ax, grid, title, labels, "query head", ".2f", cmap=cmap, vmin=lo, vmax=hi)
    fig.suptitle("Attention structure per layer and query head", fontsize=11)
    return fig


def _spectra(result: dict[str, Any]) -> Figure:
    """Cumulative energy vs rank, one curve per layer (mean over heads), coloured by depth."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    layers = result["layers"]
    colors = _depth_colors(len(layers))
    for ax, name in zip(axes, ("keys", "values"), strict=True):
        for e, color in zip(layers, colors, strict=True):
            energy = np.mean(np.array(e["spectrum"][name]["energy"], dtype=float), axis=0)
            ax.plot(np.arange(1, len(energy) + 1), np.cumsum(energy), color=color, lw=1)
        for p in ENERGIES:
            ax.axhline(p, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{name}: cumulative energy vs rank", fontsize=10)
        ax.set_xlabel("rank (components per head)")
        ax.set_ylim(0, 1.01)
    axes[0].set_ylabel("energy kept")
    _depth_colorbar(fig, axes, layers)
    return fig


def _depth_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _depth_colorbar(fig: Figure, axes: Any, layers: list[dict[str, Any]]) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    lo, hi = layers[0]["layer"], layers[-1]["layer"]
    sm = ScalarMappable(norm=Normalize(lo, max(hi, lo + 1)), cmap=colormaps["viridis"])
    fig.colorbar(sm, ax=axes, label="layer", shrink=0.85)


def _channels(result: dict[str, Any]) -> Figure:
    """Per-channel RMS ÷ the layer's median channel, as layers × (kv_head, channel).

    Dividing by each layer's median keeps depth-wise scale changes from hiding the outlier channels,
    which show as bright columns (KIVI's picture for keys).
    """
    labels, d = _layer_labels(result), result["head_dim"]
    fig = Figure(figsize=(14, 1.8 + 0.22 * len(labels)), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, name in zip(axes, ("keys", "values"), strict=True):
        grid = np.array([np.ravel(e["outliers"][name]["channel_rms"]) for e in result["layers"]], float)
        med = np.median(grid, axis=1, keepdims=True)
        grid = np.divide(grid, med, out=np.full_like(grid, np.nan), where=med > 0)
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="inferno",
                       norm=LogNorm(0.25, max(4.0, float(np.nanmax(grid, initial=4.0)))))
        for h in range(1, grid.shape[1] // d):
            ax.axvline(h * d - 0.5, color="cyan", lw=0.6)
        ax.set_title(f"{name}: channel RMS ÷ layer median (heads split by lines)", fontsize=10)
        ax.set_xlabel("kv head × channel")
        ax.set_ylabel("layer")
        step = max(1, len(labels) // 16)
        ax.set_yticks(range(0, len(labels), step), [str(x) for x in labels[::step]])
        fig.colorbar(im, ax=ax, shrink=0.85)
    return fig


def _similarity(result: dict[str, Any]) -> Figure | None:
    """Adjacent-layer cosine / CKA against depth; the dashed line is the sharing threshold."""
    rows = [(e["layer"], e["similarity"]["previous"]) for e in result["layers"]]
    rows = [(i, p) for i, p in rows if p and "keys" in p]
    if not rows:
        return None
    x = [i for i, _ in rows]
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax = fig.subplots()
    series = [("keys cosine", lambda p: p["keys"]["mean_cosine"], "-"),
              ("values cosine", lambda p: p["values"]["mean_cosine"], "-"),
              ("keys CKA", lambda p: p["keys"]["layer_cka"], "--"),
              ("values CKA", lambda p: p["values"]["layer_cka"], "--"),
              ("attention profile cosine", lambda p: p.get("attention", {}).get("mean_cosine"), ":")]
    for label, pick, ls in series:
        y = [pick(p) for _, p in rows]
        if any(v is not None for v in y):
            ax.plot(x, [np.nan if v is None else v for v in y], ls, marker="o", ms=3, label=label)
    ax.axhline(SHARE_COSINE, color="grey", ls="--", lw=0.8)
    ax.set_ylim(top=1.05)
    ax.set_xlabel("layer (compared with the previous analysed layer)")
    ax.set_ylabel("similarity")
    ax.set_title("Cross-layer similarity: above the dashed line = sharing candidate (MiniCache)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
