"""Seeded random matrices shared by the rotation-based codecs (TurboQuant, QJL, PolarQuant).

Files store only the seed (DESIGN.md, "The codec contract"); the matrix is rebuilt from it, identically on
every machine, because it comes from NumPy's ``PCG64`` generator in float64 and is only then cast to
float32. Each use gets its own stream: ``(seed, purpose, dim)`` keys the generator, so the rotation and
the QJL projection of one codec are independent, and the two channel sets of a fractional TurboQuant get
different rotations.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

#: Stream tags, one per purpose; never renumber (stored files depend on them).
ROTATION = 1
QJL = 2


def _rng(seed: int, purpose: int, rows: int, cols: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, purpose, rows, cols])


@lru_cache(maxsize=64)
def random_rotation(dim: int, seed: int, part: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal ``(dim, dim)`` float32 matrix ``Π`` (QR of a Gaussian, signs fixed).

    ``part`` tells apart several rotations of one codec (the channel sets of a fractional TurboQuant).
    Rotate row vectors with ``x @ Π.T``, undo with ``y @ Π``. Read-only: callers must not modify it.
    """
    g = _rng(seed, ROTATION + 16 * part, dim, dim).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    # Multiplying column j by sign(r_jj) makes the distribution exactly Haar (Mezzadri 2007, §5).
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    return torch.from_numpy(q.astype(np.float32))


@lru_cache(maxsize=64)
def gaussian_projection(rows: int, dim: int, seed: int, part: int = 0) -> torch.Tensor:
    """An i.i.d. N(0, 1) ``(rows, dim)`` float32 matrix ``S``: the JL projection of QJL (arXiv 2406.03482)."""
    g = _rng(seed, QJL + 16 * part, rows, dim).standard_normal((rows, dim))
    return torch.from_numpy(g.astype(np.float32))
