"""``polarquant``: random preconditioning + recursive polar transform (Han et al., arXiv 2502.02617).

Each vector (a row of ``(heads, tokens, head_dim)``) is rotated by a seeded Haar-random orthogonal matrix
(§3, "random preconditioning"; only the seed is stored), then converted to polar coordinates recursively
(§3.1, Alg. 1): level 1 turns the ``d/2`` coordinate pairs into an angle ``ψ ∈ [0, 2π)`` and a radius;
level ``ℓ ≥ 2`` turns pairs of level-``ℓ-1`` radii into an angle ``ψ ∈ [0, π/2]`` and a radius. After
``L`` levels, ``d / 2**L`` radii remain; they are stored in fp16. Only angles are quantized, so no
per-block scale or zero point is needed.

After preconditioning the angles have known distributions (Lemma 2): level 1 uniform on ``[0, 2π)``,
level ``ℓ`` with density ``∝ sin^(2^(ℓ-1) - 1)(2ψ)`` on ``[0, π/2]``, ever more concentrated at ``π/4``.
Each level's angles are quantized with the Lloyd-Max codebook of its density (uniform cells at level 1),
computed once and cached. The paper's default (§4) is ``L = 4`` levels, 4 bits for level-1 angles and
2 bits for the others.

Stored bits per element: ``bits/2 + upper_bits·(1/2 - 2^-L) + 16/2^L``; the default is
``2 + 0.875 + 1 = 3.875`` at any head_dim divisible by 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import numpy as np
import torch

from kvtool.codecs import bitpack
from kvtool.codecs.base import Codec, Encoded, check_input, check_int_range, register
from kvtool.codecs.quant.qjl import as_rows, fp16_norms
from kvtool.codecs.quant.rotation import random_rotation
from kvtool.codecs.quant.turboquant import join_packed
from kvtool.errors import CodecError

#: Vectors per block (a multiple of 8 for bitpack).
CHUNK = 16384
TWO_PI = 2 * math.pi


@cache
def angle_codebook(level: int, bits: int, grid: int = 1 << 15) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd-Max ``(centroids (2**bits,), boundaries (2**bits - 1,))`` for level-``level`` angles (≥ 2).

    Density ``∝ sin^(n-1)(2ψ)`` on ``[0, π/2]`` with ``n = 2**(level-1)`` (arXiv 2502.02617, Lemma 2),
    discretized on ``grid`` cells; the Lloyd iteration runs on prefix sums, so each step is O(grid).
    """
    n = 2 ** (level - 1)
    psi = (np.arange(grid) + 0.5) * (math.pi / 2 / grid)  # cell midpoints
    w = np.exp((n - 1) * np.log(np.maximum(np.sin(2 * psi), 1e-300)))
    w /= w.sum()
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cwp = np.concatenate([[0.0], np.cumsum(w * psi)])
    levels = 2**bits
    c = np.interp((np.arange(levels) + 0.5) / levels, cw[1:], psi)  # start at the quantiles
    for _ in range(2000):
        t = (c[1:] + c[:-1]) / 2
        idx = np.concatenate([[0], np.searchsorted(psi, t), [grid]])
        mass = cw[idx[1:]] - cw[idx[:-1]]
        new = np.where(mass > 0, (cwp[idx[1:]] - cwp[idx[:-1]]) / np.maximum(mass, 1e-300), c)
        if np.max(np.abs(new - c)) < 1e-12:
            c = new
            break
        c = new
    return c, (c[1:] + c[:-1]) / 2


def _upper_codes(even: np.ndarray, odd: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Codes of ``ψ = atan2(odd, even) ∈ [0, π/2]`` against angle ``boundaries``, without the atan2.

    Both inputs are radii (non-negative), so ``ψ > θ`` exactly when ``odd > even · tan θ``.
    """
    codes = np.zeros(even.shape, dtype=np.uint8)
    for tan in np.tan(boundaries).astype(np.float32):
        codes += np.greater(odd, even * tan).view(np.uint8)
    return codes


@cache
def _cos_sin(level: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded ``cos ψ`` and ``sin ψ`` per code at one level: two ``(2**bits,)`` float32 tables."""
    if level == 1:
        psi = (np.arange(1 << bits) + 0.5) * (TWO_PI / (1 << bits))  # cell centres on the circle
    else:
        psi = angle_codebook(level, bits)[0]
    return torch.from_numpy(np.cos(psi).astype(np.float32)), torch.from_numpy(np.sin(psi).astype(np.float32))


@register
@dataclass
class PolarQuant(Codec):
    """``polarquant:bits=4,upper_bits=2,levels=4,seed=0`` — quantized polar angles + fp16 radii.

    ``bits``: level-1 angle bits (1..8); ``upper_bits``: bits of the angles of levels 2..L (1..8);
    ``levels``: recursion depth L (1..8; head_dim must be divisible by ``2**levels``); ``seed``: rotation.
    """

    bits: int = 4
    upper_bits: int = 2
    levels: int = 4
    seed: int = 0
    name: ClassVar[str] = "polarquant"

    def validate(self, head_dim: int | None = None) -> None:
        check_int_range("bits", self.bits, 1, 8)
        check_int_range("upper_bits", self.upper_bits, 1, 8)
        check_int_range("levels", self.levels, 1, 8)
        if self.seed < 0:
            raise CodecError(f"seed must be a non-negative integer, got {self.seed}")
        if head_dim is not None and head_dim % (1 << self.levels):
            allowed = [lv for lv in range(1, 9) if head_dim % (1 << lv) == 0]
            raise CodecError(
                f"levels must be one of {', '.join(map(str, allowed)) or 'none'} at head_dim {head_dim} "
                f"(head_dim must be divisible by 2**levels), got {self.levels}"
            )

    def _bits(self, level: int) -> int:
        return self.bits if level == 1 else self.upper_bits

    def encode(self, x: np.ndarray) -> Encoded:
        """Encode ``x`` ``(heads, tokens, head_dim)``: arrays ``level1``..``levelL`` (packed angle codes, one
        per level) and ``radii`` fp16 ``(heads, tokens, head_dim / 2**levels)``."""
        x = check_input(x)
        heads, tokens, d = x.shape
        self.validate(d)
        rot = random_rotation(d, self.seed)
        rows = as_rows(x, d)
        n = rows.shape[0]
        codes: list[list[np.ndarray]] = [[] for _ in range(self.levels)]
        radii = torch.empty(n, d >> self.levels)
        for s in range(0, n, CHUNK):
            r = rows[s : s + CHUNK] @ rot.T  # (c, d) preconditioned
            for level in range(1, self.levels + 1):
                even, odd = r[:, 0::2], r[:, 1::2]  # (c, width/2) each
                if level == 1:  # uniform on the circle: equal cells are the Lloyd-Max quantizer
                    k = 1 << self.bits
                    psi = torch.atan2(odd, even).remainder_(TWO_PI)
                    c = psi.mul_(k / TWO_PI).floor_().clamp_(0, k - 1).to(torch.uint8).numpy()
                else:
                    c = _upper_codes(even.numpy(), odd.numpy(), angle_codebook(level, self.upper_bits)[1])
                codes[level - 1].append(bitpack.pack(c, self._bits(level)))
                r = torch.hypot(even, odd)
            radii[s : s + CHUNK] = r
        arrays = {f"level{i + 1}": join_packed(c) for i, c in enumerate(codes)}
        arrays["radii"] = fp16_norms(radii).reshape(heads, tokens, d >> self.levels)
        return Encoded(arrays, x.shape, {"seed": self.seed})

    def decode(self, enc: Encoded) -> np.ndarray:
        """Rebuild float32 ``enc.shape`` ``(heads, tokens, head_dim)`` from the angles and radii."""
        heads, tokens, d = enc.shape
        rot = random_rotation(d, int(enc.meta.get("seed", self.seed)))
        n = heads * tokens
        radii = torch.from_numpy(enc.arrays["radii"].astype(np.float32).reshape(n, d >> self.levels))
        out = torch.empty(n, d)
        for i, s in enumerate(range(0, n, CHUNK)):
            k = min(CHUNK, n - s)
            r = radii[s : s + k]
            for level in range(self.levels, 0, -1):
                width = d >> level  # angles per vector at this level
                bits = self._bits(level)
                step = CHUNK * width * bits // 8
                block = enc.arrays[f"level{level}"][i * step : (i + 1) * step]
                idx = torch.from_numpy(bitpack.unpack(block, bits, k * width)).int()  # (k * width,)
                cos, sin = _cos_sin(level, bits)
                up = torch.empty(k, 2 * width)
                up[:, 0::2] = r * torch.index_select(cos, 0, idx).view(k, width)
                up[:, 1::2] = r * torch.index_select(sin, 0, idx).view(k, width)
                r = up
            torch.mm(r, rot, out=out[s : s + k])
        return out.numpy().reshape(enc.shape)
