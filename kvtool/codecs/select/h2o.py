"""``h2o``: Heavy-Hitter Oracle — accumulated attention plus the newest tokens (arXiv 2306.14048)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvtool.codecs.base import LayerContext, register
from kvtool.codecs.select.selection import ScoredSelector, attention_probs, observed, per_kv_head


@register
@dataclass
class H2O(ScoredSelector):
    """``h2o:keep=0.5`` — keep the heavy hitters (most attention accumulated over the observed queries)
    and a window of the newest tokens.

    H2O (arXiv 2306.14048, §3–4) scores a token by the attention it has received, summed over the queries
    so far, and splits the budget equally between heavy hitters and recent tokens; without ``recent=`` the
    window is half the budget. Scores are summed over the observed queries and averaged over the query
    heads that read a kv head.
    """

    name = "h2o"
    recent: int | None = None
    query_based: ClassVar[bool] = True

    def recent_window(self, budget: int) -> int:
        return budget // 2 if self.recent is None else self.recent

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        probs = attention_probs(keys, observed(self.name, context, keys.shape[1]))  # (q_heads, Tq, T)
        return per_kv_head(probs.sum(dim=1), keys.shape[0])
