"""``fp8``: 8-bit floating point (E4M3 or E5M2) with one fp32 scale per head.

The FP8 KV cache of vLLM (docs "Quantized KV Cache"; formats from Micikevicius et al., "FP8 Formats for
Deep Learning", arXiv 2209.05433): ``x / scale`` is cast to float8 with ``scale = amax / fp8_max`` so the
largest magnitude maps onto the format's largest finite value (448 for E4M3, 57344 for E5M2). vLLM keeps a
scale per tensor (optionally per head); kvtool keeps one per KV head, stored as float32 and counted.
Stored bits per element: ``8 + 32 / (tokens * head_dim)``.

Encoding casts with torch (round to nearest even, saturated first); decoding looks each byte up in a
256-entry table already multiplied by the head's scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from kvtool.codecs.base import Codec, Encoded, check_input, choice_error, register
from kvtool.codecs.quant.group import parallel_map

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
BLOCK = 1 << 18  # elements per work block


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + BLOCK, n)) for s in range(0, n, BLOCK)]


@register
@dataclass
class FP8(Codec):
    """``fp8:format=e4m3`` (or ``e5m2``) — float8 codes and a per-head fp32 scale."""

    format: Literal["e4m3", "e5m2"] = "e4m3"
    name = "fp8"

    def validate(self, head_dim: int | None = None) -> None:
        if self.format not in FORMATS:
            raise choice_error("format", ", ".join(FORMATS), self.format)

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        dtype = FORMATS[self.format]
        fmax = float(torch.finfo(dtype).max)
        amax = torch.from_numpy(x).abs().amax(dim=(1, 2)).numpy()  # (heads,)
        scale = np.where(amax > 0, amax / fmax, 1.0).astype(np.float32)
        flat, heads = x.reshape(x.shape[0], -1), x.shape[0]
        codes = np.empty(flat.shape, dtype=np.uint8)

        def work(job: tuple[int, int, int]) -> None:
            h, start, stop = job
            scaled = flat[h, start:stop] * (1.0 / scale[h])
            np.clip(scaled, -fmax, fmax, out=scaled)  # saturate: no inf/NaN from the cast
            codes[h, start:stop] = torch.from_numpy(scaled).to(dtype).view(torch.uint8).numpy()

        parallel_map(work, [(h, a, b) for h in range(heads) for a, b in _blocks(flat.shape[1])])
        return Encoded({"codes": codes.reshape(x.shape), "scale": scale}, x.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        table = torch.arange(256, dtype=torch.uint8).view(FORMATS[self.format]).float().numpy()  # (256,)
        heads = enc.shape[0]
        codes = np.ascontiguousarray(enc.arrays["codes"]).reshape(heads, -1)
        scale = enc.arrays["scale"].astype(np.float32)
        out = np.empty(codes.shape, dtype=np.float32)

        def work(job: tuple[int, int, int]) -> None:
            h, start, stop = job
            out[h, start:stop] = (table * scale[h])[codes[h, start:stop]]

        parallel_map(work, [(h, a, b) for h in range(heads) for a, b in _blocks(codes.shape[1])])
        return out.reshape(enc.shape)
