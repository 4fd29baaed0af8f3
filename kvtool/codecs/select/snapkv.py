"""``snapkv``: votes of an observation window of queries, pooled along the tokens (arXiv 2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from kvtool.codecs.base import LayerContext, register
from kvtool.codecs.select.selection import ScoredSelector, attention_probs, observed, per_kv_head
from kvtool.errors import CodecError


@register
@dataclass
class SnapKV(ScoredSelector):
    """``snapkv:keep=0.5,window=64,kernel=5,pool=avg`` — keep the tokens the last observed queries vote for.

    SnapKV (arXiv 2404.14469, §4.2): the last ``window`` queries of the prompt (the observation window)
    score each earlier token by their mean attention; a 1-D pooling of width ``kernel`` along the tokens
    keeps neighbours of a heavy token together; the window's own tokens are always kept. Query heads that
    read the same kv head are averaged (kvpress's GQA handling). Defaults follow kvpress.
    """

    name = "snapkv"
    window: int = 64
    kernel: int = 5
    pool: Literal["avg", "max"] = "avg"
    query_based: ClassVar[bool] = True

    def validate(self, head_dim: int | None = None) -> None:
        super().validate(head_dim)
        if self.window < 1:
            raise CodecError(f"window must be at least 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise CodecError(f"kernel must be an odd number >= 1, got {self.kernel}")

    def _window(self, obs_count: int) -> int:
        return min(self.window, obs_count)

    def protect(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        obs = observed(self.name, context, keys.shape[1])
        first = obs.query_positions[-self._window(obs.query_positions.size)]
        return obs.key_positions >= first  # the window's tokens and every newer one

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        obs = observed(self.name, context, keys.shape[1])
        w = self._window(obs.query_positions.size)
        votes = attention_probs(keys, obs, last=w).mean(dim=1)  # (q_heads, T)
        votes = votes.masked_fill(torch.from_numpy(self.protect(keys, context)), 0.0)  # kept anyway
        pad = self.kernel // 2
        if self.pool == "avg":
            votes = torch.nn.functional.avg_pool1d(votes[:, None], self.kernel, 1, pad)[:, 0]
        else:
            votes = torch.nn.functional.max_pool1d(votes[:, None], self.kernel, 1, pad)[:, 0]
        return per_kv_head(votes, keys.shape[0])
