"""Group-wise min/max quantizers (``uniform``, ``kivi``) in torch, code for code the numpy reference
(:mod:`kvtool.codecs.quant.group`): same groups, same fp16 statistics, same packed codes, same fp16 window.
"""

from __future__ import annotations

import torch

from kvtool.codecs.base import Encoded
from kvtool.codecs.quant.group import FP16_MAX, GroupQuantizer
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
        c = self.codec
        heads, _, dim = enc.shape
        quantized, _ = c._split(enc.shape)
        out = []
        if quantized:
            per_head, g, inner, pad = c._layout((heads, quantized, dim))
            levels = torch.arange(1 << c.bits, dtype=torch.float32, device=enc.arrays["codes"].device)
            codes = bitpack.unpack_lookup(enc.arrays["codes"], c.bits, heads * quantized * dim, levels)
            scale, zero = (enc.arrays[k].float().view(heads, per_head, 1, inner) for k in ("scale", "zero"))
            if c.quant_axis() == "token":  # (H, n, J, g) · stats (H, n, J, 1)
                x = codes.view(heads, quantized, dim // g, g) * scale.view(heads, quantized, -1, 1)
                out.append((x + zero.view(heads, quantized, -1, 1)).view(heads, quantized, dim))
            else:  # (H, G, g, D) · stats (H, G, 1, D)
                codes = codes.view(heads, quantized, dim)
                if pad:
                    codes = torch.cat([codes, codes.new_zeros(heads, pad, dim)], dim=1)
                x = codes.view(heads, per_head, g, dim) * scale + zero
                out.append(x.view(heads, -1, dim)[:, :quantized])
        if "residual" in enc.arrays:
            out.append(enc.arrays["residual"].float())
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]
