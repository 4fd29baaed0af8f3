"""Attention structure: which keys the captured queries actually read, and what eviction that allows.

Per query head, averaged over the captured queries (the last Tq positions — the observation window
SnapKV, arXiv 2404.14469 §4, selects keys from):

* entropy of the attention distribution (nats) and the same divided by log(visible keys);
* sink mass: mass on the first k positions. StreamingLLM (arXiv 2309.17453, §3) found that the first
  few tokens absorb much of the attention whatever their content, and keeps 4 of them;
* locality: mass on the keys within the last w positions (a recent window);
* old mass: what is neither sink nor recent — what a sink + window cache throws away;
* heavy-hitter concentration: the fraction of visible keys that holds ``COVER`` of the mass. H2O
  (arXiv 2306.14048, §3) observed that a small set of heavy hitters carries most of it; this fraction
  is the eviction budget a per-query oracle would need.

Attention is computed like the model does: post-RoPE queries and keys, the file's scaling, a causal
mask on absolute positions (plus the sliding window of sliding layers), GQA query head h reading kv
head h // (q_heads // kv_heads). float32 in chunks of queries sized so a chunk's (q_heads, chunk, T)
probabilities stay about 1 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvtool.metrics import attention_chunks

SINK_COUNTS: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
RECENT_WINDOWS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
SINKS = 4  # StreamingLLM's choice; the sink_mass / old_mass figures use it
RECENT = 64
COVER = 0.9  # "holds most of the mass": sink + recent and heavy-hitter figures aim at 90 %
# A static sink + window cache needs no scores at run time, so it is preferred while it keeps at most
# twice the per-query oracle budget (H2O/SnapKV only approximate that oracle).
STATIC_SLACK = 2.0
SINK_MIN = 0.05  # a sink token must draw at least this share of the mass on average
@dataclass
class _Sums:
    """Running sums over queries, per query head; finalized into means."""

    heads: int
    tokens: int
    n: int = 0
    entropy: torch.Tensor = field(init=False)
    norm_entropy: torch.Tensor = field(init=False)
    heavy: torch.Tensor = field(init=False)
    sink: torch.Tensor = field(init=False)  # (heads, sinks): mass on the first s positions
    cover: torch.Tensor = field(init=False)  # (heads, sinks, windows): mass on sinks ∪ recent
    profile: torch.Tensor = field(init=False)  # (heads, T): attention each key receives (H2O's score)

    def __post_init__(self) -> None:
        h = self.heads
        self.entropy = torch.zeros(h, dtype=torch.float64)
        self.norm_entropy = torch.zeros(h, dtype=torch.float64)
        self.heavy = torch.zeros(h, dtype=torch.float64)
        self.sink = torch.zeros(h, len(SINK_COUNTS), dtype=torch.float64)
        self.cover = torch.zeros(h, len(SINK_COUNTS), len(RECENT_WINDOWS), dtype=torch.float64)
        self.profile = torch.zeros(h, self.tokens, dtype=torch.float64)


def _mass_before(prefix: torch.Tensor, kpos: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attention mass on keys with position < pos, per query.

    prefix: (heads, c, T + 1) cumulative mass with a leading 0 along position-sorted keys; kpos (T,)
    increasing; pos (c,) → (heads, c).
    """
    j = torch.searchsorted(kpos, pos)  # (c,): how many keys lie before pos
    return prefix.gather(-1, j.expand(prefix.shape[0], -1)[..., None])[..., 0]


def _sink_and_cover(probs: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass on the first s positions (heads, S) and on sinks ∪ recent window (heads, S, W), summed over
    the chunk's queries. From one prefix sum: sinks ∪ recent = total − mass in the gap [s, q − w + 1)."""
    h, c, _ = probs.shape
    prefix = torch.cat([probs.new_zeros(h, c, 1), probs.cumsum(dim=-1)], dim=-1)  # (heads, c, T + 1)
    total = prefix[..., -1]  # (heads, c)
    sink = torch.stack([_mass_before(prefix, kpos, torch.full_like(qpos, s)) for s in SINK_COUNTS], -1)
    start = torch.stack([_mass_before(prefix, kpos, qpos - w + 1) for w in RECENT_WINDOWS], -1)
    gap = (start[:, :, None, :] - sink[..., None]).clamp_min(0.0)  # (heads, c, S, W)
    return sink.sum(dim=1), (total[..., None, None] - gap).sum(dim=1)


def _accumulate(sums: _Sums, probs: torch.Tensor, qpos: torch.Tensor, vis: torch.Tensor,
                kpos: torch.Tensor) -> None:
    """Add one chunk. probs: (q_heads, c, T); vis: (c, T)."""
    n_vis = vis.sum(dim=-1).to(torch.float64)  # (c,)
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1).double()  # (heads, c)
    log_n = torch.log(n_vis.clamp_min(1.0))
    sums.entropy += ent.sum(dim=1)
    sums.norm_entropy += torch.where(log_n > 0, ent / log_n.clamp_min(1e-30), torch.zeros_like(ent)).sum(1)
    cum = probs.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (heads, c, T)
    need = ((cum < COVER).sum(dim=-1) + 1).double()  # keys to reach COVER, per query
    sums.heavy += torch.where(n_vis > 0, need / n_vis.clamp_min(1.0), torch.zeros_like(need)).sum(dim=1)
    sink, cover = _sink_and_cover(probs, qpos, kpos)
    sums.sink += sink.double()
    sums.cover += cover.double()
    sums.profile += probs.sum(dim=1).double()
    sums.n += probs.shape[1]


def _sink_recommendation(sink_mass: np.ndarray) -> int:
    """How many leading tokens to keep as sinks: 0 unless a few of them are over-attended.

    sink_mass: (len(SINK_COUNTS),) mean over heads of the mass on the first s tokens. The smallest s
    holding 90 % of what the first 16 get, provided each of those s tokens averages ≥ SINK_MIN of the
    mass — a real sink (StreamingLLM) is a handful of tokens with a large share each, not a prefix
    that merely gets its uniform share.
    """
    top = sink_mass[-1]
    for s, m in zip(SINK_COUNTS, sink_mass, strict=True):
        if s and m >= COVER * top and m >= SINK_MIN * s:
            return s
    return 0


def _recommend(sink: np.ndarray, cover: np.ndarray, heavy: np.ndarray, tokens: int) -> dict[str, Any]:
    """Eviction recommendation from sink (heads, S), cover (heads, S, W), heavy-hitter fractions (heads,)."""
    sinks = _sink_recommendation(sink.mean(axis=0))
    row = cover.mean(axis=0)[SINK_COUNTS.index(sinks)]  # (W,)
    recent = next((w for w, m in zip(RECENT_WINDOWS, row, strict=True) if m >= COVER and w < tokens), None)
    covered = float(row[RECENT_WINDOWS.index(recent)]) if recent else None
    keep = float(heavy.max())  # a uniform per-head budget must satisfy the most spread-out head
    static = (sinks + recent) / tokens if recent else None
    return {
        "sinks": sinks,
        "recent": recent,  # None: no sink + window cache holds COVER; heavy hitters must be kept
        "sink_recent_mass": covered,
        "sink_recent_fraction": static,
        "keep_fraction": keep,
        "keep_fraction_mean": float(heavy.mean()),
        "method": "sink+recent" if static is not None and static <= STATIC_SLACK * keep else "heavy-hitters",
    }


def analyze_attention(queries: torch.Tensor, keys: torch.Tensor, qpos: np.ndarray, kpos: np.ndarray,
                      scaling: float, window: int = 0, kept: np.ndarray | None = None
                      ) -> tuple[dict[str, Any], torch.Tensor]:
    """Attention section of one layer and the per-head key-importance profile.

    queries: (q_heads, Tq, d), keys: (kv_heads, T, d), qpos (Tq,), kpos (T,) absolute positions; kept
    (kv_heads, T) bool: rows that exist in a decompressed evicted cache (the others get no attention).
    Returns (section, profile (q_heads, T) float64 summing to 1 per head).
    """
    qp, kp = torch.from_numpy(np.asarray(qpos, np.int64)), torch.from_numpy(np.asarray(kpos, np.int64))
    sums = _Sums(heads=queries.shape[0], tokens=keys.shape[1])
    mask = torch.from_numpy(np.asarray(kept, dtype=bool)) if kept is not None else None
    for probs, qc, vis in attention_chunks(queries, keys, qp, kp, scaling, window, kept=mask):
        _accumulate(sums, probs, qc, vis, kp)
    n = max(sums.n, 1)
    cover = (sums.cover / n).numpy()  # (heads, S, W)
    sink = (sums.sink / n).numpy()  # (heads, S)
    heavy = (sums.heavy / n).numpy()
    s4, r64 = SINK_COUNTS.index(SINKS), RECENT_WINDOWS.index(RECENT)
    section = {
        "num_queries": sums.n,
        "entropy": (sums.entropy / n).tolist(),
        "entropy_normalized": (sums.norm_entropy / n).tolist(),
        "sink_tokens": SINKS,
        "sink_mass": sink[:, s4].tolist(),
        "sink_mass_by_count": {str(s): sink[:, i].tolist() for i, s in enumerate(SINK_COUNTS)},
        "recent_window": RECENT,
        "local_mass": cover[:, 0, r64].tolist(),
        "old_mass": (1.0 - cover[:, s4, r64]).tolist(),
        "heavy_hitter_fraction": heavy.tolist(),
        "cover": {"sinks": list(SINK_COUNTS), "windows": list(RECENT_WINDOWS), "mass": cover.tolist()},
        "recommendation": _recommend(sink, cover, heavy, keys.shape[1]),
    }
    profile = sums.profile / sums.profile.sum(dim=1, keepdim=True).clamp_min(1e-300)
    return section, profile

