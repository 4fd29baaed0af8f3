"""Test-only token selectors (the real ones come with the eviction issue); conftest's ``test_selectors``
fixture registers them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtool.codecs import Selector


@dataclass
class DropRange(Selector):
    """Test selector: evicts positions start..stop-1 (absolute) of every head; per-head offset with skew."""

    start: int = 0
    stop: int = 0
    skew: int = 0
    name = "droprange"

    def fit(self, x, context=None):
        self._first = int(context.key_positions[0]) if context is not None and context.key_positions is not None \
            else 0
        return super().fit(x, context)

    def select(self, x):
        heads, tokens, _ = x.shape
        rows = []
        for h in range(heads):
            pos = np.arange(tokens) + self._first
            lo, hi = self.start + h * self.skew, self.stop + h * self.skew
            rows.append(np.flatnonzero((pos < lo) | (pos >= hi)))
        n = min(len(r) for r in rows)
        return np.stack([r[:n] for r in rows])


@dataclass
class KeepFirst(Selector):
    """Test selector that can stream: from each block, keeps the rows at absolute positions < keep."""

    keep: int = 4
    name = "keepfirst"
    streaming = True

    def fit(self, x, context=None):
        self._first = int(context.key_positions[0]) if context is not None and context.key_positions is not None \
            else 0
        return super().fit(x, context)

    def select(self, x):
        heads, tokens, _ = x.shape
        pos = np.arange(tokens) + self._first
        kept = np.flatnonzero(pos < self.keep)
        return np.broadcast_to(kept, (heads, len(kept)))

