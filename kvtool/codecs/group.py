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
  group gets its own statistics; codes are stored in ``(heads, head_dim, tokens)`` order.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from kvtool.codecs.base import Codec, Encoded, check_input, check_int_range
from kvtool.codecs.bitpack import pack, unpack
from kvtool.errors import CodecError

AXES = ("token", "channel")
FP16_MAX = 65504.0


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

    @abstractmethod
    def quantize(self, blocks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``blocks`` ``(n_groups, group)`` float32 → codes ``(n_groups, group)`` uint8 < 2**bits and
        per-group statistics ``{name: (n_groups,)}`` in the dtype they are stored in."""

    @abstractmethod
    def dequantize(self, codes: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`quantize`: codes ``(n_groups, group)`` uint8 → float32 ``(n_groups, group)``."""

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
    def _group_size(self, quant_shape: tuple[int, int, int]) -> int:
        heads, tokens, dim = quant_shape
        whole = dim if self.quant_axis() == "token" else tokens
        return self.group or whole

    def _to_blocks(self, xq: np.ndarray) -> torch.Tensor:
        """``xq`` (heads, Tq, d) → (n_groups, g) float32, channel axis padded with the last token."""
        g = self._group_size(xq.shape)
        t = torch.from_numpy(xq)
        if self.quant_axis() == "token":
            return t.reshape(-1, g)
        t = t.transpose(1, 2)  # (heads, d, Tq)
        pad = -t.shape[-1] % g
        if pad:
            t = torch.cat([t, t[..., -1:].expand(*t.shape[:-1], pad)], dim=-1)
        return t.reshape(-1, g)

    def _codes_from_blocks(self, codes: torch.Tensor, quant_shape: tuple[int, int, int]) -> np.ndarray:
        """Drop the channel-axis padding: codes in storage order, flat uint8."""
        heads, tokens, dim = quant_shape
        if self.quant_axis() == "channel":
            codes = codes.reshape(heads, dim, -1)[..., :tokens]
        return codes.contiguous().numpy().reshape(-1)

    def _blocks_from_codes(self, codes: np.ndarray, quant_shape: tuple[int, int, int]) -> torch.Tensor:
        heads, tokens, dim = quant_shape
        g = self._group_size(quant_shape)
        t = torch.from_numpy(codes)
        if self.quant_axis() == "channel":
            t = t.reshape(heads, dim, tokens)
            pad = -tokens % g
            if pad:
                t = torch.nn.functional.pad(t, (0, pad))
        return t.reshape(-1, g)

    def _values_from_blocks(self, blocks: torch.Tensor, quant_shape: tuple[int, int, int]) -> torch.Tensor:
        heads, tokens, dim = quant_shape
        if self.quant_axis() == "token":
            return blocks.reshape(heads, tokens, dim)
        return blocks.reshape(heads, dim, -1)[..., :tokens].transpose(1, 2)

    # -- the contract -------------------------------------------------------------------------------
    def _split(self, shape: tuple[int, int, int]) -> tuple[int, int]:
        tokens = shape[1]
        residual = min(max(self.residual_tokens(), 0), tokens)
        return tokens - residual, residual

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        self.validate(x.shape[-1])
        quantized, residual = self._split(x.shape)
        xq = x[:, :quantized]
        arrays: dict[str, np.ndarray] = {}
        if xq.size:
            codes, stats = self.quantize(self._to_blocks(np.ascontiguousarray(xq)))
            arrays["codes"] = pack(self._codes_from_blocks(codes, xq.shape), self.bits)
            arrays.update({k: v.contiguous().numpy() for k, v in stats.items()})
        if residual:
            arrays["residual"] = x[:, quantized:].astype(np.float16)  # (heads, residual, d)
        return Encoded(arrays, x.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        heads, tokens, dim = enc.shape
        quantized, residual = self._split(enc.shape)
        out = np.empty(enc.shape, dtype=np.float32)
        if quantized:
            quant_shape = (heads, quantized, dim)
            codes = unpack(enc.arrays["codes"], self.bits, heads * quantized * dim)
            stats = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in enc.arrays.items()
                     if k not in ("codes", "residual")}
            blocks = self.dequantize(self._blocks_from_codes(codes, quant_shape), stats)
            out[:, :quantized] = self._values_from_blocks(blocks, quant_shape).numpy()
        if residual:
            out[:, quantized:] = enc.arrays["residual"]
        return out


def minmax_quantize(blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Asymmetric min/max quantization of each row of ``blocks`` ``(n, g)`` to ``bits`` bits.

    ``scale = (max - min) / (2**bits - 1)`` and ``zero = min`` are stored in fp16; the codes are computed
    against the fp16-rounded values so decoding reproduces exactly what was measured.
    """
    levels = (1 << bits) - 1
    lo, hi = torch.aminmax(blocks, dim=-1, keepdim=True)  # (n, 1) each
    lo, hi = lo.clamp(-FP16_MAX, FP16_MAX), hi.clamp(-FP16_MAX, FP16_MAX)
    scale, zero = ((hi - lo) / levels).half(), lo.half()
    s, z = scale.float(), zero.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = (blocks - z).mul_(inv).round_().clamp_(0, levels).to(torch.uint8)  # (n, g)
    return codes, {"scale": scale.squeeze(-1), "zero": zero.squeeze(-1)}


def minmax_dequantize(codes: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`minmax_quantize`: ``zero + code * scale`` in float32, ``(n, g)``."""
    scale = stats["scale"].float().unsqueeze(-1)  # (n, 1)
    zero = stats["zero"].float().unsqueeze(-1)
    return torch.addcmul(zero, codes.float(), scale)
