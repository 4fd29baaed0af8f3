"""``none``: no compression — the tensor exactly as the model holds it.

``kvtool eval --keys none --values SPEC`` compresses one side only, and ``none`` on both sides must give
Δppl 0 and KL 0 exactly, so this codec never rounds. Codecs receive float32 arrays; ``none`` stores them in
the narrowest IEEE format that reproduces every element bit for bit: float16 when every value is a
float16 value (a cache captured in fp16, an fp16 model), else bfloat16 when every value is a bfloat16
value (a bf16 model; stored as its raw 16-bit patterns in a uint16 array), else float32 (a float32
model: 32 bits per element). ``meta["dtype"]`` names the format; nothing is ever lost, and the bytes are
what is really stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvtool.codecs.base import Codec, Encoded, check_input, register

FLOAT16, BFLOAT16, FLOAT32 = "float16", "bfloat16", "float32"


def _exact_16bit(x: np.ndarray) -> tuple[str, np.ndarray] | None:
    """``(format, stored array)`` if ``x`` is exactly representable in float16 or bfloat16, else None."""
    t = torch.from_numpy(x)
    half = t.half()
    if torch.equal(half.float(), t):
        return FLOAT16, half.numpy()
    brain = t.bfloat16()
    if torch.equal(brain.float(), t):
        return BFLOAT16, brain.view(torch.int16).numpy().view(np.uint16)
    return None


@register
@dataclass
class NoCompression(Codec):
    """``none`` — keeps every value exactly (float16/bfloat16 when lossless, else float32)."""

    name = "none"

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        narrow = _exact_16bit(x) if x.size else None
        fmt, data = narrow if narrow is not None else (FLOAT32, x.copy())
        return Encoded({"data": data}, x.shape, {"dtype": fmt})

    def decode(self, enc: Encoded) -> np.ndarray:
        data = enc.arrays["data"]
        fmt = enc.meta.get("dtype", FLOAT32)
        if fmt == BFLOAT16:
            bits = torch.from_numpy(np.ascontiguousarray(data).view(np.int16))
            out = bits.view(torch.bfloat16).float().numpy()
        else:
            out = np.asarray(data, dtype=np.float32)
        return np.array(out, dtype=np.float32, copy=True).reshape(enc.shape)
