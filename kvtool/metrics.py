"""Reconstruction and attention metrics, defined once for every command.

Reconstruction (``x``, ``x_hat`` of shape ``(heads, tokens, head_dim)``):

* ``rel_mse = Σ‖x − x̂‖² / Σ‖x‖²`` (for unit vectors: TurboQuant's D_mse, arXiv 2504.19874 §2);
* ``cosine`` = mean over token rows of cos(x, x̂).

Attention (captured queries ``q`` ``(q_heads, Tq, head_dim)`` at absolute positions ``query_positions``;
keys/values at ``key_positions``; query head ``j`` reads KV head ``j // (q_heads // kv_heads)`` (GQA);
logits ``S = scaling · q kᵀ`` with the model's scaling, default ``head_dim ** -0.5``; a key is visible to
a query iff ``key_pos <= query_pos`` and, for a sliding-window layer, ``key_pos > query_pos − window``):

* ``attention_logit_rel_error = ‖Ŝ − S‖ / ‖S‖`` over visible entries;
* ``attention_kl`` = mean over (head, query) of KL(p ‖ p̂), ``p = softmax(S)``;
* ``topk_overlap`` = mean over (head, query) of |top-k(p) ∩ top-k(p̂)| / min(k, visible keys);
* ``attention_output_rel_error = ‖p̂ V̂ − p V‖ / ‖p V‖`` — what the next layer actually sees;
* ``attention_output_cosine`` = mean over (head, query) of cos(p V, p̂ V̂).

Evicted keys (``key_mask`` False, from token-selection codecs) are removed from p̂ and from the logit error;
KL floors their log-probability at ``log(1e-12)`` so a dropped key with real mass costs a finite amount.
Everything is computed in torch float32, one KV head and a bounded block of queries at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ATTENTION_KEYS = (
    "attention_logit_rel_error",
    "attention_kl",
    "topk_overlap",
    "attention_output_rel_error",
    "attention_output_cosine",
)
LOG_FLOOR = math.log(1e-12)
BLOCK_ELEMENTS = 1 << 22  # logits per block: 16 MiB of float32


def _safe_ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def reconstruction(x: np.ndarray, x_hat: np.ndarray) -> dict[str, object]:
    """``rel_mse`` and ``cosine`` of ``x_hat`` vs ``x`` (both ``(heads, tokens, head_dim)``), total and
    per head (``heads``: a list of ``{"rel_mse", "cosine"}``)."""
    a = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    b = torch.from_numpy(np.ascontiguousarray(x_hat, dtype=np.float32))
    err = (a - b).square().sum(dim=(1, 2)).double()  # (heads,)
    ref = a.square().sum(dim=(1, 2)).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).double()  # (heads, tokens)
    heads = [
        {"rel_mse": float(e / r) if r > 0 else float(e > 0), "cosine": float(c.mean()) if c.numel() else 1.0}
        for e, r, c in zip(err, ref, cos, strict=True)
    ]
    total_ref = float(ref.sum())
    return {
        "rel_mse": float(err.sum()) / total_ref if total_ref > 0 else float(err.sum() > 0),
        "cosine": float(cos.mean()) if cos.numel() else 1.0,
        "heads": heads,
    }


@dataclass
class _Sums:
    """Running sums of one KV head's query group."""

    logit_err: float = 0.0
    logit_ref: float = 0.0
    kl: float = 0.0
    overlap: float = 0.0
    out_err: float = 0.0
    out_ref: float = 0.0
    out_cos: float = 0.0
    rows: int = 0

    def add(self, other: _Sums) -> None:
        for name in ("logit_err", "logit_ref", "kl", "overlap", "out_err", "out_ref", "out_cos", "rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def result(self) -> dict[str, float]:
        rows = max(self.rows, 1)
        return {
            "attention_logit_rel_error": _safe_ratio(self.logit_err, self.logit_ref),
            "attention_kl": self.kl / rows,
            "topk_overlap": self.overlap / rows,
            "attention_output_rel_error": _safe_ratio(self.out_err, self.out_ref),
            "attention_output_cosine": self.out_cos / rows,
        }


def visibility(
    query_positions: np.ndarray, key_positions: np.ndarray, sliding_window: int = 0
) -> torch.Tensor:
    """Boolean ``(Tq, Tk)``: causal (``key <= query``) and, if ``sliding_window > 0``, within the window."""
    qp = torch.as_tensor(np.asarray(query_positions), dtype=torch.int64)[:, None]
    kp = torch.as_tensor(np.asarray(key_positions), dtype=torch.int64)[None, :]
    visible = kp <= qp
    if sliding_window and sliding_window > 0:
        visible &= kp > qp - sliding_window
    return visible


def _block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor,
           visible: torch.Tensor, kept: torch.Tensor, scaling: float, topk: int) -> _Sums:
    """Sums for queries ``q`` ``(g, c, d)`` of one KV head (``k, v, k_hat, v_hat`` ``(Tk, d)``),
    ``visible`` ``(c, Tk)``, ``kept`` ``(Tk,)``."""
    s = torch.matmul(q, k.T) * scaling  # (g, c, Tk)
    s_hat = torch.matmul(q, k_hat.T) * scaling
    vis_hat = visible & kept  # (c, Tk)
    logit_err = torch.where(vis_hat, s_hat - s, 0.0).square().sum()
    logit_ref = torch.where(vis_hat, s, 0.0).square().sum()
    s, s_hat = s.masked_fill(~visible, -math.inf), s_hat.masked_fill(~vis_hat, -math.inf)
    logp, logp_hat = torch.log_softmax(s, dim=-1), torch.log_softmax(s_hat, dim=-1)
    p = logp.exp()
    p_hat = torch.nan_to_num(logp_hat.exp())  # a query with every visible key evicted attends to nothing
    kl = torch.where(visible, p * (logp - logp_hat.clamp(min=LOG_FLOOR)), 0.0).sum(-1)  # (g, c)
    k_eff = min(topk, k.shape[0])
    top = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, s.topk(k_eff, dim=-1).indices, True)
    top_hat = torch.zeros_like(top).scatter_(-1, s_hat.topk(k_eff, dim=-1).indices, True)
    hits = (top & top_hat & vis_hat).sum(-1).double()
    overlap = hits / visible.sum(-1).clamp(max=k_eff, min=1).double()  # (g, c) / (c,)
    out = torch.matmul(p, v)  # (g, c, d)
    out_hat = torch.matmul(p_hat, v_hat)
    cos = torch.nn.functional.cosine_similarity(out, out_hat, dim=-1, eps=1e-12)
    return _Sums(float(logit_err), float(logit_ref), float(kl.sum()), float(overlap.sum()),
                 float((out_hat - out).square().sum()), float(out.square().sum()), float(cos.sum()),
                 int(cos.numel()))


def attention(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    keys_hat: np.ndarray,
    values_hat: np.ndarray,
    query_positions: np.ndarray,
    key_positions: np.ndarray,
    *,
    scaling: float | None = None,
    sliding_window: int = 0,
    key_mask: np.ndarray | None = None,
    topk: int = 8,
) -> dict[str, object]:
    """Attention-score and attention-output metrics of compressed keys/values (see module docstring).

    queries ``(q_heads, Tq, d)``; keys, values, keys_hat, values_hat ``(kv_heads, Tk, d)``;
    query_positions ``(Tq,)``; key_positions ``(Tk,)``; key_mask ``(kv_heads, Tk)`` bool or None.
    Returns the totals of :data:`ATTENTION_KEYS`, ``topk`` and ``heads``: the same metrics per KV head
    (aggregated over the query heads that read it).
    """
    q_heads, n_q, dim = queries.shape
    kv_heads, n_k, _ = keys.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    group = q_heads // kv_heads
    scale = dim**-0.5 if scaling is None else float(scaling)
    t = {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for name, a in
         (("q", queries), ("k", keys), ("v", values), ("kh", keys_hat), ("vh", values_hat))}
    visible = visibility(query_positions, key_positions, sliding_window)  # (Tq, Tk)
    kept = (torch.from_numpy(np.asarray(key_mask, dtype=bool)) if key_mask is not None
            else torch.ones(kv_heads, n_k, dtype=torch.bool))
    chunk = max(1, BLOCK_ELEMENTS // max(group * n_k, 1))
    total, heads = _Sums(), []
    for h in range(kv_heads):
        sums = _Sums()
        for start in range(0, n_q, chunk):
            stop = min(start + chunk, n_q)
            sums.add(_block(t["q"][h * group:(h + 1) * group, start:stop], t["k"][h], t["v"][h], t["kh"][h],
                            t["vh"][h], visible[start:stop], kept[h], scale, topk))
        total.add(sums)
        heads.append(sums.result())
    return {**total.result(), "topk": topk, "heads": heads}
