"""``streaming``: StreamingLLM — the attention sinks plus a window of the newest tokens (arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtool.codecs.base import LayerContext, register
from kvtool.codecs.select.selection import BudgetSelector
from kvtool.errors import CodecError


@register
@dataclass
class Streaming(BudgetSelector):
    """``streaming:sink=4,recent=N`` — keep the first sink tokens and the newest ones, evict the middle.

    StreamingLLM (arXiv 2309.17453, §3.2) found that the first few tokens absorb attention whatever their
    content and keeps 4 of them beside a rolling window. ``recent=N`` keeps exactly ``sink + N`` tokens (a
    shorter cache, whose window has not filled yet, stays whole); without it the window fills the budget
    (``keep=`` / ``tokens=``, default ``keep=0.5``). Needs no queries.
    """

    name = "streaming"
    sink: int = 4
    recent: int | None = None

    def __post_init__(self) -> None:
        if self.recent is not None and (self.keep is not None or self.tokens is not None):
            raise CodecError("streaming keeps sink + recent tokens: give recent= or a budget "
                             "(keep= or tokens=), not both")
        if self.recent is None:
            super().__post_init__()
        else:
            self._mask = None
            self.validate()

    def budget(self, tokens: int) -> int:
        if self.recent is None:
            return super().budget(tokens)
        return min(self.sink + self.recent, tokens)  # a cache that has not filled its window yet stays whole

    def recent_window(self, budget: int) -> int:
        return self.recent if self.recent is not None else max(budget - self.sink, 0)

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        return np.zeros(keys.shape[:2])  # the protected windows are the whole selection
