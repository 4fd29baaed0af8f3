"""TurboQuant (mse form, integer bits) in torch: :class:`kvtool.codecs.quant.turboquant.TurboQuant`'s coding on
the model's device, code for code the numpy reference's arrays.

Covers every option of the mse form the runtime recommends (``center``, ``sink``, ``unbiased``,
``norm_bits=8``); ``variant=prod`` and fractional bits run through the reference (:class:`HostCodec`).
Rows are coded in blocks of the reference's ``CHUNK`` so every matrix product sees the same operands.

:func:`parts` splits an Encoded into the pieces attention from codes reads (codes, norms, mean, sink rows)
without decoding it (:mod:`kvtool.runtime.code_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from kvtool.codecs.base import Encoded
from kvtool.codecs.quant.lloydmax import sphere_codebook
from kvtool.codecs.quant.qjl import FP16_MAX
from kvtool.codecs.quant.rotation import random_rotation
from kvtool.codecs.quant.turboquant import CHUNK, LOG8, TurboQuant
from kvtool.runtime import bitpack
from kvtool.runtime.device import ContextFn, DeviceCodec


def supported(codec: TurboQuant) -> bool:
    """Whether the torch form covers ``codec`` (the mse form at integer bits)."""
    return codec.variant == "mse" and not codec.fractional


@lru_cache(maxsize=64)
def _tables(dim: int, bits: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boundaries ``(2**b - 1,)``, centroids ``(2**b,)``, rotation ``(dim, dim)``) on ``device``."""
    cb = sphere_codebook(dim, bits)
    return (torch.from_numpy(cb.boundaries.astype(np.float32)).to(device),
            torch.from_numpy(cb.centroids.astype(np.float32)).to(device),
            random_rotation(dim, seed, 0).to(device))


def tables(dim: int, bits: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _tables(dim, bits, seed, str(device))


class TurboQuantDevice(DeviceCodec):
    """Torch TurboQuant_mse (arXiv 2504.19874, Alg. 1) with kvtool's real-cache options."""

    codec: TurboQuant

    def fit(self, x: torch.Tensor, positions: np.ndarray, context: ContextFn | None = None) -> None:
        self.codec.validate(int(x.shape[-1]))
        self.codec._first_position = int(positions[0]) if len(positions) else 0

    # -- encode -------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Encoded:
        c = self.codec
        heads, total, d = x.shape
        bits = int(c.bits)
        n_sink = min(max(c.sink - c._first_position, 0), total)
        arrays: dict[str, torch.Tensor] = {}
        if n_sink:
            arrays["sink_rows"] = x[:, :n_sink].half()
        body = x[:, n_sink:]
        tokens = body.shape[1]
        centred = None
        if c.center and tokens:
            arrays["mean"] = body.double().mean(dim=1).half()  # (heads, d)
            mean = arrays["mean"].float()
            centred = 2 * torch.einsum("htd,hd->ht", body, mean) > torch.einsum("hd,hd->h", mean, mean)[:, None]
            body = body - centred[:, :, None] * mean[:, None, :]
        rows = body.reshape(-1, d).contiguous()
        bounds, centroids, rot = tables(d, bits, int(c.seed), x.device)
        n = rows.shape[0]
        norms = torch.empty(n, device=x.device)
        codes = torch.empty(n, d, dtype=torch.uint8, device=x.device)
        for s in range(0, n, CHUNK):
            y = rows[s:s + CHUNK] @ rot.T  # rotated (chunked as the reference: same operands)
            nrm = torch.linalg.vector_norm(y, dim=1)
            y = y / nrm.clamp_min(1e-30)[:, None]
            code = torch.bucketize(y, bounds).to(torch.uint8)  # boundaries strictly below y
            codes[s:s + CHUNK] = code
            if c.unbiased:
                dot = (centroids[code.long()] * y).sum(1)
                nrm = torch.where(dot > 1e-6, nrm / dot.clamp_min(1e-6), nrm)
            norms[s:s + CHUNK] = nrm
        arrays["codes"] = bitpack.pack(codes, bits)
        norms16 = norms.clamp_max(FP16_MAX).half().view(heads, tokens)
        if centred is not None and c.norm_bits == 8:
            arrays["centred"] = bitpack.packbits_rows(centred)
        elif centred is not None:
            norms16 = torch.where(centred, -norms16, norms16)  # the sign bit says "add the mean"
        if c.norm_bits == 8:
            arrays["norms"], arrays["norms" + LOG8] = _log8(norms16)
        else:
            arrays["norms"] = norms16
        order = ("sink_rows", "mean", "norms", "codes", "centred", "norms" + LOG8)  # the reference's order
        return Encoded({k: arrays[k] for k in _reference_order(arrays, order)}, (heads, total, d), {"seed": c.seed})

    # -- decode -------------------------------------------------------------------------------------
    def decode(self, enc: Encoded) -> torch.Tensor:
        p = parts(self.codec, enc)
        heads, _, d = enc.shape
        _, centroids, rot = tables(d, p.bits, p.seed, p.codes.device)
        n = heads * p.tokens
        out = torch.empty(n, d, device=p.codes.device)
        unit = p.unit(centroids).view(n, d)
        norms = p.norms.reshape(-1)
        for s in range(0, n, CHUNK):
            torch.mm(unit[s:s + CHUNK] * norms[s:s + CHUNK, None], rot, out=out[s:s + CHUNK])
        body = out.view(heads, p.tokens, d)
        if p.centred is not None:
            body += p.centred[:, :, None] * p.mean[:, None, :]
        if p.sink is None:
            return body
        return torch.cat([p.sink.float(), body], dim=1)


def _reference_order(arrays: dict, order: tuple[str, ...]) -> list[str]:
    return [k for k in order if k in arrays]


def _log8(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvtool.codecs.quant.turboquant._log8` in torch: uint8 log-norm codes and fp16 ``(heads, 2)`` bounds."""
    logs = torch.log(torch.clamp_min(norms.float(), 1e-30))  # (heads, tokens)
    if logs.numel():
        bounds = torch.stack([logs.amin(dim=1), logs.amax(dim=1)], dim=1).half()
    else:
        bounds = torch.zeros(norms.shape[0], 2, dtype=torch.float16, device=norms.device)
    lo, hi = bounds[:, :1].float(), bounds[:, 1:].float()
    step = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    codes = torch.clamp(torch.round((logs - lo) / step), 0, 255).to(torch.uint8)
    return codes, bounds


@dataclass
class Parts:
    """A TurboQuant_mse Encoded, unpacked only as far as attention needs.

    ``codes`` packed; ``norms`` ``(heads, tokens)`` float32 (centring sign removed); ``centred``
    ``(heads, tokens)`` bool or None; ``mean`` ``(heads, d)`` float32 or None; ``sink`` ``(heads, n, d)``
    fp16 or None; ``tokens`` the coded rows per head.
    """

    codes: torch.Tensor
    norms: torch.Tensor
    centred: torch.Tensor | None
    mean: torch.Tensor | None
    sink: torch.Tensor | None
    tokens: int
    bits: int
    seed: int
    dim: int

    def code_indices(self) -> torch.Tensor:
        """``(heads, tokens, d)`` uint8 codes."""
        heads = self.norms.shape[0]
        return bitpack.unpack(self.codes, self.bits, heads * self.tokens * self.dim).view(heads, self.tokens, self.dim)

    def unit(self, centroids: torch.Tensor) -> torch.Tensor:
        """``(heads, tokens, d)`` float32: the coded unit directions in the rotated frame."""
        heads = self.norms.shape[0]
        count = heads * self.tokens * self.dim
        return bitpack.unpack_lookup(self.codes, self.bits, count, centroids).view(heads, self.tokens, self.dim)


def parts(codec: TurboQuant, enc: Encoded) -> Parts:
    """Split a TurboQuant_mse ``enc`` (torch arrays) into :class:`Parts`."""
    heads, total, d = enc.shape
    a = enc.arrays
    sink = a.get("sink_rows")
    tokens = total - (0 if sink is None else int(sink.shape[1]))
    if "norms" + LOG8 in a:
        bounds = a["norms" + LOG8].float()
        lo, hi = bounds[:, :1], bounds[:, 1:]
        step = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
        norms = torch.exp(lo + a["norms"].float() * step)
    else:
        norms = a["norms"].float()
    centred = None
    if "centred" in a:
        centred = bitpack.unpackbits_rows(a["centred"], tokens)
    elif "mean" in a:
        centred = torch.signbit(norms)
    if centred is not None:
        norms = norms.abs()
    mean = a["mean"].float() if "mean" in a else None
    return Parts(a["codes"], norms, centred, mean, sink, tokens, int(codec.bits),
                 int(enc.meta.get("seed", codec.seed)), d)
