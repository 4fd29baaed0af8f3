"""Turning a layer's figures into the compression approach they point to, and a file-level summary.

Every rule reads figures already in the layer entry; the thresholds live with the module that defines
the figure (spectrum.LOW_RANK_WORTH, outliers.AXIS_MARGIN / ROTATION_GAIN, attention.COVER,
similarity.SHARE_COSINE), so a reader can trace a recommendation back to a number in the JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def _quant(entry: dict[str, Any], name: str) -> dict[str, Any]:
    o = entry["outliers"][name]
    return {"scheme": o["recommended_scheme"], "axis": o["recommended_axis"],
            "rotation_helps": o["rotation_helps"]}


def _low_rank(entry: dict[str, Any], name: str) -> int | None:
    s = entry["spectrum"]
    return int(s["recommended_rank"][name]) if s["low_rank_worth_it"][name] else None


def _eviction(entry: dict[str, Any]) -> dict[str, Any] | None:
    att = entry.get("attention")
    return None if att is None else dict(att["recommendation"])


def _share(entry: dict[str, Any]) -> int | None:
    prev = entry["similarity"]["previous"]
    return prev["previous_layer"] if prev and prev.get("sharing_candidate") else None


def recommend_layer(entry: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Structured recommendation plus a one-line text for the summary table."""
    rec = {
        "low_rank": {"keys": _low_rank(entry, "keys"), "values": _low_rank(entry, "values"),
                     "head_dim": head_dim},
        "quantization": {"keys": _quant(entry, "keys"), "values": _quant(entry, "values")},
        "eviction": _eviction(entry),
        "share_with_layer": _share(entry),
    }
    rec["text"] = recommendation_text(rec)
    return rec


def _quant_text(tag: str, q: dict[str, Any]) -> str:
    return f"{tag} {q['scheme']}"


def recommendation_text(rec: dict[str, Any]) -> str:
    """e.g. ``K per-channel, V rotate+per-token; rank K16; sinks 4 + recent 64; share with L3``."""
    q = rec["quantization"]
    parts = [f"{_quant_text('K', q['keys'])}, {_quant_text('V', q['values'])}"]
    ranks = [f"{t}{r}" for t, r in (("K", rec["low_rank"]["keys"]), ("V", rec["low_rank"]["values"]))
             if r is not None]
    if ranks:
        parts.append("rank " + " ".join(ranks))
    ev = rec["eviction"]
    if ev is not None:
        if ev["method"] == "sink+recent":
            parts.append(f"sinks {ev['sinks']} + recent {ev['recent']}")
        else:
            parts.append(f"keep {ev['keep_fraction']:.0%} heavy hitters (H2O/SnapKV)")
    if rec["share_with_layer"] is not None:
        parts.append(f"share with L{rec['share_with_layer']}")
    return "; ".join(parts)


def _counts(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


#: The codec pairs measured in the model (docs/FIDELITY.md, benchmarks/results/models.md) at about 3 stored
#: bits: TurboQuant's rotated form for keys and values where rotation evens the keys out (SmolLM2: KLD 0.006
#: at 3.21 bits); where the keys' outliers sit in a few fixed, very large channels (Gemma 3), keys per
#: channel before RoPE at 4 bits and values in the rotated form at 1.75 bits (KLD 0.0054 at 2.98 bits, where
#: the rotated form gives 0.0147 at 3.08).
ROTATED_FORM = "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true"
PER_CHANNEL_KEYS = "kvquant:bits=4,outliers=0"
LIGHT_VALUES = "turboquant:bits=1.75,center=true,sink=4,norm_bits=8,unbiased=true"
#: Median over layers of the keys' largest channel |max| over the median channel's: 4.1-4.7 on SmolLM2 (the
#: rotated form wins in the model), 8.4 on Gemma 3 270M (per-channel keys win).
HEAVY_KEY_CHANNELS = 6.5
#: Largest, over layers and kv heads, of the keys' largest channel RMS over the median channel's: 13.0 on
#: SmolLM2, 62.6 on Gemma 3, 92.9 on Qwen2.5-Coder-0.5B, whose key biases make a few channels large at every
#: token while their |max| stays 3.8× the median (the rotated form there: KLD 1.43; per-channel keys with
#: 1.75-bit values: 0.0054, benchmarks/results/models.md). Three models place these thresholds; `plan` +
#: `eval` decide for a new one.
HEAVY_KEY_RMS = 30.0


def recommend_codec(rec: list[dict[str, Any]], key_peaks: list[float],
                    key_rms_peaks: list[float] | None = None) -> dict[str, str]:
    """One ``--keys``/``--values`` pair for the whole file: keys per channel before RoPE (``kvquant``) when
    at least half of the layers' keys quantize best per channel *and* their outlier channels are heavy —
    median ``key_peaks`` (each layer's largest channel |max| over the median channel's) at least
    :data:`HEAVY_KEY_CHANNELS`, or the largest ``key_rms_peaks`` (each layer's largest channel RMS over the
    median channel's) at least :data:`HEAVY_KEY_RMS` — then values at 1.75 bits in the rotated form, since
    such keys carry the error; else the rotated TurboQuant form for both. A starting point: ``kvtool plan``
    chooses per layer, ``kvtool eval`` judges."""
    per_channel = sum(r["quantization"]["keys"]["scheme"] == "per-channel" for r in rec)
    peak = float(np.median(key_peaks)) if key_peaks else 0.0
    rms = max(key_rms_peaks, default=0.0) if key_rms_peaks else 0.0
    heavy = bool(rec) and 2 * per_channel >= len(rec) and (peak >= HEAVY_KEY_CHANNELS or rms >= HEAVY_KEY_RMS)
    why = (f"keys quantize best per channel in {per_channel} of {len(rec)} layers, largest key channel "
           f"{peak:.1f}× the median one" + (f" (by RMS up to {rms:.1f}×)" if key_rms_peaks else ""))
    if heavy:
        return {"keys": PER_CHANNEL_KEYS, "values": LIGHT_VALUES, "why": why}
    return {"keys": ROTATED_FORM, "values": ROTATED_FORM, "why": why}


def summarize(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """File-level figures over the analysed layers (means, counts, the layers flagged for sharing) and the
    codec pair they point to (:func:`recommend_codec`)."""
    att = [e["attention"] for e in layers if e.get("attention")]
    rec = [e["recommendation"] for e in layers]
    return {
        "codec": recommend_codec(rec, [max(e["outliers"]["keys"]["max_over_median"]) for e in layers
                                       if e.get("outliers")],
                                 [max((r for r in e["outliers"]["keys"]["rms_max_over_median"] if r is not None),
                                      default=0.0) for e in layers if e.get("outliers")]),
        "layers": len(layers),
        "mean_rank95": {n: _mean([float(np.mean(e["spectrum"][n]["per_head"]["rank95"])) for e in layers])
                        for n in ("keys", "values")},
        "keys_per_channel_layers": sum(r["quantization"]["keys"]["axis"] == "per-channel" for r in rec),
        "values_per_channel_layers": sum(r["quantization"]["values"]["axis"] == "per-channel" for r in rec),
        "rotation_helps_layers": {n: sum(r["quantization"][n]["rotation_helps"] for r in rec)
                                  for n in ("keys", "values")},
        "schemes": {n: _counts(r["quantization"][n]["scheme"] for r in rec) for n in ("keys", "values")},
        "mean_sink_mass": _mean([float(np.mean(a["sink_mass"])) for a in att]),
        "mean_local_mass": _mean([float(np.mean(a["local_mass"])) for a in att]),
        "mean_keep_fraction": _mean([a["recommendation"]["keep_fraction"] for a in att]),
        "sharing_candidates": [e["layer"] for e, r in zip(layers, rec, strict=True)
                               if r["share_with_layer"] is not None],
    }
