"""``fp16``: the cache as a 16-bit model holds it — the baseline every ratio is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtool.codecs.base import Codec, Encoded, check_input, register


@register
@dataclass
class FP16(Codec):
    """Identity at 16 bits per element: stores ``x`` as float16 (IEEE 754 binary16)."""

    name = "fp16"

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        return Encoded({"data": x.astype(np.float16)}, x.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        return enc.arrays["data"].astype(np.float32).reshape(enc.shape)
