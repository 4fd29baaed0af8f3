"""``kivi``: KIVI — keys quantized per channel, values per token, recent tokens kept in fp16.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750, §3–4:
key outliers live in fixed channels, so keys are grouped along tokens per channel; value errors matter
per token, so values are grouped along channels per token; the most recent ``residual`` tokens stay in
full precision (here fp16, counted). Paper defaults: 2 bits, group 32, residual 128.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from kvtool.codecs.base import Codec, check_int_range, choice_error, register
from kvtool.codecs.quant.uniform import Uniform
from kvtool.errors import CodecError

ROLE_AXIS = {"keys": "channel", "values": "token"}


@register
@dataclass
class Kivi(Uniform):
    """``kivi:bits=2,axis=auto,group=32,residual=128`` — keys per channel, values per token, recent tokens in fp16.

    ``axis=auto`` is resolved by the pair parser (:meth:`for_role`): channel for keys, token for values.
    Stored bits per element ≈ ``b + 32/group`` on the quantized tokens and 16 on the residual window.
    """

    bits: int = 2
    axis: Literal["auto", "token", "channel"] = "auto"
    group: int = 32
    residual: int = 128
    name = "kivi"

    def validate(self, head_dim: int | None = None) -> None:
        if self.axis not in ("auto", "token", "channel"):
            raise choice_error("axis", "auto, token, channel", self.axis)
        if self.residual < 0:
            raise CodecError(f"residual must be a token count >= 0, got {self.residual}")
        check_int_range("bits", self.bits, 1, 8)
        super().validate(head_dim)

    def quant_axis(self) -> str:
        if self.axis == "auto":
            raise CodecError(
                "kivi axis=auto needs a role: use --keys/--values/--method, or set axis=token|channel"
            )
        return self.axis

    def for_role(self, role: str) -> Codec:
        codec = super().for_role(role)
        return replace(codec, axis=ROLE_AXIS[role]) if self.axis == "auto" else codec

    def residual_tokens(self) -> int:
        return self.residual

    def without_residual(self) -> Kivi:
        return replace(self, residual=0)
