"""Similarity: across the heads of a layer, and between a layer and the previous one analysed.

Two measures, because they answer different questions:

* cosine, per token, between matching vectors (mean over tokens). High cosine means the states could
  be stored once and rescaled — what MiniCache (arXiv 2405.14366, §3) does for adjacent layers of the
  middle-to-deep half, merging each token's pair by direction and keeping magnitudes apart;
* linear CKA (Kornblith et al., 2019; debiased) between (tokens, channels) matrices. CKA is invariant to
  orthogonal transforms and isotropic scaling, so high CKA with low cosine means the layers carry the
  same information in different coordinates: sharable only through a learned projection.

Attention patterns are compared through each query head's key-importance profile (the mass every
key receives, summed over the captured queries — H2O's accumulated score), which is what decides
whether two layers would evict the same tokens.

The adjacent-layer comparison keeps only the previous layer's arrays (:class:`AdjacentLayers`), so
analysis memory stays at two layers however many layers the file holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SHARE_COSINE = 0.9  # both keys and values this close in direction → a cross-layer sharing candidate


def _row_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram diagonal a (T,) and K̃·1 (T,) of the heads of x (heads, T, d) side by side, in float64."""
    a = torch.zeros(x.shape[1], dtype=torch.float64)
    k1 = torch.zeros_like(a)
    for head in x:
        h = head.to(torch.float64)  # (T, d): one head at a time keeps the float64 copy small
        a += h.square().sum(dim=1)
        k1 += h @ h.sum(dim=0)
    return a, k1 - a


def _cross_frobenius(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖XᵀY‖²_F of the heads side by side, X = [x_0 … x_H], as Σ_ij ‖x_iᵀ y_j‖², one pair at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for xi in x:
        xd = xi.to(torch.float64)
        for yj in y:
            total += (xd.T @ yj.to(torch.float64)).square().sum()
    return total


def _hsic_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of linear kernels K = XXᵀ, L = YYᵀ (Song et al., 2012) in O(T·p·q), never forming
    the (T, T) Gram matrices: with the diagonals zeroed, K̃ = K − diag(a), a_i = ‖X_i‖².

    x: (heads, T, d), y: (heads', T, d'), each read as its heads side by side.
    """
    n = x.shape[1]
    a, k1 = _row_terms(x)
    b, l1 = _row_terms(y)
    tr_kl = _cross_frobenius(x, y) - (a * b).sum()
    return (tr_kl + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Debiased linear CKA of x and y: (tokens, p) matrices, or (heads, tokens, d) read as the heads side
    by side. 1 for identical, ≈ 0 for unrelated; 0 for constant data or fewer than 4 tokens.

    The plain (biased) estimator gives unrelated data about p / (T + p) — 0.2 for 64 channels over 256
    tokens, more for whole layers — so the unbiased HSIC is used.
    """
    x, y = (x[None] if x.dim() == 2 else x), (y[None] if y.dim() == 2 else y)
    if x.shape[1] < 4:
        return 0.0
    den = _hsic_unbiased(x, x) * _hsic_unbiased(y, y)
    return float(_hsic_unbiased(x, y) / den.sqrt()) if den > 0 else 0.0


def token_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over tokens of cos(x_t, y_t); x, y: (tokens, d). Zero vectors count as 0."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    den = x.norm(dim=-1) * y.norm(dim=-1)
    cos = torch.where(den > 0, (x * y).sum(dim=-1) / den.clamp_min(1e-300), torch.zeros_like(den))
    return float(cos.mean()) if cos.numel() else 0.0


def _mean_offdiag(m: np.ndarray) -> float | None:
    n = m.shape[0]
    return float((m.sum() - np.trace(m)) / (n * (n - 1))) if n > 1 else None


def head_similarity(x: torch.Tensor) -> dict[str, Any]:
    """Pairwise cosine and CKA between the heads of one layer; x: (heads, tokens, d)."""
    h = x.shape[0]
    cka, cos = np.eye(h), np.eye(h)
    for a in range(h):
        for b in range(a + 1, h):
            cka[a, b] = cka[b, a] = linear_cka(x[a], x[b])
            cos[a, b] = cos[b, a] = token_cosine(x[a], x[b])
    return {"cka": cka.tolist(), "cosine": cos.tolist(),
            "mean_cka": _mean_offdiag(cka), "mean_cosine": _mean_offdiag(cos)}


def profile_cosine(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of key-importance profiles: (heads, T), (heads, T) → (heads,)."""
    den = p.norm(dim=-1) * q.norm(dim=-1)
    return torch.where(den > 0, (p * q).sum(dim=-1) / den.clamp_min(1e-300), torch.zeros_like(den))


def attention_head_similarity(profile: torch.Tensor) -> dict[str, Any]:
    """Cosine between the key-importance profiles of every pair of query heads; profile: (q_heads, T)."""
    unit = profile / profile.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    m = (unit @ unit.T).numpy()
    return {"cosine": m.tolist(), "mean_cosine": _mean_offdiag(m)}


@dataclass
class LayerState:
    """What the adjacent-layer comparison keeps of a layer: keys, values (kv_heads, T, d), positions (T,),
    key-importance profile (q_heads, T) or None."""

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: np.ndarray
    profile: torch.Tensor | None


def _per_head(prev: torch.Tensor, cur: torch.Tensor) -> dict[str, Any]:
    """Cosine and CKA of matching heads, and CKA of the whole layer; (heads, T, d) each, aligned."""
    h = cur.shape[0]
    cos = [token_cosine(prev[i], cur[i]) for i in range(h)]
    cka = [linear_cka(prev[i], cur[i]) for i in range(h)]
    joint = linear_cka(prev, cur)  # the layer's heads side by side, (T, heads·d)
    return {"cosine": cos, "cka": cka, "mean_cosine": float(np.mean(cos)), "mean_cka": float(np.mean(cka)),
            "layer_cka": joint}


def compare_layers(prev: LayerState, cur: LayerState) -> dict[str, Any]:
    """Similarity of ``cur`` to ``prev`` on the token positions both hold (sliding layers may differ)."""
    common, ip, ic = np.intersect1d(prev.positions, cur.positions, return_indices=True)
    out: dict[str, Any] = {"previous_layer": prev.layer, "common_tokens": int(len(common))}
    if len(common) < 2:
        out["note"] = "fewer than 2 token positions in common: not compared"
        out["sharing_candidate"] = False
        return out
    same = len(common) == len(prev.positions) == len(cur.positions)  # the usual case: no copies

    def align(a: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        return a if same else a[:, torch.from_numpy(idx)]

    out["keys"] = _per_head(align(prev.keys, ip), align(cur.keys, ic))
    out["values"] = _per_head(align(prev.values, ip), align(cur.values, ic))
    if prev.profile is not None and cur.profile is not None:
        cos = profile_cosine(align(prev.profile, ip), align(cur.profile, ic))
        out["attention"] = {"cosine": cos.tolist(), "mean_cosine": float(cos.mean())}
    out["sharing_candidate"] = bool(out["keys"]["mean_cosine"] >= SHARE_COSINE
                                    and out["values"]["mean_cosine"] >= SHARE_COSINE)
    return out


class AdjacentLayers:
    """Compares each layer with the one analysed just before it, holding only that one layer."""

    def __init__(self) -> None:
        self._prev: LayerState | None = None

    def step(self, state: LayerState) -> dict[str, Any] | None:
        """Compare ``state`` with the previous layer (None for the first), then keep ``state`` instead."""
        prev, self._prev = self._prev, state
        return None if prev is None else compare_layers(prev, state)


def analyze_heads(keys: torch.Tensor, values: torch.Tensor, profile: torch.Tensor | None) -> dict[str, Any]:
    """Within-layer section: keys, values (kv_heads, T, d); profile (q_heads, T) or None."""
    out = {"keys": head_similarity(keys), "values": head_similarity(values)}
    if profile is not None:
        out["attention"] = attention_head_similarity(profile)
    return out
