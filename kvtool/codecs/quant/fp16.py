"""``fp16``: the cache as a 16-bit model holds it — the baseline every ratio is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvtool.codecs.base import Codec, Encoded, check_input, register


@register
@dataclass
class FP16(Codec):
    """Identity at 16 bits per element: stores ``x`` as float16 (IEEE 754 binary16)."""

    name = "fp16"

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        return Encoded({"data": torch.from_numpy(x).half().numpy()}, x.shape)  # torch: F16C, multi-threaded

    def decode(self, enc: Encoded) -> np.ndarray:
        data = np.ascontiguousarray(enc.arrays["data"], dtype=np.float16)
        return torch.from_numpy(data).float().numpy().reshape(enc.shape)
