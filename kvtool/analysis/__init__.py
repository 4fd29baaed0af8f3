"""Where the redundancy in a captured cache is, per layer and head, and what compression it points to.

One module per question: :mod:`~kvtool.analysis.spectrum` (low rank), :mod:`~kvtool.analysis.outliers`
(quantization axis, rotation), :mod:`~kvtool.analysis.attention` (sinks, locality, eviction budget),
:mod:`~kvtool.analysis.similarity` (heads, adjacent layers). :func:`analyze` streams the file one layer
at a time; only the previous layer is kept, for the adjacent-layer comparison.

>>> from kvtool.analysis import analyze
>>> result = analyze("cache.h5", layers=[0, 1, 2])
>>> result["layers"][0]["recommendation"]["text"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvtool.analysis.attention import analyze_attention
from kvtool.analysis.outliers import DEFAULT_SEED, analyze_outliers
from kvtool.analysis.recommend import recommend_layer, summarize
from kvtool.analysis.similarity import AdjacentLayers, LayerState, analyze_heads
from kvtool.analysis.spectrum import analyze_spectrum
from kvtool.errors import InputError
from kvtool.report import json_safe, store_header
from kvtool.store import KEPT, KEYS_PREROPE, KIND_CACHE, CacheReader, StoreInfo
from kvtool.util import parse_layers

__all__ = ["analyze", "analyze_layer", "json_safe"]

Progress = Callable[[int, int], None]  # (layers done, layers total)


def analyze(path: Path | str, layers: Sequence[int] | str | None = None,
            plots_dir: Path | str | None = None, progress: Progress | None = None, *,
            sequence: int = 0, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Analyse a kvtool cache file; returns a JSON-safe dict (no NaN, plain Python types).

    ``layers``: indices, a spec such as ``"0-5,29"``, or None for all. ``plots_dir``: write PNG figures
    there (checked before any work). Memory: the current and the previous layer of (kv_heads, T,
    head_dim) arrays plus per-head / per-chunk temporaries, whatever the number of layers
    (benchmarks/bench_analyze.py measures it).
    """
    plots = _prepare_plots_dir(plots_dir) if plots_dir is not None else None
    with CacheReader(path, kinds=(KIND_CACHE,)) as reader:
        reader.check_layer(0, sequence)
        chosen = _select_layers(layers, reader.info.num_layers, reader)
        result = _header(reader.info, chosen, sequence, _has_prerope(reader, chosen, sequence),
                         any(KEPT in reader.layer_group(i, sequence) for i in chosen))
        adjacent = AdjacentLayers()
        for n, i in enumerate(chosen):
            result["layers"].append(analyze_layer(reader, i, sequence, adjacent, seed))
            if progress is not None:
                progress(n + 1, len(chosen))
    result["summary"] = summarize(result["layers"])
    result = json_safe(result, digits=6)
    if plots is not None:
        from kvtool.analysis.plots import write_plots  # matplotlib loads only when plots are asked for

        result["plots"] = [str(p) for p in write_plots(result, plots)]
    return result


def analyze_layer(reader: CacheReader, layer: int, sequence: int = 0, adjacent: AdjacentLayers | None = None,
                  seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """All sections for one layer. ``adjacent`` carries the previous layer between calls."""
    data = reader.layer(layer, sequence)
    keys, values = torch.from_numpy(data.keys), torch.from_numpy(data.values)  # (kv_heads, T, d)
    entry: dict[str, Any] = {
        "layer": layer,
        "layer_type": data.layer_type,
        "sliding_window": data.sliding_window,
        "tokens": int(keys.shape[1]),
        "spectrum": analyze_spectrum(keys, values, data.keys_prerope),
        "outliers": analyze_outliers(keys, values, seed),
        "attention": None,
    }
    profile = None
    if data.queries is not None and data.query_positions is not None:
        entry["attention"], profile = analyze_attention(
            torch.from_numpy(data.queries), keys, data.query_positions, data.key_positions,
            data.scaling, data.sliding_window if data.layer_type == "sliding" else 0, kept=data.kept)
    state = LayerState(layer, keys, values, data.key_positions, profile)
    entry["similarity"] = {"heads": analyze_heads(keys, values, profile),
                           "previous": (adjacent or AdjacentLayers()).step(state)}
    entry["recommendation"] = recommend_layer(entry, keys.shape[-1])
    return entry


def _select_layers(layers: Sequence[int] | str | None, num_layers: int, reader: CacheReader) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, str):
        return parse_layers(layers, num_layers)
    chosen = [int(i) for i in layers]
    for i in chosen:
        reader.check_layer(i)
    if not chosen:
        raise InputError("no layers selected")
    return chosen


def _header(info: StoreInfo, chosen: list[int], sequence: int, prerope: bool,
            evicted: bool = False) -> dict[str, Any]:
    notes = []
    if not info.has_queries:
        notes.append("the file holds no queries: attention sections skipped "
                     "(capture with queries to get sinks, locality and eviction budgets)")
    if len(info.sequences) > 1:
        notes.append(f"the file holds {len(info.sequences)} sequences; sequence {sequence} analysed")
    if evicted:
        notes.append("a decompressed evicted cache: evicted rows ('kept' false) get no attention; the "
                     "spectrum, outlier and similarity sections see them as zero rows")
    if not prerope:
        notes.append(f"keys are post-RoPE and the file holds no '{KEYS_PREROPE}': pre- vs post-RoPE "
                     "ranks skipped (capture with --pre-rope-keys)")
    return {
        **store_header("analyze", info),
        "file": str(info.path),
        "num_layers": info.num_layers,
        "num_q_heads": info.num_q_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "sequence": sequence,
        "num_tokens": info.sequences[sequence].num_tokens,
        "has_queries": info.has_queries,
        "layers_analysed": chosen,
        "notes": notes,
        "layers": [],
    }


def _has_prerope(reader: CacheReader, layers: list[int], sequence: int) -> bool:
    return any(KEYS_PREROPE in reader.layer_group(i, sequence) for i in layers)


def _prepare_plots_dir(plots_dir: Path | str) -> Path:
    """Create the plots directory and prove it writable before any analysis runs."""
    p = Path(plots_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".kvtool-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{p}: plots directory is not writable ({exc.strerror or exc})") from None
    return p
