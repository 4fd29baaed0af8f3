"""Attention computed from codes: a layer's softmax(q·kᵀ)·v over a compact track's coded blocks, without
rebuilding the float keys.

TurboQuant_mse (arXiv 2504.19874, §3: inner products with a rotated codebook). A key is
``k = ‖k‖ · (c[code] Π) + [centred] μ`` (``c`` the Lloyd-Max centroids, ``Π`` the seeded rotation, ``μ``
the optional per-head mean), so ``q·k = ‖k‖ · (q Πᵀ)·c[code] + [centred] q·μ``: the query is rotated once
per step and meets the codebook lookup of each key in the rotated frame — no inverse rotation, no norm
scaling per key. Values are accumulated the same way: ``Σ p v = ((p ⊙ ‖v‖) · c[code]) Π + (p·centred) μ``,
one rotation per query instead of one per token. Sink rows (fp16) are read as they are.

Uniform / KIVI (min/max groups, ``x = code · scale + zero``): keys grouped along tokens per channel
(KIVI's keys) give ``q·k_t = Σ_d (q_d scale_{G(t),d}) code_{t,d} + q·zero_{G(t)}`` — the query is scaled
once per token group; keys grouped along channels give ``Σ_j scale_{t,j} (q_j·code_{t,j}) + zero_{t,j} Σq_j``.
Values likewise (``Σ_t p_t scale code`` and ``Σ_t p_t zero``); KIVI's fp16 window is read as it is.

Any other codec's blocks are decoded one block at a time and read by a matrix product.

All of it is plain vectorised torch on the device of the codes; the logits are exact up to float
summation order (``tests/test_code_attention.py`` compares with attention over decoded keys on real
captured layers). :func:`attend` is what :class:`kvtool.CodecCache` calls with ``attention="codes"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from kvtool.codecs.base import Encoded
from kvtool.codecs.quant.group import GroupQuantizer
from kvtool.runtime import bitpack
from kvtool.runtime.device import DeviceCodec
from kvtool.runtime.group import GroupDevice
from kvtool.runtime.turboquant import TurboQuantDevice, parts, tables


class Block:
    """One coded block of one batch row, read by a grouped query ``qg`` ``(Hkv, M, D)`` float32 (``M`` =
    query heads per kv head × query positions): :meth:`logits` ``(Hkv, M, n)``, :meth:`mix` of
    probabilities ``(Hkv, M, n)`` into ``(Hkv, M, D)``."""

    tokens: int

    def logits(self, qg: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DecodedBlock(Block):
    """Any codec: the block decoded (one block at a time), read by matrix products."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.float()  # (H, n, D)
        self.tokens = int(x.shape[1])

    def logits(self, qg: torch.Tensor) -> torch.Tensor:
        return qg @ self.x.transpose(1, 2)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        return p @ self.x


class TurboQuantBlock(Block):
    """TurboQuant_mse codes, read in the rotated frame (module docstring)."""

    def __init__(self, coder: TurboQuantDevice, enc: Encoded) -> None:
        self.p = parts(coder.codec, enc)
        _, centroids, self.rot = tables(self.p.dim, self.p.bits, self.p.seed, self.p.codes.device)
        self.unit = self.p.unit(centroids)  # (H, n, D): codebook entries in the rotated frame, not keys
        self.n_sink = 0 if self.p.sink is None else int(self.p.sink.shape[1])
        self.tokens = self.n_sink + self.p.tokens

    def logits(self, qg: torch.Tensor) -> torch.Tensor:
        q_rot = qg @ self.rot.T  # (H, M, D): the query, rotated once
        body = (q_rot @ self.unit.transpose(1, 2)) * self.p.norms[:, None, :]  # (H, M, n)
        if self.p.centred is not None:
            body = body + (qg @ self.p.mean[:, :, None]) * self.p.centred[:, None, :].float()
        if not self.n_sink:
            return body
        return torch.cat([qg @ self.p.sink.float().transpose(1, 2), body], dim=2)

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        sink, body = p[:, :, :self.n_sink], p[:, :, self.n_sink:]
        out = ((body * self.p.norms[:, None, :]) @ self.unit) @ self.rot  # one rotation per query
        if self.p.centred is not None:
            out = out + (body @ self.p.centred.float()[:, :, None]) * self.p.mean[:, None, :]
        if self.n_sink:
            out = out + sink @ self.p.sink.float()
        return out


class GroupBlock(Block):
    """Uniform / KIVI codes with their per-group scale and zero (module docstring)."""

    def __init__(self, codec: GroupQuantizer, enc: Encoded) -> None:
        heads, total, dim = enc.shape
        self.codec, self.tokens = codec, total
        self.quantized, _ = codec._split(enc.shape)
        self.residual = enc.arrays.get("residual")
        self.axis = codec.quant_axis()
        if not self.quantized:
            return
        per_head, g, inner, pad = codec._layout((heads, self.quantized, dim))
        self.g, self.pad = g, pad
        levels = _levels(codec.bits, enc.arrays["codes"].device)
        codes = bitpack.unpack_lookup(enc.arrays["codes"], codec.bits, heads * self.quantized * dim, levels)
        codes = codes.view(heads, self.quantized, dim)
        if self.axis == "channel":  # (H, G, g, D) token groups; stats (H, G, D)
            if pad:
                codes = torch.cat([codes, codes.new_zeros(heads, pad, dim)], dim=1)
            self.codes = codes.view(heads, per_head, g, dim)
        else:  # (H, n, J, g) channel groups; stats (H, n, J)
            self.codes = codes.view(heads, self.quantized, dim // g, g)
        self.scale, self.zero = (enc.arrays[k].float().view(heads, -1, inner if self.axis == "channel"
                                                             else dim // g) for k in ("scale", "zero"))

    def _quantized_logits(self, qg: torch.Tensor) -> torch.Tensor:
        heads, m, dim = qg.shape
        if self.axis == "channel":
            q_scaled = qg[:, :, None, :] * self.scale[:, None]  # (H, M, G, D): the query scaled once per group
            out = torch.einsum("hngd,hmnd->hmng", self.codes, q_scaled)
            out = out + (qg @ self.zero.transpose(1, 2))[..., None]  # q·zero per group
            return out.reshape(heads, m, -1)[:, :, :self.quantized]
        qj = qg.view(heads, m, self.codes.shape[2], self.g)  # (H, M, J, g)
        partial = torch.einsum("hnjg,hmjg->hmnj", self.codes, qj)  # per channel group
        return (partial * self.scale[:, None]).sum(-1) + torch.einsum("hmj,hnj->hmn", qj.sum(-1), self.zero)

    def _quantized_mix(self, p: torch.Tensor) -> torch.Tensor:
        heads, m, _ = p.shape
        if self.axis == "channel":
            if self.pad:
                p = torch.cat([p, p.new_zeros(heads, m, self.pad)], dim=2)
            pg = p.view(heads, m, -1, self.g)  # (H, M, G, g)
            out = (torch.einsum("hmng,hngd->hmnd", pg, self.codes) * self.scale[:, None]).sum(2)
            return out + pg.sum(-1) @ self.zero
        weighted = p[..., None] * self.scale[:, None]  # (H, M, n, J)
        out = torch.einsum("hmnj,hnjg->hmjg", weighted, self.codes)
        out = out + torch.einsum("hmn,hnj->hmj", p, self.zero)[..., None]
        return out.reshape(heads, m, -1)

    def logits(self, qg: torch.Tensor) -> torch.Tensor:
        parts_ = [self._quantized_logits(qg)] if self.quantized else []
        if self.residual is not None:
            parts_.append(qg @ self.residual.float().transpose(1, 2))
        return torch.cat(parts_, dim=2) if len(parts_) > 1 else parts_[0]

    def mix(self, p: torch.Tensor) -> torch.Tensor:
        out = self._quantized_mix(p[:, :, :self.quantized]) if self.quantized else 0
        if self.residual is not None:
            out = out + p[:, :, self.quantized:] @ self.residual.float()
        return out


@lru_cache(maxsize=32)
def _levels(bits: int, device: torch.device) -> torch.Tensor:
    """The integer codes ``0 .. 2**bits - 1`` as float32 (what a code lookup returns for group codes)."""
    return torch.arange(1 << bits, dtype=torch.float32, device=device)


def block_for(coder: DeviceCodec, enc: Encoded) -> Block:
    """The reader of one coded block: from codes where the codec allows it, else decoded."""
    if isinstance(coder, TurboQuantDevice):
        return TurboQuantBlock(coder, enc)
    if isinstance(coder, GroupDevice):
        return GroupBlock(coder.codec, enc)
    return DecodedBlock(coder.decode(enc))


def attend(query: torch.Tensor, keys: Sequence[tuple[Block, int]], key_window: torch.Tensor,
           values: Sequence[tuple[Block, int]], value_window: torch.Tensor, mask: torch.Tensor | None,
           scaling: float) -> torch.Tensor:
    """Attention output ``(Hq, Tq, D)`` of one batch row.

    ``query`` ``(Hq, Tq, D)``; ``keys`` / ``values``: the coded blocks in token order, each with how many of
    its first tokens to skip (a sliding window cut into it); ``key_window`` / ``value_window``
    ``(Hkv, P, D)``: the precise tokens; ``mask`` ``(1|Hq, Tq, T)`` bool (True = attend) or additive float,
    or None (Tq = 1, or causal over the last Tq positions).
    """
    hq, tq, dim = query.shape
    hkv = key_window.shape[0]
    qg = query.float().reshape(hkv, (hq // hkv) * tq, dim)  # q head h reads kv head h // (hq // hkv)
    logits = [b.logits(qg)[:, :, skip:] for b, skip in keys]
    logits.append(qg @ key_window.float().transpose(1, 2))
    scores = torch.cat(logits, dim=2) * scaling  # (Hkv, M, T)
    total = scores.shape[2]
    if mask is None and tq > 1:
        qpos = torch.arange(total - tq, total, device=scores.device)[:, None]
        mask = torch.arange(total, device=scores.device)[None, :] <= qpos
    if mask is not None:
        mask = mask[..., :total].expand(hq, tq, total).reshape(hkv, -1, total)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    out = probs.new_zeros(hkv, qg.shape[1], dim)
    at = 0
    for block, skip in values:
        n = block.tokens - skip
        p = probs[:, :, at:at + n]
        if skip:
            p = torch.cat([p.new_zeros(hkv, p.shape[1], skip), p], dim=2)
        out = out + block.mix(p)
        at += n
    out = out + probs[:, :, at:] @ value_window.float()
    return out.view(hq, tq, dim).to(query.dtype)


#: Query positions per pass of :func:`attend_layer`: bounds the ``(Hkv, M, T)`` score tensor of a long
#: teacher-forced piece.
QUERY_CHUNK = 256


def attend_layer(keys_track, values_track, query: torch.Tensor, mask: torch.Tensor | None,
                 scaling: float) -> torch.Tensor:
    """Attention of a compact layer (:class:`kvtool.runtime.compact.CompactTrack` keys and values) read
    from codes: ``query`` ``(B, Hq, Tq, D)``, ``mask`` ``(B, 1|Hq, Tq, T)`` or None → ``(B, Tq, Hq, D)``,
    the layout transformers' attention functions return."""
    outs = []
    for b in range(query.shape[0]):
        keys = [(block_for(keys_track.coder, s.rows[b]), max(keys_track.start - s.start, 0))
                for s in keys_track.segments]
        values = [(block_for(values_track.coder, s.rows[b]), max(values_track.start - s.start, 0))
                  for s in values_track.segments]
        row_mask = None if mask is None else mask[b]
        tq = query.shape[2]
        pieces = []
        for a in range(0, tq, QUERY_CHUNK):
            e = min(a + QUERY_CHUNK, tq)
            if row_mask is None and tq > 1:  # causal over the last tq positions: make it explicit per piece
                total = keys_track.held
                qpos = torch.arange(total - tq + a, total - tq + e, device=query.device)[:, None]
                piece_mask = (torch.arange(total, device=query.device)[None, :] <= qpos)[None]
            else:
                piece_mask = None if row_mask is None else row_mask[:, a:e]
            pieces.append(attend(query[b, :, a:e], keys, keys_track.buffer[b], values, values_track.buffer[b],
                                 piece_mask, scaling))
        outs.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(outs).transpose(1, 2).contiguous()
