"""``uniform``: asymmetric b-bit min/max quantization per group along tokens or channels.

The plain integer quantizer that KV-cache papers use as their baseline (e.g. FlexGen, arXiv 2303.06865,
§4 "group-wise quantization"; KIVI, arXiv 2402.02750, §3.1 eq. 1): for each group,
``scale = (max - min) / (2**b - 1)``, ``zero = min`` (both stored in fp16 and counted),
``code = round((x - zero) / scale)``. Stored bits per element with groups of ``g``: ``b + 32 / g``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from kvtool.codecs.base import register
from kvtool.codecs.quant.group import GroupQuantizer, minmax_dequantize, minmax_quantize


@register
@dataclass
class Uniform(GroupQuantizer):
    """``uniform:bits=4,axis=token,group=0`` — b-bit (1..8) asymmetric quantization.

    ``axis=token`` quantizes each token's vector in groups of ``group`` channels (``group`` divides
    head_dim; 0 = whole head_dim); ``axis=channel`` quantizes each channel in groups of ``group`` tokens
    (0 = all tokens).
    """

    bits: int = 4
    axis: Literal["token", "channel"] = "token"
    group: int = 0
    name = "uniform"

    def quantize(self, blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return minmax_quantize(blocks, lo, hi, self.bits)

    def dequantize(self, codes: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
        return minmax_dequantize(codes, stats)
