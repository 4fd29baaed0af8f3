"""``expected``: Expected Attention — the attention future queries are expected to pay, estimated from the
statistics of the observed queries rotated to future positions (kvpress, arXiv 2510.00636)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kvtool.codecs.base import Encoded, LayerContext, register
from kvtool.codecs.moments import QueryMoments, unrotate
from kvtool.codecs.select.selection import Observed, ScoredSelector, observed, per_kv_head, sink_rows
from kvtool.errors import CodecError


def mean_rotation(inv_freq: torch.Tensor, positions: torch.Tensor, dim: int | None = None,
                  factor: float = 1.0) -> torch.Tensor:
    """The ``(d, d)`` average over ``positions`` of the RoPE maps ``factor · R(p)`` (kvpress's R̄); with
    ``dim`` above ``2·len(inv_freq)`` the extra channels pass through unchanged (partial rotary)."""
    n = inv_freq.shape[0]
    d = 2 * n if dim is None else dim
    angles = positions.double()[:, None] * inv_freq.double()[None, :]  # (P, n)
    c, s = factor * torch.cos(angles).mean(0), factor * torch.sin(angles).mean(0)
    r = torch.eye(d, dtype=torch.float64)
    r[:n, :n], r[:n, n:2 * n] = torch.diag(c), -torch.diag(s)
    r[n:2 * n, :n], r[n:2 * n, n:2 * n] = torch.diag(s), torch.diag(c)
    return r


@register
@dataclass
class Expected(ScoredSelector):
    """``expected:keep=0.5,future=512`` — keep the tokens future queries are expected to attend to.

    Expected Attention (Devoto et al., kvpress's ExpectedAttentionPress, arXiv 2510.00636 §3): model the next
    ``future`` queries as Gaussian with the mean ``μ`` and covariance ``Σ`` of the observed queries before
    RoPE, rotated by the average RoPE rotation ``R̄`` of those future positions; a key ``k`` then expects
    ``E[exp(s·q·k)] = exp(s·kᵀR̄μ + s²/2·kᵀR̄ΣR̄ᵀk)``. Scores are that, softmax-normalised over the keys,
    averaged over the query heads of each kv head and multiplied by ``‖v‖`` (``vnorm``). ``cov=false`` drops
    the covariance term; ``future=0`` uses the observed post-RoPE queries' statistics as they are, which is
    also what happens when the cache does not record the layer's RoPE frequencies (the compress report's
    ``resolved`` says ``rope=none`` then, and ``kvtool eval`` warns).

    As kvpress does: the statistics come from every observed query but those at the first ``sink`` positions
    (their outliers would dominate a covariance), and ``kvtool eval`` gives it the whole prompt's: not the
    queries themselves but their moments, streamed during the exact prefill (:meth:`query_moments`,
    :mod:`kvtool.codecs.moments`: the same statistics to float64 rounding, in ``O(d²)`` per layer instead of
    ``O(n·d)``); a ``d × d`` covariance from only 128 queries inflates its top eigenvalues. Where a context
    holds no moments (``kvtool compress`` on a capture, ``eval --queries N``) the statistics come from the
    queries it holds. The first ``sink=4`` positions are kept and left out of the softmax, so a sink-heavy
    query head weighs as much as the others in its group's average.
    """

    name = "expected"
    sink: int = 4
    future: int = 512
    cov: bool = True
    vnorm: bool = True
    query_based: ClassVar[bool] = True

    def validate(self, head_dim: int | None = None) -> None:
        super().validate(head_dim)
        if self.future < 0:
            raise CodecError(f"future must be at least 0, got {self.future}")

    def observed_queries(self) -> int | None:
        return 1  # the newest query's position (keys after it are kept); the statistics come from the moments

    def query_moments(self) -> int | None:
        return self.sink

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> Expected:
        self._rotated = bool(self.future and _rope(context) is not None)
        super().fit(x, context)
        return self

    def split(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int | float | str]]:
        own, rows, meta = super().split(x)
        return own, rows, {**meta, "rope": int(getattr(self, "_rotated", False))}

    def report(self, enc: Encoded) -> dict[str, object]:
        """Whether the query statistics were rotated to the future positions (``rope``); a ``warning``
        when they were not though ``future`` asked for it."""
        if enc.meta.get("rope"):
            return {"rope": "rotated"}
        if not self.future:
            return {"rope": "none"}
        return {"rope": "none", "warning": "expected: no single RoPE found for the layer, so its query "
                "statistics were not rotated to the future positions (as future=0)"}

    def statistics(self, obs: Observed, rope: tuple[torch.Tensor, float] | None,
                   moments: QueryMoments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(q_heads, d)`` and covariance ``(q_heads, d, d)`` of the future queries: from ``moments``
        where given (all the prompt's queries), else from the observed queries."""
        if moments is not None:
            mu, sigma = moments.statistics(self.sink, rope)
        else:
            mu, sigma = self._observed_statistics(obs, rope)
        if rope is not None:
            inv, factor = rope
            start = int(obs.key_positions.max()) + 1
            r = mean_rotation(inv, torch.arange(start, start + self.future), mu.shape[-1], factor)
            mu, sigma = mu @ r.T, r @ sigma @ r.T
        return mu, sigma

    def _observed_statistics(self, obs: Observed, rope: tuple[torch.Tensor, float] | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        q, qpos = obs.queries.double(), obs.query_positions  # (q_heads, n, d), (n,)
        if (qpos >= self.sink).any():
            q, qpos = q[:, qpos >= self.sink], qpos[qpos >= self.sink]
        if rope is not None:
            q = unrotate(q, torch.from_numpy(qpos), *rope)  # back to pre-RoPE
        mu = q.mean(dim=1)  # (q_heads, d)
        centred = q - mu[:, None]
        return mu, centred.transpose(1, 2) @ centred / q.shape[1]  # (q_heads, d), (q_heads, d, d)

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        obs = observed(self.name, context, keys.shape[1])
        mu, sigma = self.statistics(obs, _rope(context) if self.future else None,
                                    context.query_moments if context is not None else None)
        kv_heads, tokens, _ = keys.shape
        group = mu.shape[0] // kv_heads
        k = torch.from_numpy(keys).double().repeat_interleave(group, dim=0)  # (q_heads, T, d)
        logits = obs.scaling * torch.einsum("htd,hd->ht", k, mu)
        if self.cov:
            logits += obs.scaling**2 / 2 * torch.einsum("htd,hde,hte->ht", k, sigma, k)
        sinks = torch.from_numpy(sink_rows(self.sink, context, tokens))
        if not sinks.all():  # sinks are kept anyway: out of the softmax, so they take no head's mass
            logits[:, sinks] = -torch.inf
        scores = per_kv_head(torch.softmax(logits, dim=-1), kv_heads)  # (kv_heads, T)
        if self.vnorm:
            scores = scores * np.linalg.norm(self._values(keys, context), axis=-1)
        return scores

    def _values(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        if context is not None and context.values is not None:
            return np.asarray(context.values, dtype=np.float64)
        raise CodecError("expected:vnorm=true weighs tokens by their values' norms and needs the layer's "
                         "values in the context (LayerContext.values); or use vnorm=false")


def _rope(context: LayerContext | None) -> tuple[torch.Tensor, float] | None:
    """(inverse frequencies, attention factor) of the layer's RoPE from the context, or None."""
    if context is None:
        return None
    if context.rope is not None:
        return torch.as_tensor(np.asarray(context.rope.inv_freq), dtype=torch.float64), \
            float(context.rope.attention_factor)
    if context.rope_inv_freq is not None:
        return torch.as_tensor(np.asarray(context.rope_inv_freq), dtype=torch.float64), 1.0
    return None
