"""``lowrank`` — a mean-centred PCA basis per KV head (or group of heads); tokens stored as coefficients.

Low-rank KV compression disagrees on where the basis comes from; this codec lets each choice be
measured on a real cache, counting the bytes really stored (not zeroed channels):

* **Basis from the cache itself**, per layer and head (ShadowKV, arXiv 2410.21465 §3.1, fits pre-RoPE
  keys per prompt; Eigen Attention, arXiv 2408.05646 §3, fits on calibration data). ``compress --fit-on
  CALIB.h5`` fits on another cache instead and applies the basis here.
* **Grouped heads**: ``group=g`` decomposes ``g`` heads jointly — their vectors concatenated, one basis of
  ``g·d`` dims and ``rank`` shared latent coefficients (Palu's group-head low-rank decomposition, arXiv
  2407.21118 §3.2); ``group=all`` is fully joint (xKV, arXiv 2503.18893, shares a subspace across
  layers; here across the heads of a layer).
* **Pre-RoPE keys** (``prerope=true``): RoPE mixes channel pairs at position-dependent angles and raises
  the rank (ShadowKV §3.1; Palu §3.3). The basis is fitted on the captured pre-RoPE keys and tokens
  are coded un-rotated; decode re-applies the model's rotary embedding (recorded by capture) at the
  stored absolute positions.
* **Query-aware basis** (``weight=queries``, keys only): minimise the error of ``q·k`` over the cache's
  recorded queries rather than the error of ``k`` — with ``M = E[q qᵀ]`` over the query heads reading
  this KV head, ``E_q[(q·(k − k̂))²] = (k − k̂)ᵀ M (k − k̂)``, so PCA runs on keys whitened by ``M^½``
  (Eigen Attention §3 weights its calibration the same way in spirit). The coder projects with ``M^½U``
  and the decoder rebuilds with ``M^−½U`` (an oblique projection), both stored.
* **Attention-weighted basis** (``weight=attention``): each token's squared error is weighted by the
  attention it receives from the recorded queries (plus a uniform floor), so the basis spends its rank
  on the tokens attention reads; for values this is the error the attention output sees.
* **Attention sinks** (``sink=n``, default 1): the first ``n`` stored tokens are kept exact in fp16 and
  left out of the fit. Token 0 draws a large share of attention and is an outlier a basis fitted on
  the rest cannot hold; inside the basis it costs far more than its 2·d bytes.

Stored per tensor: ``sink_rows`` ``(heads, n, d)`` fp16 and ``coeffs`` ``(groups, T − n, rank)`` fp16
(or, chained as ``lowrank:…+turboquant:bits=4``, whatever the next codec stores for the coefficients;
its head_dim is then ``rank``). Shared state, once per layer and tensor: ``mean`` ``(groups, g·d)`` and
``basis`` ``(groups, g·d, rank)`` fp16, plus ``projection`` (the coder, ``weight=queries`` only) and
``rope_inv_freq``/``rope_attention_factor`` (``prerope=true``). Meta: ``rank`` and, for
``prerope``, ``key_start``.

``energy=e`` picks, per layer, the smallest rank at which every basis keeps at least ``e`` of its
fitting data's (centred, weighted) energy; coefficients form one ``(groups, tokens, rank)`` tensor so
any quantizer can follow, so one rank serves all heads of a layer and heads that needed fewer keep more.
The report (``resolved``) gives ``rank`` and, per basis (per KV head, or per group of heads),
``rank_needed`` (with ``energy``) and ``energy_kept``, the share of the fitting data's energy it keeps.
With neither ``rank`` nor ``energy`` the default is ``energy=0.9`` (:data:`DEFAULT_ENERGY`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from kvtool.codecs.base import Encoded, LayerContext, Stage, check_input, register
from kvtool.errors import CodecError
from kvtool.metrics import visibility
from kvtool.rope import RopeParams

DEFAULT_ENERGY = 0.9
MAX_SINK = 1 << 16
#: Ridge added to the queries' second moment, relative to its mean eigenvalue: directions no recorded
#: query used still count a little, so the basis does not discard them outright for future queries.
QUERY_RIDGE = 1e-2
#: Share of the token weights spread uniformly under ``weight=attention``: the recorded queries are the
#: last few positions only, and a basis fitted on what they read alone would ignore everything else.
ATTENTION_FLOOR = 0.5
CAPTURE_HINT = "capture with `kvtool capture --pre-rope-keys` (kvtool records the RoPE parameters with it)"


@register
@dataclass
class LowRank(Stage):
    """``lowrank:rank=R|energy=E,sink=1,weight=none,group=1,prerope=false`` — PCA per head, R coefficients.

    The basis (mean-centred, per KV head or group of heads) is shared state; the first ``sink`` tokens
    stay exact; pre-RoPE, query- and attention-weighted options (module docstring)."""

    rank: int | None = None
    energy: float | None = None
    sink: int = 1
    weight: Literal["none", "queries", "attention"] = "none"
    group: str = "1"
    prerope: bool = False
    name: ClassVar[str] = "lowrank"
    #: A basis or codebook is fitted on the whole prompt: not coded token by token as a cache grows.
    streaming: ClassVar[bool] = False
    payload_name: ClassVar[str] = "coeffs"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._mean: np.ndarray | None = None  # (groups, g*d) float32
        self._basis: np.ndarray | None = None  # decoder (groups, g*d, r)
        self._projection: np.ndarray | None = None  # coder (groups, g*d, r); None = the basis
        self._rope: RopeParams | None = None
        self._loaded = False
        self._key_start = 0
        self._fit_report: dict[str, object] = {}

    # -- parameters ---------------------------------------------------------------------------------
    def validate(self, head_dim: int | None = None) -> None:
        if self.rank is not None and self.energy is not None:
            raise CodecError("give rank=R or energy=E, not both")
        g = self._group_number()
        if self.rank is not None:
            top = None if head_dim is None or g is None else g * head_dim
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1 or (
                    top is not None and self.rank > top):
                allowed = f"1..{top}" if top is not None else "1..head_dim" + ("·group" if g != 1 else "")
                raise CodecError(f"rank must be one of {allowed}, got {self.rank}")
        if self.energy is not None and not (0.0 < float(self.energy) <= 1.0):
            raise CodecError(f"energy must be in (0, 1], got {self.energy:g}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or not 0 <= self.sink <= MAX_SINK:
            raise CodecError(f"sink must be one of 0..{MAX_SINK}, got {self.sink}")
        if self.weight not in ("none", "queries", "attention"):
            raise CodecError(f"weight must be one of none, queries, attention, got {self.weight}")
        if not isinstance(self.prerope, bool):
            raise CodecError(f"prerope must be one of true, false, got {self.prerope}")
        if self.prerope and self.weight == "queries":
            raise CodecError("weight=queries needs post-RoPE keys (the recorded queries are post-RoPE); "
                             "use prerope=false or weight=none|attention")

    def _group_number(self) -> int | None:
        """``g`` of ``group=g``; ``None`` for ``group=all`` (known from the tensor)."""
        text = str(self.group).strip().lower()
        if text == "all":
            return None
        if not text.isdigit() or int(text) < 1:
            raise CodecError(f"group must be a positive integer dividing the kv-head count, or all; got {self.group}")
        return int(text)

    def _group_size(self, heads: int) -> int:
        g = self._group_number()
        if g is None:
            return heads
        if heads % g:
            allowed = ", ".join(str(k) for k in range(1, heads + 1) if heads % k == 0)
            raise CodecError(f"group must divide the kv-head count {heads} (one of {allowed}, all), got {g}")
        return g

    def payload_dim(self, head_dim: int | None) -> int | None:
        return self.rank

    def uses_queries(self) -> bool:
        return self.weight in ("queries", "attention")

    def for_role(self, role: str) -> LowRank:
        codec = super().for_role(role)
        if role == "values" and self.weight == "queries":
            raise CodecError("weight=queries is for keys (it weights the error of q·k); for values use "
                             "weight=attention (--keys SPEC --values SPEC give each its own)")
        if role == "values" and self.prerope:
            raise CodecError("prerope=true applies to keys only (values carry no RoPE); give the values their "
                             "own spec with --values")
        return codec  # type: ignore[return-value]

    # -- fitting ------------------------------------------------------------------------------------
    def _sink(self, tokens: int) -> int:
        return min(self.sink, tokens)

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> LowRank:
        """Fit the basis to ``x`` ``(heads, tokens, head_dim)`` (or its pre-RoPE keys) unless a basis was
        restored with :meth:`load_shared_state`; always bind the tensor's key positions."""
        x = check_input(x)
        heads, tokens, d = x.shape
        self.validate(d)
        g = self._group_size(heads)
        ctx = context or LayerContext()
        if ctx.role == "values" and (self.weight == "queries" or self.prerope):
            self.for_role("values")  # raises the role error
        positions = ctx.key_positions if ctx.key_positions is not None else np.arange(tokens)
        if self.prerope and len(positions) != tokens:
            raise CodecError("prerope=true needs the tensor's own token positions; it cannot follow a stage that "
                             "drops tokens (a token selector)")
        self._key_start = int(positions[0]) if len(positions) else 0
        if self.prerope and not self._loaded:
            # the RoPE parameters are needed; the pre-RoPE keys are recorded by capture, or (a model's cache
            # in CodecCache) recovered from the post-RoPE keys by rotating them back (RoPE is orthogonal)
            if ctx.rope is None:
                missing = " and ".join(what for what, have in (("pre-RoPE keys (keys_prerope)", ctx.keys_prerope),
                                                                ("RoPE parameters", ctx.rope)) if have is None)
                raise CodecError(f"prerope=true needs the cache's pre-RoPE keys and RoPE parameters, but layer "
                                 f"{ctx.layer} has no {missing}; {CAPTURE_HINT}")
            self._rope = ctx.rope
        if self.prerope:
            self._check_rope(d)
        if self._loaded:
            self._check_loaded(heads // g, g * d)
            return self
        source = x
        if self.prerope:
            source = (check_input(ctx.keys_prerope) if ctx.keys_prerope is not None
                      else self._rope.invert(x, positions).astype(np.float32))  # type: ignore[union-attr]
        if source.shape != x.shape:
            raise CodecError(f"keys_prerope has shape {source.shape}, the keys {x.shape}")
        s = self._sink(tokens)
        body = _grouped(source[:, s:], g)  # (groups, T', g*d)
        weights = self._token_weights(ctx, heads, s, g)  # (groups, T') or None
        metric = self._query_metric(ctx, heads, g, d) if self.weight == "queries" else None
        self._fit_pca(body, weights, metric)
        return self

    def _check_rope(self, d: int) -> None:
        if self._rope is None:
            raise CodecError(f"prerope=true needs RoPE parameters; {CAPTURE_HINT}")
        if self._rope.rotary_dim > d:
            raise CodecError(f"the RoPE parameters rotate {self._rope.rotary_dim} channels but head_dim is {d}")

    def _check_loaded(self, groups: int, width: int) -> None:
        assert self._mean is not None  # noqa: S101 — set with _loaded
        if self._mean.shape != (groups, width):
            raise CodecError(f"the restored lowrank basis is for {self._mean.shape[0]} group(s) of "
                             f"{self._mean.shape[1]} values; this tensor has {groups} of {width}")

    def _token_weights(self, ctx: LayerContext, heads: int, s: int, g: int) -> np.ndarray | None:
        """Per-token weights ``(groups, T')`` for ``weight=attention``: the attention each token receives from
        the recorded queries (mean over query heads and rows), mixed with a uniform floor."""
        if self.weight != "attention":
            return None
        if ctx.queries is None or ctx.keys is None or ctx.query_positions is None or ctx.key_positions is None:
            raise CodecError("weight=attention needs captured queries; capture with --queries last:N")
        p = _attention_received(ctx.queries, ctx.keys, ctx.query_positions, ctx.key_positions,
                                ctx.scaling, ctx.sliding_window or 0)  # (kv_heads, T)
        p = p[:, s:].reshape(heads // g, g, -1).mean(axis=1)  # (groups, T')
        total = p.sum(axis=1, keepdims=True)
        t = max(p.shape[1], 1)
        share = np.divide(p, total, out=np.full_like(p, 1.0 / t), where=total > 0)
        return ATTENTION_FLOOR / t + (1.0 - ATTENTION_FLOOR) * share

    def _query_metric(self, ctx: LayerContext, heads: int, g: int, d: int) -> np.ndarray:
        """``M = E[q qᵀ]`` per group ``(groups, g·d, g·d)``, block diagonal over the group's heads."""
        if ctx.queries is None:
            raise CodecError("weight=queries needs captured queries; capture with --queries last:N")
        q = ctx.queries.astype(np.float64)  # (q_heads, Tq, d)
        if q.shape[0] % heads or q.shape[-1] != d:
            raise CodecError(f"queries of shape {q.shape} do not match {heads} kv heads of {d}")
        per = q.shape[0] // heads
        m = np.einsum("htd,hte->hde", q, q).reshape(heads, per, d, d).sum(1) / max(per * q.shape[1], 1)
        out = np.zeros((heads // g, g * d, g * d))
        for h in range(heads):
            k, j = divmod(h, g)
            out[k, j * d:(j + 1) * d, j * d:(j + 1) * d] = m[h]
        return out

    def _fit_pca(self, body: np.ndarray, weights: np.ndarray | None, metric: np.ndarray | None) -> None:
        groups, t, width = body.shape
        mean = np.zeros((groups, width))
        spectra, bases, projections = [], [], []
        for k in range(groups):
            x = body[k].astype(np.float64)  # (T', g*d)
            w = np.full(t, 1.0 / max(t, 1)) if weights is None else weights[k] / max(weights[k].sum(), 1e-30)
            if t:
                mean[k] = w @ x
            xc = x - mean[k]
            cov = (xc * w[:, None]).T @ xc  # (g*d, g*d)
            if metric is None:
                vals, vecs = np.linalg.eigh(cov)
                enc = dec = None
            else:
                mv, mq = np.linalg.eigh(metric[k])
                mv = np.maximum(mv, 0.0) + QUERY_RIDGE * max(mv.mean(), 1e-30)
                half, inv_half = (mq * np.sqrt(mv)) @ mq.T, (mq / np.sqrt(mv)) @ mq.T
                vals, vecs = np.linalg.eigh(half @ cov @ half)
                enc, dec = half, inv_half
            order = np.argsort(vals)[::-1]
            vals, vecs = np.maximum(vals[order], 0.0), vecs[:, order]
            spectra.append(vals)
            bases.append(vecs if dec is None else dec @ vecs)
            projections.append(None if enc is None else enc @ vecs)
        rank, needed, kept = self._resolve_rank(np.stack(spectra))
        self._mean = mean.astype(np.float32)
        self._basis = np.stack([b[:, :rank] for b in bases]).astype(np.float16).astype(np.float32)
        self._projection = (None if projections[0] is None else
                            np.stack([p[:, :rank] for p in projections]).astype(np.float16).astype(np.float32))
        self._mean = self._mean.astype(np.float16).astype(np.float32)
        self._fit_report = {"rank_needed": needed, "energy_kept": kept}

    def _resolve_rank(self, spectra: np.ndarray) -> tuple[int, list[int] | None, list[float]]:
        """The layer's rank, the rank each basis needed for ``energy`` (or None) and the energy each keeps."""
        total = spectra.sum(axis=1, keepdims=True)  # (groups, 1)
        frac = np.divide(np.cumsum(spectra, axis=1), total, out=np.ones_like(spectra), where=total > 0)
        needed = None
        if self.rank is not None:
            rank = self.rank
        else:
            target = DEFAULT_ENERGY if self.energy is None else float(self.energy)
            # smallest r with frac[r-1] >= target; energy=1 keeps every dimension (rounding noise counts)
            width = spectra.shape[1]
            needed = [width if target >= 1.0 else int(np.argmax(row >= target)) + 1 for row in frac]
            rank = max(needed)
        rank = min(rank, spectra.shape[1])
        return rank, needed, [float(row[rank - 1]) for row in frac]

    # -- shared state -------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, np.ndarray]:
        if self._mean is None or self._basis is None:
            return {}
        state = {"mean": self._mean.astype(np.float16), "basis": self._basis.astype(np.float16)}
        if self._projection is not None:
            state["projection"] = self._projection.astype(np.float16)
        if self.prerope and self._rope is not None:
            state["rope_inv_freq"] = np.asarray(self._rope.inv_freq, dtype=np.float32)
            state["rope_attention_factor"] = np.asarray([self._rope.attention_factor], dtype=np.float32)
        return state

    def load_shared_state(self, state: dict[str, np.ndarray]) -> LowRank:
        if not state:
            return self
        allowed = {"mean", "basis", "projection", "rope_inv_freq", "rope_attention_factor"}
        unknown = set(state) - allowed
        if unknown or not {"mean", "basis"} <= set(state):
            raise CodecError(f"lowrank shared state holds mean, basis (projection, rope_*); got {sorted(state)}")
        self._mean = np.asarray(state["mean"], dtype=np.float32)
        self._basis = np.asarray(state["basis"], dtype=np.float32)
        self._projection = np.asarray(state["projection"], np.float32) if "projection" in state else None
        if self._basis.ndim != 3 or self._mean.shape != self._basis.shape[:2]:
            raise CodecError(f"lowrank shared state: mean {self._mean.shape} and basis {self._basis.shape} "
                             "do not fit together")
        if self.rank is not None and self._basis.shape[2] != self.rank:
            raise CodecError(f"the restored basis has rank {self._basis.shape[2]}, the spec asks for {self.rank}")
        if (self.weight == "queries") != (self._projection is not None):
            raise CodecError("the restored lowrank state does not match weight=" + self.weight)
        if self.prerope:
            if "rope_inv_freq" not in state:
                raise CodecError(f"prerope=true, but the restored state has no RoPE parameters; {CAPTURE_HINT}")
            factor = float(np.asarray(state.get("rope_attention_factor", [1.0])).reshape(-1)[0])
            self._rope = RopeParams(np.asarray(state["rope_inv_freq"], np.float32).reshape(-1), factor)
        self._loaded = True
        self._fit_report = {}
        return self

    def _require_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._mean is None or self._basis is None:
            raise CodecError("lowrank has no basis: call fit(x) first, or load_shared_state() to decode a file")
        coder = self._basis if self._projection is None else self._projection
        return self._mean, self._basis, coder

    # -- the stage ----------------------------------------------------------------------------------
    def split(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int | float | str]]:
        heads, tokens, d = x.shape
        mean, _, coder = self._require_state()
        groups = mean.shape[0]
        if heads % groups or mean.shape[1] != (heads // groups) * d:
            raise CodecError(f"the lowrank basis is for {groups} group(s) of {mean.shape[1]} values; "
                             f"the tensor has {heads} heads of {d}")
        s = self._sink(tokens)
        body = x[:, s:]
        meta: dict[str, int | float | str] = {"rank": int(coder.shape[2])}
        if self.prerope:
            self._check_rope(d)
            positions = self._key_start + s + np.arange(tokens - s)
            body = self._rope.invert(body, positions)  # type: ignore[union-attr]
            meta["key_start"] = self._key_start
        xg = _grouped(body, heads // groups)  # (groups, T', g*d)
        coeffs = np.einsum("gtw,gwr->gtr", xg - mean[:, None, :], coder, optimize=True)
        own = {"sink_rows": x[:, :s].astype(np.float16)} if s else {}
        return own, coeffs.astype(np.float32), meta

    def merge(self, own: Encoded, payload: np.ndarray) -> np.ndarray:
        heads, tokens, d = own.shape
        mean, basis, _ = self._require_state()
        groups = mean.shape[0]
        xg = mean[:, None, :] + np.einsum("gtr,gwr->gtw", payload.astype(np.float32), basis, optimize=True)
        body = _ungrouped(xg, heads // groups, d)  # (heads, T', d)
        s = tokens - body.shape[1]
        if self.prerope:
            self._check_rope(d)
            positions = int(own.meta.get("key_start", 0)) + s + np.arange(body.shape[1])
            body = self._rope.apply(body, positions)  # type: ignore[union-attr]
        out = np.empty(own.shape, dtype=np.float32)
        out[:, s:] = body
        if s:
            out[:, :s] = own.arrays["sink_rows"].astype(np.float32)
        return out

    def payload_shape(self, own: Encoded) -> tuple[int, int, int]:
        heads, tokens, _ = own.shape
        s = own.arrays["sink_rows"].shape[1] if "sink_rows" in own.arrays else 0
        groups = heads // self._group_size(heads)
        return groups, tokens - s, int(own.meta["rank"])

    def payload_mask(self, own: Encoded, inner: np.ndarray | None) -> np.ndarray | None:
        if inner is None:
            return None
        heads, tokens, _ = own.shape
        mask = np.ones((heads, tokens), dtype=bool)
        g = heads // inner.shape[0]
        mask[:, tokens - inner.shape[1]:] = np.repeat(inner, g, axis=0)
        return mask

    def payload_context(self, context: LayerContext | None) -> LayerContext | None:
        # The coefficients live in a rank-r space: queries and keys (head_dim wide) no longer apply.
        ctx = context or LayerContext()
        s = self.sink
        positions = None if ctx.key_positions is None else ctx.key_positions[s:]
        return LayerContext(layer=ctx.layer, role=ctx.role, key_positions=positions, scaling=ctx.scaling,
                            sliding_window=ctx.sliding_window)

    def report(self, enc: Encoded) -> dict[str, object]:
        rank = int(enc.meta.get("rank", 0))
        out: dict[str, object] = {"rank": rank}
        out.update({k: v for k, v in self._fit_report.items() if v is not None})
        return out


def _grouped(x: np.ndarray, g: int) -> np.ndarray:
    """``(heads, T, d)`` → ``(heads/g, T, g·d)``: each group's heads side by side in one vector."""
    heads, t, d = x.shape
    return x.reshape(heads // g, g, t, d).transpose(0, 2, 1, 3).reshape(heads // g, t, g * d)


def _ungrouped(x: np.ndarray, g: int, d: int) -> np.ndarray:
    """Inverse of :func:`_grouped`."""
    groups, t, _ = x.shape
    return np.ascontiguousarray(x.reshape(groups, t, g, d).transpose(0, 2, 1, 3).reshape(groups * g, t, d))


def _attention_received(queries: np.ndarray, keys: np.ndarray, query_positions: np.ndarray,
                        key_positions: np.ndarray, scaling: float | None, window: int) -> np.ndarray:
    """Mean attention probability each key receives ``(kv_heads, T)`` over the recorded queries
    (causal and sliding-window masks from absolute positions, GQA query heads pooled)."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (q_heads, Tq, d)
    k = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))  # (kv_heads, T, d)
    kv, d = k.shape[0], k.shape[-1]
    per = q.shape[0] // kv
    scale = d ** -0.5 if scaling is None else float(scaling)
    visible = visibility(query_positions, key_positions, window)  # (Tq, T)
    out = np.zeros((kv, k.shape[1]))
    for h in range(kv):
        s = torch.matmul(q[h * per:(h + 1) * per], k[h].T) * scale  # (per, Tq, T)
        p = torch.softmax(s.masked_fill(~visible, -torch.inf), dim=-1)
        out[h] = torch.nan_to_num(p).mean(dim=(0, 1)).double().numpy()
    return out
