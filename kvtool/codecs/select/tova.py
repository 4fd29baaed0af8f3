"""``tova``: Token Omission Via Attention — the last query's attention decides (arXiv 2401.06104)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvtool.codecs.base import LayerContext, register
from kvtool.codecs.select.selection import ScoredSelector, attention_probs, observed, per_kv_head


@register
@dataclass
class TOVA(ScoredSelector):
    """``tova:keep=0.5`` — keep the tokens the last observed query attends to most.

    TOVA (arXiv 2401.06104, §3) ranks tokens by the current query's attention, averaged over the heads of
    the layer, so every head keeps the same tokens. ``per_head=true`` ranks each kv head by its own query
    heads instead and lets the budgets differ (AdaKV).
    """

    name = "tova"
    query_based: ClassVar[bool] = True

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        probs = attention_probs(keys, observed(self.name, context, keys.shape[1]), last=1)[:, 0]  # (q_heads, T)
        if self.per_head:
            return per_kv_head(probs, keys.shape[0])
        return np.broadcast_to(probs.double().mean(dim=0).numpy(), keys.shape[:2])
