"""``fp8`` in torch: float8 codes with a per-head fp32 scale, code for code :class:`kvtool.codecs.quant.fp8.FP8`."""

from __future__ import annotations

import torch

from kvtool.codecs.base import Encoded
from kvtool.codecs.quant.fp8 import FORMATS, FP8
from kvtool.runtime.device import DeviceCodec


class FP8Device(DeviceCodec):
    codec: FP8

    def encode(self, x: torch.Tensor) -> Encoded:
        dtype = FORMATS[self.codec.format]
        fmax = float(torch.finfo(dtype).max)
        amax = x.abs().amax(dim=(1, 2))  # (heads,)
        scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
        scaled = (x * (1.0 / scale)[:, None, None]).clamp(-fmax, fmax)  # saturate: no inf/NaN from the cast
        return Encoded({"codes": scaled.to(dtype).view(torch.uint8), "scale": scale}, tuple(x.shape))

    def decode(self, enc: Encoded) -> torch.Tensor:
        codes = enc.arrays["codes"].view(FORMATS[self.codec.format]).float()
        return codes * enc.arrays["scale"][:, None, None]
