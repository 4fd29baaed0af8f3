"""Spectrum: how low-rank are the keys and values of a layer?

Singular values of each head's (tokens, head_dim) matrix give the energy a rank-k projection keeps:
``energy(k) = Σ_{i<k} s_i² / Σ s_i²``. The effective rank at p % energy is the smallest k with
``energy(k) >= p``, so a rank-k codec (a per-head PCA basis, as in Palu or Loki) loses at most
``1 - p`` of the squared norm. The same is done jointly across the heads of a layer, with the heads'
channels side by side ``(tokens, heads * head_dim)``: when the joint rank is well below the sum of
the per-head ranks, heads share directions and a group-head basis saves more than per-head ones.

Keys in the store are post-RoPE (what the cache holds). RoPE rotates each channel pair by a
position-dependent angle, which spreads a low-rank pre-RoPE subspace over more directions, so the
pre- vs post-RoPE comparison needs pre-RoPE keys; it runs only when a layer group holds them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvtool.store import KEYS_PREROPE

ENERGIES: tuple[float, ...] = (0.90, 0.95, 0.99)
RECOMMEND_ENERGY = 0.95  # the energy a recommended rank keeps: rel. MSE ≤ 5 % before any quantization
LOW_RANK_WORTH = 0.5  # recommend low rank only when it at least halves head_dim


TOKEN_CHUNK = 2048  # tokens converted to float64 at a time: temporaries stay a fraction of a layer


def gram(x: torch.Tensor, joint: bool = False) -> torch.Tensor:
    """xᵀx in float64, accumulated over chunks of tokens.

    x: (heads, tokens, d) → (heads, d, d) per head, or with ``joint`` the (heads·d, heads·d) Gram of the
    heads side by side. Never holds more than TOKEN_CHUNK tokens in float64.
    """
    h, t, d = x.shape
    g = torch.zeros((h * d, h * d) if joint else (h, d, d), dtype=torch.float64)
    for s in range(0, t, TOKEN_CHUNK):
        c = x[:, s:s + TOKEN_CHUNK].to(torch.float64)  # (heads, c, d)
        if joint:
            c = c.permute(1, 0, 2).reshape(-1, h * d)  # (c, heads·d)
        g += c.transpose(-1, -2) @ c
    return g


def gram_singular_values(g: torch.Tensor, tokens: int) -> torch.Tensor:
    """Singular values, descending, from Gram matrices (..., n, n) → (..., min(tokens, n)).

    s² are the Gram's eigenvalues; float64 keeps the energy fractions the 99 % threshold needs accurate
    to far better than 1e-6 even though squaring doubles the dynamic range.
    """
    ev = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0.0)
    return ev[..., :min(tokens, g.shape[-1])].sqrt()


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of each head, descending: (heads, tokens, d) → (heads, min(tokens, d))."""
    return gram_singular_values(gram(x), x.shape[1])


def energy_fractions(s: torch.Tensor) -> torch.Tensor:
    """Fraction of the total energy per component: (..., k) → (..., k), summing to 1 (0 for zero data)."""
    e = s.to(torch.float64) ** 2
    total = e.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, e / total.clamp_min(1e-300), torch.zeros_like(e))


def effective_rank(s: torch.Tensor, energy: float) -> torch.Tensor:
    """Smallest k keeping ``energy`` of the squared norm: (..., k) singular values → (...,) int64.

    Zero data has rank 0. A 1e-6 slack keeps exact rank-r data at r despite float32 rounding.
    """
    frac = energy_fractions(s)
    cum = frac.cumsum(dim=-1)
    rank = (cum < energy - 1e-6).sum(dim=-1) + 1
    return torch.where(frac.sum(dim=-1) > 0, rank, torch.zeros_like(rank))


def _ranks(s: torch.Tensor) -> dict[str, list[int] | int]:
    """Effective ranks at every energy in ENERGIES, keyed ``rank90`` etc."""
    return {f"rank{round(p * 100)}": effective_rank(s, p).tolist() for p in ENERGIES}


def tensor_spectrum(x: torch.Tensor) -> dict[str, Any]:
    """Per-head and joint spectrum figures of keys or values x: (heads, tokens, d)."""
    tokens = x.shape[1]
    s = singular_values(x)  # (heads, min(tokens, d))
    joint = gram_singular_values(gram(x, joint=True), tokens)  # (min(T, heads·d),)
    per_head = _ranks(s)
    joint_ranks = _ranks(joint)
    return {
        "per_head": per_head,
        "joint": joint_ranks,
        # joint / Σ per-head at 95 %: < 1 means heads share directions (group-head low rank pays)
        "joint_vs_sum_per_head": _ratio(joint_ranks["rank95"], sum(per_head["rank95"])),
        "energy": energy_fractions(s).tolist(),  # (heads, k): the spectrum the plots draw
    }


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def recommended_rank(spec: dict[str, Any]) -> int:
    """One rank for every head of the layer: the largest per-head rank at RECOMMEND_ENERGY."""
    return int(max(spec["per_head"][f"rank{round(RECOMMEND_ENERGY * 100)}"]))


def prerope_comparison(pre: np.ndarray | None, keys: torch.Tensor) -> dict[str, Any]:
    """Effective ranks of pre- vs post-RoPE keys, when the layer holds ``keys_prerope``.

    pre: (kv_heads, tokens, d) or None (captured without ``--pre-rope-keys``); keys: the same, post-RoPE.
    """
    if pre is None:
        return {"available": False,
                "note": f"no '{KEYS_PREROPE}' in this layer (capture with --pre-rope-keys): "
                        "pre- vs post-RoPE comparison skipped"}
    return {"available": True, "prerope": _ranks(singular_values(torch.from_numpy(pre))),
            "postrope": _ranks(singular_values(keys))}


def analyze_spectrum(keys: torch.Tensor, values: torch.Tensor, keys_prerope: np.ndarray | None = None
                     ) -> dict[str, Any]:
    """Spectrum section of one layer. keys, values, keys_prerope: (kv_heads, tokens, d) float32."""
    d = keys.shape[-1]
    k_spec, v_spec = tensor_spectrum(keys), tensor_spectrum(values)
    rank_k, rank_v = recommended_rank(k_spec), recommended_rank(v_spec)
    return {
        "keys": k_spec,
        "values": v_spec,
        "recommended_rank": {"keys": rank_k, "values": rank_v, "energy": RECOMMEND_ENERGY},
        "low_rank_worth_it": {"keys": rank_k <= LOW_RANK_WORTH * d, "values": rank_v <= LOW_RANK_WORTH * d},
        "prerope": prerope_comparison(keys_prerope, keys),
    }
