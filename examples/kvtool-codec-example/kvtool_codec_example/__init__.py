"""An example kvtool codec plugin: ternary codes with a per-token absmean scale.

Each token's vector ``x`` (one head, ``d`` values) is stored as ``round(clip(x / s, -1, 1))`` in
{-1, 0, +1} with ``s = mean(|x|)`` (the absmean quantizer of BitNet b1.58, arXiv 2402.17764, applied to
cache vectors instead of weights), two bits per code, plus ``s`` in fp16. Bits per element: ``2 + 16/d``.

It is a plain kvtool codec — a dataclass subclass of ``kvtool.codecs.Codec`` — that kvtool finds through
the entry point in ``pyproject.toml``; it is not decorated with ``@register`` (kvtool registers entry-point
classes itself) and imports only kvtool's public codec API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvtool.codecs import Codec, Encoded
from kvtool.codecs.base import check_input
from kvtool.codecs.bitpack import pack, unpack
from kvtool.errors import CodecError


@dataclass
class Ternary(Codec):
    """``ternary:threshold=1`` — {-1, 0, +1} codes times a per-token absmean scale (example plugin)."""

    threshold: float = 1.0  # the scale is threshold · mean|x|
    name: ClassVar[str] = "ternary"

    def validate(self, head_dim: int | None = None) -> None:
        if not 0 < float(self.threshold) <= 4:
            raise CodecError(f"threshold must be in (0, 4], got {self.threshold}")

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)  # (heads, tokens, d)
        scale = (self.threshold * np.abs(x).mean(axis=-1)).astype(np.float16)  # (heads, tokens)
        s = np.maximum(scale.astype(np.float32), np.finfo(np.float32).tiny)[..., None]
        codes = (np.clip(np.rint(x / s), -1, 1) + 1).astype(np.uint8)  # 0, 1, 2
        return Encoded({"codes": pack(codes, 2), "scale": scale}, x.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        codes = unpack(enc.arrays["codes"], 2, int(np.prod(enc.shape))).reshape(enc.shape)
        return (codes.astype(np.float32) - 1.0) * enc.arrays["scale"].astype(np.float32)[..., None]
