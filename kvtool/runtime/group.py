"""Group-wise min/max quantizers (``uniform``, ``kivi``) in torch, code for code the numpy reference
(:mod:`kvtool.codecs.group`): same groups, same fp16 statistics, same packed codes, same fp16 window.

:func:`group_parts` exposes an Encoded's codes and per-group ``scale``/``zero`` as ``(heads, tokens, d)``-
aligned tensors for attention from codes (:mod:`kvtool.runtime.code_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtool.codecs.base import Encoded
from kvtool.codecs.group import FP16_MAX, GroupQuantizer
from kvtool.runtime import bitpack
from kvtool.runtime.device import DeviceCodec


class GroupDevice(DeviceCodec):
    """Torch form of a :class:`GroupQuantizer` whose groups are min/max quantized (uniform, KIVI)."""

    codec: GroupQuantizer

    def encode(self, x: torch.Tensor) -> Encoded:
        c = self.codec
        c.validate(int(x.shape[-1]))
        quantized, residual = c._split(tuple(x.shape))
        arrays: dict[str, torch.Tensor] = {}
        if quantized:
            arrays.update(self._encode_quantized(x[:, :quantized]))
        if residual:
            arrays["residual"] = x[:, quantized:].half()
        return Encoded(arrays, tuple(x.shape))

    def _encode_quantized(self, xq: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.codec
        heads, tokens, dim = xq.shape
        per_head, g, inner, pad = c._layout(tuple(xq.shape))
        if pad:
            xq = torch.cat([xq, xq[:, -1:].expand(heads, pad, dim)], dim=1)
        grouped = xq.reshape(heads, per_head, g, inner)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)  # (heads, per_head, inner)
        levels = (1 << c.bits) - 1
        lo, hi = lo.clamp(-FP16_MAX, FP16_MAX), hi.clamp(-FP16_MAX, FP16_MAX)
        scale, zero = ((hi - lo) / levels).half(), lo.half()
        s, z = scale.float(), zero.float()
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        t = grouped * inv[:, :, None]  # (x - zero) / scale + 0.5, truncated below = rounded
        t -= (z * inv - 0.5)[:, :, None]
        t.clamp_(0.0, levels + 0.5 - 1e-3)
        codes = t.to(torch.uint8).reshape(heads, tokens + pad, dim)[:, :tokens]
        return {"codes": bitpack.pack(codes, c.bits), "scale": scale.reshape(-1), "zero": zero.reshape(-1)}

    def decode(self, enc: Encoded) -> torch.Tensor:
        p = group_parts(self.codec, enc)
        out = []
        if p.tokens:
            out.append(p.dequantize())
        if p.residual is not None:
            out.append(p.residual.float())
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]


@dataclass
class GroupParts:
    """A group-quantized Encoded: ``codes`` ``(heads, tokens, d)`` uint8, ``scale``/``zero`` float32
    broadcast per element as ``(heads, tokens, d)`` views (expanded, not copied, where the groups allow),
    and the fp16 ``residual`` window ``(heads, r, d)`` or None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    residual: torch.Tensor | None
    tokens: int

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale + self.zero


def group_parts(codec: GroupQuantizer, enc: Encoded) -> GroupParts:
    heads, total, dim = enc.shape
    quantized, _ = codec._split(enc.shape)
    residual = enc.arrays.get("residual")
    if not quantized:
        empty = torch.zeros(heads, 0, dim, device=residual.device)
        return GroupParts(empty.to(torch.uint8), empty, empty, residual, 0)
    per_head, g, inner, pad = codec._layout((heads, quantized, dim))
    codes = bitpack.unpack(enc.arrays["codes"], codec.bits, heads * quantized * dim).view(heads, quantized, dim)
    stats = [enc.arrays[k].float().view(heads, per_head, inner) for k in ("scale", "zero")]
    if codec.quant_axis() == "token":  # groups of g channels: (heads, tokens, d // g) → each channel
        stats = [s.view(heads, quantized, dim // g).repeat_interleave(g, dim=2) for s in stats]
    else:  # groups of g tokens per channel: (heads, groups, d) → each token
        stats = [s.repeat_interleave(g, dim=1)[:, :quantized] for s in stats]
    return GroupParts(codes, stats[0], stats[1], residual, quantized)
