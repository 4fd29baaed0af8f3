"""Streamed moments of a layer's queries: what ``expected`` needs of the prompt's queries, without keeping them.

Expected Attention (:mod:`kvtool.codecs.select.expected`) models future queries by the mean and covariance of
the observed ones before RoPE, leaving out the first ``sink`` positions. Recording every query of the prompt for
it costs ``(q_heads, n, d)`` float32 per layer (1.15 GB for Gemma 3 270M at a 16k prompt). A
:class:`MomentRecorder` instead adds each forward call's queries to per-layer sums in float64 — the count, the
sum ``(q_heads, d)`` and the sum of outer products ``(q_heads, d, d)`` — in every frame a codec may ask for:
post-RoPE (for ``future=0`` or a layer without a known RoPE), and pre-RoPE under each rotary embedding the
model holds (which one a layer used is known only after the pass, and a model may hold several: Gemma 3's
local and global bases). The queries of the first ``head`` positions are kept as they are, so a codec whose
``sink`` is at most ``head`` gets exactly the statistics of the positions from ``sink`` on.

The un-rotation is :func:`rope_rotate` with the angles ``expected`` forms (float64 positions times the
float32 inverse frequencies), so the moments equal those of the recorded queries up to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvtool.errors import CodecError
from kvtool.rope import RopeParams


def rope_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(..., d)`` by ``angles`` ``(..., n)`` with the rotate-half pairing (``i``, ``i + n``) that
    transformers' Llama-family models use; channels from ``2n`` on pass through (partial rotary)."""
    n = angles.shape[-1]
    a, b, rest = x[..., :n], x[..., n:2 * n], x[..., 2 * n:]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def unrotate(q: torch.Tensor, positions: torch.Tensor, inv: torch.Tensor, factor: float) -> torch.Tensor:
    """Post-RoPE ``q`` ``(heads, n, d)`` float64 at ``positions`` ``(n,)`` → pre-RoPE (``inv`` ``(k,)`` float64)."""
    return rope_rotate(q, -positions.double()[:, None] * inv[None, :]) / factor


def _key(inv: torch.Tensor | np.ndarray, factor: float) -> tuple[bytes, float]:
    return np.asarray(inv, dtype=np.float32).tobytes(), float(factor)


@dataclass(eq=False)
class Sums:
    """Count, sum ``(heads, d)`` and sum of outer products ``(heads, d, d)`` of vectors, float64."""

    count: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def add(self, q: torch.Tensor) -> None:
        """Add ``q`` ``(heads, n, d)`` float64."""
        if q.shape[1] == 0:
            return
        total, outer = q.sum(dim=1), q.transpose(1, 2) @ q  # (heads, d), (heads, d, d)
        self.count += int(q.shape[1])
        self.total = total if self.total is None else self.total + total
        self.outer = outer if self.outer is None else self.outer + outer

    def plus(self, q: torch.Tensor) -> Sums:
        """These sums with ``q`` ``(heads, n, d)`` added (a new object)."""
        out = Sums(self.count, self.total, self.outer)
        out.add(q)
        return out

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(heads, d)`` and (biased) covariance ``(heads, d, d)``."""
        mu = self.total / self.count  # type: ignore[operator]
        return mu, self.outer / self.count - mu[:, :, None] * mu[:, None, :]  # type: ignore[operator]


@dataclass(eq=False)
class QueryMoments:
    """One layer's prompt queries ``0 .. length − 1`` as moments (:class:`MomentRecorder` fills it).

    ``head_queries`` ``(q_heads, h, d)`` float32: the post-RoPE queries of positions ``0 .. h − 1`` as they are;
    ``frames``: per frame, the :class:`Sums` of the queries at positions ``h`` on — ``None``: post-RoPE; a key
    (float32 inverse frequencies as bytes, attention factor): pre-RoPE under that rotary embedding.
    """

    head: int
    length: int = 0
    head_queries: torch.Tensor | None = None
    frames: dict[Any, Sums] = field(default_factory=dict)

    def statistics(self, sink: int, rope: tuple[torch.Tensor, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(q_heads, d)`` and covariance ``(q_heads, d, d)`` of the queries at positions ``sink`` on
        (all of them when none is), post-RoPE or, with ``rope`` (inverse frequencies float64, factor), before it."""
        if sink > self.head:
            raise CodecError(f"expected:sink={sink}: the query moments were kept from position {self.head} on; "
                             "record them from the largest sink asked for")
        frame = None if rope is None else _key(*rope)
        if frame not in self.frames:
            raise CodecError("expected: the query moments hold no frame for this layer's RoPE (it changed during "
                             "the pass?); record the queries themselves (kvtool eval --queries N)")
        first = sink if self.length > sink else 0
        rows = self.head_queries[:, first:].double()  # (q_heads, h', d): positions first .. h − 1
        if rope is not None and rows.shape[1]:
            rows = unrotate(rows, torch.arange(first, first + rows.shape[1]), *rope)
        return self.frames[frame].plus(rows).mean_cov()


class MomentRecorder:
    """An attention hook (:data:`kvtool.hooks.AttentionHook`) turning each layer's queries into
    :class:`QueryMoments`: post-RoPE and under each of ``ropes``, positions counted from 0 across the calls
    of a pass fed in pieces, the first ``head`` positions kept as they are."""

    def __init__(self, ropes: Sequence[RopeParams], head: int) -> None:
        self.head = int(head)
        self.ropes: dict[Any, tuple[torch.Tensor, float]] = {}
        for r in ropes:
            inv = torch.as_tensor(np.asarray(r.inv_freq, dtype=np.float32), dtype=torch.float64)
            self.ropes.setdefault(_key(inv, r.attention_factor), (inv, float(r.attention_factor)))
        self.moments: dict[int, QueryMoments] = {}

    def __call__(self, layer: int, query: Any, key: Any, value: Any, out: Any) -> None:
        q = query[0].detach().to("cpu").float()  # (q_heads, t, d) float32, as recorded queries are
        m = self.moments.setdefault(int(layer), QueryMoments(self.head))
        start, t = m.length, int(q.shape[1])
        kept = max(0, min(t, self.head - start))
        if kept or m.head_queries is None:
            part = q[:, :kept].clone()
            m.head_queries = part if m.head_queries is None else torch.cat([m.head_queries, part], dim=1)
        rest = q[:, kept:].double()  # positions start + kept .. start + t − 1
        m.length = start + t
        positions = torch.arange(start + kept, start + t)
        m.frames.setdefault(None, Sums()).add(rest)
        for k, (inv, factor) in self.ropes.items():
            m.frames.setdefault(k, Sums()).add(unrotate(rest, positions, inv, factor) if rest.shape[1] else rest)
