"""Shared machinery of group-wise scalar quantizers (``uniform``, ``kivi``).

A :class:`GroupQuantizer` cuts the tensor into groups of ``group`` consecutive elements along one axis,
asks the subclass to ``quantize`` each group into integer codes plus per-group statistics (fp16 scale and
zero point, say), bit-packs the codes densely and stores the statistics as they are. The most recent
``residual_tokens()`` tokens may be kept in fp16 (KIVI's full-precision window). Everything stored is
counted: codes, statistics and the residual window.

Axes, for ``x`` of shape ``(heads, tokens, head_dim)``:

* ``token`` — per-token quantization: groups run along head_dim, so ``group`` must divide head_dim
  (``0`` = the whole head_dim). Codes are stored in ``(heads, tokens, head_dim)`` order.
* ``channel`` — per-channel quantization: groups run along tokens (``0`` = all tokens). A last partial
  group gets its own statistics (the tokens are padded with the last one for measuring, and the padding
  is not stored).

Codes are stored in the natural ``(heads, tokens, head_dim)`` order on both axes; statistics in
``(heads, tokens/g, head_dim)`` order on the channel axis and ``(heads, tokens, head_dim/g)`` on the
token axis.

Speed: the per-group min/max comes from torch (vectorised row reductions over the whole tensor); the rest
runs in numpy on blocks of about a million elements, on ``torch.get_num_threads()`` threads, with codes
packed block by block while they are still in cache.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from kvtool.codecs.base import Codec, Encoded, check_input, check_int_range
from kvtool.codecs.bitpack import pack, packed_size, unpack
from kvtool.errors import CodecError

AXES = ("token", "channel")
#: Streaming block of per-channel groups that span the whole token axis (``group=0``): a growing cache has
#: no whole axis, so each block of this many tokens gets its own statistics.
STREAM_CHANNEL_BLOCK = 128
FP16_MAX = 65504.0
#: Elements per work block: a block's floats, codes and packed bytes stay in cache.
BLOCK_ELEMENTS = 1 << 20
T = TypeVar("T")
R = TypeVar("R")


class GroupQuantizer(Codec):
    """Intermediate base: subclasses define fields ``bits`` and ``group`` and write quantize/dequantize."""

    bits: int
    group: int

    # -- what subclasses provide ----------------------------------------------------------------------
    def quant_axis(self) -> str:
        """``"token"`` or ``"channel"``; the default reads the ``axis`` field."""
        return getattr(self, "axis", "token")

    def residual_tokens(self) -> int:
        """How many of the most recent tokens are stored in fp16 instead of quantized."""
        return 0

    def without_residual(self) -> GroupQuantizer:
        """This quantizer with no fp16 window of its own (codecs with a ``residual`` override it)."""
        return self

    def streaming_form(self) -> tuple[int, Codec]:
        """A block is the codec's own fp16 window when it has one (KIVI, arXiv 2402.02750 §3.3: the
        residual tokens are quantized together once there are ``residual`` of them), else one
        per-channel group of tokens, else one token (per-token groups code each token on its own)."""
        if self.quant_axis() == "channel":
            block = self.residual_tokens() or self.group or STREAM_CHANNEL_BLOCK
        else:
            block = self.residual_tokens() or 1
        return max(block, 1), self.without_residual()

    @abstractmethod
    def quantize(self, blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``blocks`` ``(n, g, inner)`` float32 — group ``[i, :, j]`` — with the groups' minima and maxima
        ``lo``, ``hi`` ``(n, inner)`` → codes ``(n, g, inner)`` uint8 < 2**bits and per-group statistics
        ``{name: (n, inner)}`` in the dtype they are stored in."""

    @abstractmethod
    def dequantize(self, codes: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`quantize`: codes ``(n, g, inner)`` uint8 → float32 ``(n, g, inner)``."""

    # -- validation -----------------------------------------------------------------------------------
    def validate(self, head_dim: int | None = None) -> None:
        check_int_range("bits", self.bits, 1, 8)
        if self.group < 0:
            raise CodecError(f"group must be 0 (whole axis) or a positive size, got {self.group}")
        if head_dim is None or self.quant_axis() == "channel" or self.group == 0:
            return
        if head_dim % self.group:
            divisors = [str(g) for g in range(1, head_dim + 1) if head_dim % g == 0]
            raise CodecError(
                f"group must divide head_dim={head_dim} for per-token groups: one of 0 (whole head_dim), "
                f"{', '.join(divisors)}; got {self.group}"
            )

    # -- layout -------------------------------------------------------------------------------------
    # One head's quantized tokens (Tq, d) are viewed as blocks (n, g, inner): groups of g elements along
    # axis 1. Token axis: (Tq*d/g, g, 1); channel axis: (Tq/g, g, d) — g tokens of one channel, with no
    # transpose, so codes keep the natural (heads, tokens, head_dim) order on both axes.
    def _group_size(self, quant_shape: tuple[int, int, int]) -> int:
        heads, tokens, dim = quant_shape
        whole = dim if self.quant_axis() == "token" else tokens
        return self.group or whole

    def _layout(self, quant_shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
        """(rows per head, g, inner, padding tokens) for quantized tokens of ``quant_shape``."""
        heads, tokens, dim = quant_shape
        g = self._group_size(quant_shape)
        if self.quant_axis() == "token":
            return tokens * dim // g, g, 1, 0
        pad = -tokens % g  # a last partial group is padded with the last token to measure it
        return (tokens + pad) // g, g, dim, pad

    def _split(self, shape: tuple[int, int, int]) -> tuple[int, int]:
        tokens = shape[1]
        residual = min(max(self.residual_tokens(), 0), tokens)
        return tokens - residual, residual

    def _jobs(self, heads: int, per_head: int, g: int, inner: int) -> tuple[list[tuple[int, int]], int]:
        rows = max(8, BLOCK_ELEMENTS // (g * inner) // 8 * 8)  # 8 rows always pack to whole bytes
        return [(h, s) for h in range(heads) for s in range(0, per_head, rows)], rows

    # -- the contract -------------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        self.validate(x.shape[-1])
        quantized, residual = self._split(x.shape)
        arrays: dict[str, np.ndarray] = {}
        if quantized:
            arrays.update(self._encode_quantized(x[:, :quantized]))
        if residual:
            arrays["residual"] = x[:, quantized:].astype(np.float16)  # (heads, residual, d)
        return Encoded(arrays, x.shape)

    def _encode_quantized(self, xq: np.ndarray) -> dict[str, np.ndarray]:
        """``xq`` (heads, Tq, d), each head contiguous → packed codes and statistics."""
        heads, tokens, dim = xq.shape
        per_head, g, inner, pad = self._layout(xq.shape)
        if pad:
            xq = np.concatenate([xq, np.repeat(xq[:, -1:], pad, axis=1)], axis=1)
        fused = pad == 0 and tokens * dim % 8 == 0  # pack block by block, in storage order
        grouped = torch.from_numpy(xq).reshape(heads, per_head, g, inner)
        lo, hi = grouped.amin(dim=2).numpy(), grouped.amax(dim=2).numpy()  # (heads, per_head, inner)
        jobs, rows = self._jobs(heads, per_head, g, inner)

        def work(job: tuple[int, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            h, start = job
            part = slice(start, start + rows)
            blocks = xq[h].reshape(per_head, g, inner)[part]
            codes, stats = self.quantize(blocks, lo[h, part], hi[h, part])
            return (pack(codes, self.bits) if fused else codes.reshape(-1)), stats

        parts = parallel_map(work, jobs)
        stats = {k: np.concatenate([p[1][k].reshape(-1) for p in parts]) for k in parts[0][1]}
        codes = np.concatenate([p[0] for p in parts])
        if not fused:
            codes = pack(codes.reshape(heads, tokens + pad, dim)[:, :tokens], self.bits)
        return {"codes": codes, **stats}

    def decode(self, enc: Encoded) -> np.ndarray:
        heads, tokens, dim = enc.shape
        quantized, residual = self._split(enc.shape)
        out = np.empty(enc.shape, dtype=np.float32)
        if quantized:
            stats = {k: v for k, v in enc.arrays.items() if k not in ("codes", "residual")}
            self._decode_quantized(enc.arrays["codes"], stats, out[:, :quantized])
        if residual:
            out[:, quantized:] = enc.arrays["residual"]
        return out

    def _decode_quantized(self, packed: np.ndarray, stats: dict[str, np.ndarray], target: np.ndarray) -> None:
        """Decode into ``target`` (heads, Tq, d), a view whose heads are contiguous."""
        heads, tokens, dim = target.shape
        per_head, g, inner, pad = self._layout(target.shape)
        fused = pad == 0 and tokens * dim % 8 == 0
        stats = {k: v.reshape(heads, per_head, inner) for k, v in stats.items()}
        codes = dest = None
        if not fused:  # unpack whole; restore the padding so every group is full
            codes = unpack(packed, self.bits, heads * tokens * dim).reshape(heads, tokens, dim)
            codes = np.pad(codes, ((0, 0), (0, pad), (0, 0)))
            dest = np.empty(codes.shape, dtype=np.float32)
        jobs, rows = self._jobs(heads, per_head, g, inner)

        def work(job: tuple[int, int]) -> None:
            h, start = job
            stop = min(start + rows, per_head)
            if codes is None:
                first = packed_size((h * per_head + start) * g * inner, self.bits)
                block = unpack(packed[first:], self.bits, (stop - start) * g * inner).reshape(-1, g, inner)
                out = target[h].reshape(per_head, g, inner)
            else:
                block = codes[h].reshape(per_head, g, inner)[start:stop]
                out = dest[h].reshape(per_head, g, inner)
            out[start:stop] = self.dequantize(block, {k: v[h, start:stop] for k, v in stats.items()})

        parallel_map(work, jobs)
        if dest is not None:
            target[:] = dest[:, :tokens]


def parallel_map(fn: Callable[[T], R], jobs: list[T]) -> list[R]:
    """``[fn(j) for j in jobs]`` on ``torch.get_num_threads()`` threads (numpy releases the GIL)."""
    threads = min(torch.get_num_threads(), len(jobs))
    if threads <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, jobs))


def minmax_quantize(blocks: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Asymmetric min/max quantization of each group ``blocks[i, :, j]`` (``(n, g, inner)``) to ``bits``.

    ``lo``, ``hi`` ``(n, inner)``: the groups' minima and maxima.
    ``scale = (max - min) / (2**bits - 1)`` and ``zero = min`` are stored in fp16; the codes are computed
    against the fp16-rounded values so decoding reproduces exactly what was measured.
    """
    levels = (1 << bits) - 1
    lo, hi = np.clip(lo, -FP16_MAX, FP16_MAX), np.clip(hi, -FP16_MAX, FP16_MAX)
    scale, zero = ((hi - lo) / levels).astype(np.float16), lo.astype(np.float16)  # (n, inner)
    s, z = scale.astype(np.float32), zero.astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    t = blocks * inv[:, None]  # (n, g, inner): (x - zero) / scale + 0.5, truncated below = rounded
    t -= (z * inv - 0.5)[:, None]
    np.clip(t, 0.0, levels + 0.5 - 1e-3, out=t)
    return t.astype(np.uint8), {"scale": scale, "zero": zero}


def minmax_dequantize(codes: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`minmax_quantize`: ``zero + code * scale`` in float32, ``(n, g, inner)``."""
    out = codes * stats["scale"].astype(np.float32)[:, None]
    out += stats["zero"].astype(np.float32)[:, None]
    return out
