"""``qjl``: the 1-bit Quantized Johnson-Lindenstrauss sketch of keys (Zandieh et al., arXiv 2406.03482).

Each key ``k`` (a row of ``(heads, tokens, head_dim)``) is stored as ``sign(S k)`` — ``m`` bits, packed
densely — and its norm ``‖k‖`` in fp16; ``S`` is an ``(m, head_dim)`` i.i.d. N(0, 1) matrix rebuilt from
the seed (stored in ``meta``). The paper's asymmetric estimator (§3, Lemma 3.2) keeps the query exact:

    ⟨q, k⟩ ≈ sqrt(π/2) / m · ‖k‖ · ⟨S q, sign(S k)⟩,

which is unbiased over ``S``. ``decode`` returns ``k̂ = sqrt(π/2) / m · ‖k‖ · Sᵀ sign(S k)``, whose inner
product with any ``q`` is exactly that estimator, so attention metrics on decoded keys measure QJL as the
paper uses it. ``k̂`` itself is not close to ``k`` (its rel MSE is about ``(π/2)·d/m``): QJL is an
inner-product codec, meant for keys.

Stored bits per element: ``(m + 16) / head_dim`` — 1.25 at ``m = head_dim = 64``. The paper's extra
outlier-channel handling is not included (TurboQuant's fractional split covers that idea).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kvtool.codecs import bitpack
from kvtool.codecs.base import Codec, Encoded, check_input, check_int_range, register
from kvtool.codecs.quant.rotation import gaussian_projection
from kvtool.errors import CodecError

#: Vectors per block: keeps a block's projections and signs in cache (a multiple of 8 for bitpack).
CHUNK = 16384
#: E|⟨s, u⟩| = sqrt(2/π) for s ~ N(0, I) and a unit u: the estimator rescales by its inverse.
SCALE = math.sqrt(math.pi / 2)
FP16_MAX = float(np.finfo(np.float16).max)


def sign_sketch(r: torch.Tensor, proj: torch.Tensor) -> np.ndarray:
    """Packed ``sign(r Sᵀ)`` bits (1 = non-negative) of rows ``r`` ``(n, d)`` with ``proj`` = S ``(m, d)``.

    Returns ``ceil(n * m / 8)`` bytes, row-major; ``n`` must be a multiple of 8 unless it is the last block.
    """
    return bitpack.pack((r @ proj.T >= 0).numpy().view(np.uint8), 1)


def sign_unsketch(packed: np.ndarray, n: int, proj: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``sqrt(π/2)/m · scale · Sᵀ sign`` for ``n`` packed sign rows: ``(n, d)`` float32.

    ``scale`` ``(n,)`` is the norm of each sketched vector.
    """
    m = proj.shape[0]
    bits = torch.from_numpy(bitpack.unpack(packed, 1, n * m)).view(n, m).float()
    # sign = 2·bit − 1, so Sᵀ sign = 2·(bits @ S) − Σ_rows S: one fused matmul, no ±1 tensor
    out = torch.addmm(proj.sum(0, keepdim=True), bits, proj, beta=-1, alpha=2)  # (n, d)
    out.mul_((scale * (SCALE / m))[:, None])
    return out


def as_rows(x: np.ndarray, dim: int) -> torch.Tensor:
    """``x`` as a ``(n, dim)`` float32 tensor sharing memory when possible (torch needs it writable)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(x if x.flags.writeable else x.copy()).view(-1, dim)


def fp16_norms(norms: torch.Tensor) -> np.ndarray:
    """Norms as stored: fp16, clipped to its largest finite value (about 65504) rather than inf."""
    return norms.clamp_max(FP16_MAX).numpy().astype(np.float16)


@register
@dataclass
class QJL(Codec):
    """``qjl:sketch=0,seed=0`` — 1-bit JL sketch of each vector plus its fp16 norm.

    ``sketch`` is the number of projections ``m`` (0 = head_dim, the paper's default); ``seed`` picks ``S``.
    """

    sketch: int = 0
    seed: int = 0
    name: ClassVar[str] = "qjl"

    def validate(self, head_dim: int | None = None) -> None:
        check_int_range("sketch", self.sketch, 0, 1 << 16)
        if self.seed < 0:
            raise CodecError(f"seed must be a non-negative integer, got {self.seed}")

    def _m(self, head_dim: int) -> int:
        return self.sketch or head_dim

    def encode(self, x: np.ndarray) -> Encoded:
        """Encode ``x`` ``(heads, tokens, head_dim)``: arrays ``signs`` (packed bits) and ``norms`` fp16."""
        x = check_input(x)
        heads, tokens, d = x.shape
        proj = gaussian_projection(self._m(d), d, self.seed)
        rows = as_rows(x, d)
        norms = torch.linalg.vector_norm(rows, dim=1)
        signs = [sign_sketch(rows[s : s + CHUNK], proj) for s in range(0, rows.shape[0], CHUNK)]
        arrays = {
            "signs": np.concatenate(signs) if signs else np.zeros(0, np.uint8),
            "norms": fp16_norms(norms).reshape(heads, tokens),
        }
        return Encoded(arrays, x.shape, {"seed": self.seed})

    def decode(self, enc: Encoded) -> np.ndarray:
        """``sqrt(π/2)/m · ‖k‖ · Sᵀ sign(S k)`` for every row: float32 ``enc.shape``."""
        heads, tokens, d = enc.shape
        m = self._m(d)
        proj = gaussian_projection(m, d, int(enc.meta.get("seed", self.seed)))
        norms = torch.from_numpy(enc.arrays["norms"].astype(np.float32).reshape(-1))
        packed = enc.arrays["signs"]
        n = heads * tokens
        out = torch.empty(n, d)
        step = CHUNK * m // 8  # bytes per full block (CHUNK is a multiple of 8)
        for i, s in enumerate(range(0, n, CHUNK)):
            k = min(CHUNK, n - s)
            out[s : s + k] = sign_unsketch(packed[i * step : i * step + (k * m + 7) // 8], k, proj, norms[s : s + k])
        return out.numpy().reshape(enc.shape)
