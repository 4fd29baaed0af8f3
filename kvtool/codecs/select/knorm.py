"""``knorm``: keep the keys with the smallest L2 norm (arXiv 2406.11430)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtool.codecs.base import LayerContext, register
from kvtool.codecs.select.selection import ScoredSelector


@register
@dataclass
class KNorm(ScoredSelector):
    """``knorm:keep=0.5`` — evict the tokens whose keys have the largest L2 norm; needs no queries.

    Devoto et al. (arXiv 2406.11430, §3) observe that a low key norm goes with high attention, so the
    smallest-norm keys are kept. Values are selected by their keys' norms.
    """

    name = "knorm"

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        return -np.linalg.norm(keys.astype(np.float64), axis=-1)  # (heads, T)
