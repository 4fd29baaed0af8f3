"""``smooth``: per-channel scaling before the next codec (its rotation), undone after decoding.

Keys with outlier channels (a few channels many times larger than the rest) hand a rotation-based
quantizer a vector whose norm is mostly those channels: after the rotation every coordinate carries a
share of them, and the quantization error is spread back over all channels, the small ones included.
SmoothQuant (Xiao et al., arXiv 2211.10438, §4) migrates such per-channel magnitudes with a scale
``s_c = max|x_c|^α``; here the stage divides each KV head's channel ``c`` by ``s_c`` before the next codec
(``smooth:alpha=0.5+turboquant:bits=3``) and multiplies the decoding by it again. The scales are normalised
to a geometric mean of 1 and stored in fp16, ``(heads, head_dim)``, counted; ``alpha=0`` is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtool.codecs.base import Encoded, Stage, register
from kvtool.errors import CodecError

SCALE = "smooth_scale"


def channel_scales(x: np.ndarray, alpha: float) -> np.ndarray:
    """``(heads, d)`` fp16 scales ``max_t |x[h, t, c]|^α``, geometric mean 1 per head."""
    peak = np.abs(x).max(axis=1).astype(np.float64)  # (heads, d)
    peak = np.maximum(peak, peak.max(axis=1, keepdims=True) * 1e-4 + 1e-12)  # silent channels: no blow-up
    s = peak ** alpha
    s /= np.exp(np.log(s).mean(axis=1, keepdims=True))
    return s.astype(np.float16)


@register
@dataclass
class Smooth(Stage):
    """``smooth:alpha=0.5`` — divide each KV head's channels by ``max|x_c|^α`` before the next codec and
    multiply its decoding back; ``16 · head_dim`` bits of scales per head and tensor."""

    name = "smooth"
    alpha: float = 0.5

    def validate(self, head_dim: int | None = None) -> None:
        if not 0 <= self.alpha <= 1:
            raise CodecError(f"alpha must be in [0, 1], got {self.alpha:g}")

    def split(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int | float | str]]:
        s = channel_scales(x, self.alpha)
        return {SCALE: s}, x / s.astype(np.float32)[:, None, :], {}

    def merge(self, own: Encoded, payload: np.ndarray) -> np.ndarray:
        return payload * own.arrays[SCALE].astype(np.float32)[:, None, :]

    def payload_shape(self, own: Encoded) -> tuple[int, int, int]:
        return own.shape
