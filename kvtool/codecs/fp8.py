"""``fp8``: 8-bit floating point (E4M3 or E5M2) with one fp32 scale per head.

The FP8 KV cache of vLLM (docs "Quantized KV Cache"; formats from Micikevicius et al., "FP8 Formats for
Deep Learning", arXiv 2209.05433): ``x / scale`` is cast to float8 with ``scale = amax / fp8_max`` so the
largest magnitude maps onto the format's largest finite value (448 for E4M3, 57344 for E5M2). vLLM keeps a
scale per tensor (optionally per head); kvtool keeps one per KV head, stored as float32 and counted.
Stored bits per element: ``8 + 32 / (tokens * head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kvtool.codecs.base import Codec, Encoded, check_input, choice_error, register

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@register
@dataclass
class FP8(Codec):
    """``fp8:format=e4m3`` (or ``e5m2``): float8 codes and a per-head fp32 scale."""

    format: Literal["e4m3", "e5m2"] = "e4m3"
    name = "fp8"

    def validate(self, head_dim: int | None = None) -> None:
        if self.format not in FORMATS:
            raise choice_error("format", ", ".join(FORMATS), self.format)

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        dtype = FORMATS[self.format]
        fmax = torch.finfo(dtype).max
        t = torch.from_numpy(x)
        amax = t.abs().amax(dim=(1, 2)).float()  # (heads,)
        scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
        scaled = (t / scale[:, None, None]).clamp_(-fmax, fmax)  # saturate: no inf/NaN from the cast
        codes = scaled.to(dtype).view(torch.uint8)
        return Encoded({"codes": codes.numpy(), "scale": scale.numpy()}, x.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        codes = torch.from_numpy(np.ascontiguousarray(enc.arrays["codes"])).view(FORMATS[self.format])
        scale = torch.from_numpy(enc.arrays["scale"]).float()
        return (codes.float() * scale[:, None, None]).numpy().reshape(enc.shape)
