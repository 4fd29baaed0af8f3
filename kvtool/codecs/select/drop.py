"""``drop``: evict every row — stores nothing, restores nothing.

Alone it is the degenerate cache (every token evicted; eval refuses nothing, the model then attends only
to the tokens appended after the prompt). It exists as the low part of ``salient``
(:mod:`kvtool.codecs.compose.salient`): ``salient:select=[expected:keep=0.7],hi=[SPEC],lo=[drop]`` is
eviction whose selection is stored as one bit per token and head instead of one index per kept token — at
``head_dim`` 64 and 16-bit indices, 0.016 bits per element instead of ``keep · 0.25`` (0.16 at
``keep=0.65``), bits a tight budget can spend on keeping more tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvtool.codecs.base import Codec, Encoded, check_input, register


@register
@dataclass
class Drop(Codec):
    """``drop`` — no arrays; ``decode`` is zeros and :meth:`token_mask` marks every row evicted."""

    name = "drop"
    #: every row is evicted: kvtool.CodecCache applies the mask in its attention (kvtool.cache.can_evict)
    evicts: ClassVar[bool] = True

    def encode(self, x: np.ndarray) -> Encoded:
        return Encoded({}, check_input(x).shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        return np.zeros(enc.shape, dtype=np.float32)

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        return np.zeros(enc.shape[:2], dtype=bool)
