"""``turboquant``: random rotation + Lloyd-Max scalar codebooks (Zandieh et al., arXiv 2504.19874).

TurboQuant_mse (Alg. 1): rotate each vector by a seeded Haar-random orthogonal ``Π`` (only the seed is
stored), split it into its norm (fp16) and direction, and quantize every coordinate of the rotated unit
direction with the ``b``-bit Lloyd-Max codebook for the exact coordinate marginal (see
:mod:`kvtool.codecs.quant.lloydmax`). Codes are packed densely. Decoding looks the codes up, rotates back and
rescales by the norm. Stored bits per element: ``b + 16/d``, e.g. 3.25 at ``b = 3, d = 64``.

TurboQuant_prod (Alg. 2, ``variant=prod``): the ``(b-1)``-bit mse stage, then a 1-bit QJL sketch
``sign(S r)`` of the residual ``r`` of the unit direction plus ``‖r‖`` in fp16; the decoded vector
``x̃_mse + sqrt(π/2)/d · ‖r‖ · Sᵀ sign(S r)`` (times the norm) gives unbiased inner products. Stored bits:
``b + 32/d`` (``1 + 16/d`` at ``b = 1``, where there is no mse stage and ``‖r‖ = 1``). The sketch is taken
in the rotated frame: ``S Π`` is again an i.i.d. Gaussian matrix, so this is the paper's estimator with
one matrix product fewer.

Fractional budgets (§4.3, "outlier treatment"): ``bits = B`` with ``B`` a quarter step between integers
splits the ``d`` channels of each head into ``(B - ⌊B⌋)·d`` outlier channels coded with ``⌈B⌉`` bits and
the rest with ``⌊B⌋`` bits, each set by its own TurboQuant instance (own rotation, own norm), so the code
bits average exactly ``B`` (the paper's 2.5-bit example, 32 channels at 3 bits and 96 at 2 of 128,
averages 2.25; we size the outlier set from the budget instead). The outlier channels of each head are
the ones with the largest mean square in the data given to ``fit``; they are shared state (a fixed
``(heads, n_outlier)`` index table, reported beside the bits). Stored bits: ``B + 32/d`` (mse) or
``B + 64/d`` (prod): each channel set stores its own norms.

Opt-in real-cache options (not in the paper; defaults off, so ``turboquant:bits=3`` is exactly Alg. 1).
TurboQuant's error on a vector scales with its norm. Real keys share a large per-channel mean ``μ`` that
adds the same logit ``q·μ`` to every key (softmax ignores it), so coding ``x − μ`` cuts the error of most
keys — but not of the keys attention needs most: the attention sink (token 0) and other heavily attended
tokens are short vectors far from the mean, and centring them makes their error larger.
``center=true`` therefore stores each head's per-channel mean over the coded tokens (fp16, ``(heads, d)``)
and codes every token as ``x − μ`` or as ``x``, whichever is shorter; the choice is the sign bit of its
fp16 norm (a norm is never negative, so the bit is free). With ``norm_bits=8`` the log-norm byte has no
spare bit, so the choices are stored packed beside it (``centred``, ``(heads, ⌈T/8⌉)`` uint8: one bit per
token, ``1/d`` bits per element). ``sink=n`` stores the first ``n`` token rows in
fp16 instead of coding them. Measured on SmolLM2 in ``docs/CODECS.md``. Stored bits:
``(16·n + (T − n)·(b + 16/d))/T``, plus ``16/T`` for the mean.

The sink is the first ``n`` tokens *of the sequence*: when ``fit`` receives ``context.key_positions``
(a sliding-window layer's cache, a streaming block of a growing cache) only rows at positions ``< n`` are
kept in fp16. Streaming (``CodecCache(mode="streaming")``): plain TurboQuant codes each token as it
arrives; with ``center`` or fractional bits (a per-block mean, per-block outlier channels) tokens are
coded in blocks of :data:`STREAM_BLOCK`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import ClassVar, Literal

import numpy as np
import torch

from kvtool.codecs import bitpack
from kvtool.codecs.base import Codec, Encoded, LayerContext, check_input, register
from kvtool.codecs.quant.lloydmax import sphere_codebook
from kvtool.codecs.quant.qjl import as_rows, fp16_norms, sign_sketch, sign_unsketch
from kvtool.codecs.quant.rotation import gaussian_projection, random_rotation
from kvtool.errors import CodecError

#: Vectors per block: a block's rotated rows, codes and packed bytes stay in cache (multiple of 8).
CHUNK = 16384
#: Up to this many bits, codes are counted with one SIMD comparison per threshold (numpy), which beats a
#: binary search (torch.bucketize) about 8x at b = 3; above it the 2**b - 1 passes cost more.
COMPARE_MAX_BITS = 5
#: Prefix of the arrays of the outlier channel set in a fractional-bit encoding.
OUTLIER = "outlier_"
#: Largest ``sink`` (tokens kept in fp16 at the start of the sequence).
MAX_SINK = 4096
ALLOWED_BITS = "1..8 or a quarter step between them (1.25, 1.5, 1.75, 2, ..., 7.75)"
#: Streaming block (tokens) when the codec keeps per-block statistics (``center``, fractional bits).
STREAM_BLOCK = 128


def quantize(u: torch.Tensor, boundaries: np.ndarray) -> np.ndarray:
    """Codes ``(n, d)`` uint8: how many ``boundaries`` (ascending, float32) lie strictly below each ``u``."""
    if len(boundaries) < 2**COMPARE_MAX_BITS:
        a = u.numpy()
        codes = np.greater(a, boundaries[0]).view(np.uint8)
        for t in boundaries[1:]:
            codes += np.greater(a, t).view(np.uint8)
        return codes
    return torch.bucketize(u, torch.from_numpy(boundaries), out_int32=True).to(torch.uint8).numpy()


@cache
def _nibble3_table(centroids: tuple[float, ...]) -> torch.Tensor:
    """``(4096, 4)`` float32: the 4 centroids that one 12-bit unit of packed 3-bit codes stands for."""
    units = np.arange(4096)
    c = np.asarray(centroids, dtype=np.float32)
    return torch.from_numpy(np.stack([c[(units >> (3 * j)) & 7] for j in range(4)], axis=1))


def lookup(packed: np.ndarray, bits: int, count: int, centroids: torch.Tensor) -> torch.Tensor:
    """``centroids[code]`` for the first ``count`` codes of ``packed``: ``(count,)`` float32.

    At 3 bits (the width kvtool is benchmarked at) it skips unpacking: bitpack stores 8 codes little-endian
    in 3 bytes, i.e. two 12-bit units of 4 codes each, and one gather from a 4096-row table decodes a unit
    — about twice as fast as unpack + gather.
    """
    if bits != 3 or count % 8:
        codes = torch.from_numpy(bitpack.unpack(packed, bits, count))
        return torch.index_select(centroids, 0, codes.int())
    b = packed[: count * 3 // 8].reshape(-1, 3).astype(np.int32)  # (groups, 3) bytes
    units = np.empty((b.shape[0], 2), dtype=np.int32)
    units[:, 0] = b[:, 0] | ((b[:, 1] & 0xF) << 8)  # codes 0..3 of the group
    units[:, 1] = (b[:, 1] >> 4) | (b[:, 2] << 4)  # codes 4..7
    table = _nibble3_table(tuple(centroids.tolist()))
    return torch.index_select(table, 0, torch.from_numpy(units.reshape(-1))).view(-1)


def _head_segments(start: int, stop: int, tokens: int, shared: bool) -> list[tuple[int, int, int]]:
    """``(a, b, head)`` slices of rows ``start..stop`` (row = head * tokens + token), relative to ``start``.

    With a basis shared by all heads the whole block is one segment.
    """
    if shared:
        return [(0, stop - start, 0)]
    first, last = start // tokens, (stop - 1) // tokens
    return [(max(start, h * tokens) - start, min(stop, (h + 1) * tokens) - start, h) for h in range(first, last + 1)]


@dataclass(frozen=True)
class _Stage:
    """One TurboQuant instance: ``dim`` channels, integer ``bits``.

    It works on full rows ``(n, D)`` (row = head * tokens + token) through a ``basis`` ``(B, dim, D)``:
    ``y = x @ basis[h].T`` rotates the stage's channels, ``y @ basis[h]`` puts them back. For integer bits
    ``B = 1`` and the basis is the rotation itself (``D = dim``); for a fractional split each head's basis
    is the rotation scattered into that head's channel columns, so the channel gather and scatter cost
    nothing beyond the matmul.

    Arrays (names prefixed by ``prefix``): ``codes`` packed mse codes, ``norms`` fp16 ``(n,)``; for prod also
    ``qjl`` packed residual signs and ``residual_norms`` fp16 (not at ``bits = 1``).
    """

    dim: int
    bits: int
    prod: bool
    seed: int
    part: int
    prefix: str = ""
    unbiased: bool = False

    @property
    def mse_bits(self) -> int:
        return self.bits - 1 if self.prod else self.bits

    def basis(self, channels: np.ndarray | None = None, full_dim: int = 0) -> torch.Tensor:
        """``(1, dim, dim)`` rotation, or ``(heads, dim, full_dim)`` with it placed at ``channels[h]``."""
        rot = random_rotation(self.dim, self.seed, self.part)
        if channels is None:
            return rot[None]
        out = torch.zeros(channels.shape[0], self.dim, full_dim)
        for h, idx in enumerate(channels):
            out[h][:, torch.from_numpy(idx.astype(np.int64))] = rot
        return out

    def _codebook(self) -> tuple[np.ndarray, torch.Tensor]:
        """Boundaries (float32 array) and centroids (float32 tensor) of the mse stage."""
        if not self.mse_bits:
            return np.zeros(0, np.float32), torch.zeros(1)
        cb = sphere_codebook(self.dim, self.mse_bits)
        return cb.boundaries.astype(np.float32), torch.from_numpy(cb.centroids.astype(np.float32))

    def encode(self, rows: torch.Tensor, basis: torch.Tensor, tokens: int) -> dict[str, np.ndarray]:
        """Arrays for ``rows`` ``(n, D)`` float32."""
        bounds, centroids = self._codebook()
        proj = gaussian_projection(self.dim, self.dim, self.seed, self.part) if self.prod else None
        n = rows.shape[0]
        norms = torch.empty(n)
        rnorms = torch.empty(n)
        codes: list[np.ndarray] = []
        signs: list[np.ndarray] = []
        for s in range(0, n, CHUNK):
            e = min(s + CHUNK, n)
            y = torch.empty(e - s, self.dim)
            for a, b, h in _head_segments(s, e, tokens, basis.shape[0] == 1):
                torch.mm(rows[s + a : s + b], basis[h].T, out=y[a:b])  # rotated; ‖y‖ = ‖x‖ (of the channels)
            nrm = torch.linalg.vector_norm(y, dim=1)
            norms[s:e] = nrm
            y.div_(nrm.clamp_min(1e-30)[:, None])  # unit directions (zero rows stay zero)
            if self.mse_bits:
                c = quantize(y, bounds)  # (c, dim) uint8
                codes.append(bitpack.pack(c, self.mse_bits))
                if self.unbiased and not self.prod:
                    # ‖x‖ / ⟨u, û⟩: the decoded vector's component along x is x itself (see TurboQuant)
                    y_hat = torch.index_select(centroids, 0, torch.from_numpy(c).view(-1).int()).view_as(y)
                    dot = (y_hat * y).sum(1)
                    norms[s:e] = torch.where(dot > 1e-6, nrm / dot.clamp_min(1e-6), nrm)
            if self.prod:
                if self.mse_bits:
                    y_mse = torch.index_select(centroids, 0, torch.from_numpy(c).view(-1).int())
                    y.sub_(y_mse.view_as(y))  # residual r of the unit direction
                    rnorms[s:e] = torch.linalg.vector_norm(y, dim=1)
                signs.append(sign_sketch(y, proj))
        out = {"norms": fp16_norms(norms)}
        if self.mse_bits:
            out["codes"] = join_packed(codes)
        if self.prod:
            out["qjl"] = join_packed(signs)
            if self.mse_bits:
                out["residual_norms"] = fp16_norms(rnorms)
        return {self.prefix + k: v for k, v in out.items()}

    def decode_into(
        self, out: torch.Tensor, arrays: dict[str, np.ndarray], basis: torch.Tensor, tokens: int, add: bool
    ) -> None:
        """Write (``add=False``) or add this stage's part of the rows into ``out`` ``(n, D)``."""
        _, centroids = self._codebook()
        proj = gaussian_projection(self.dim, self.dim, self.seed, self.part) if self.prod else None
        a = {k[len(self.prefix) :]: v for k, v in arrays.items() if k.startswith(self.prefix)}
        norms = torch.from_numpy(a["norms"].astype(np.float32).reshape(-1))
        rnorms = torch.from_numpy(a["residual_norms"].astype(np.float32).reshape(-1)) if "residual_norms" in a else None
        n = out.shape[0]
        code_bytes = CHUNK * self.dim * self.mse_bits // 8  # bytes per full block
        sign_bytes = CHUNK * self.dim // 8
        for i, s in enumerate(range(0, n, CHUNK)):
            e = min(s + CHUNK, n)
            k = e - s
            if self.mse_bits:
                block = a["codes"][i * code_bytes : (i + 1) * code_bytes]
                y = lookup(block, self.mse_bits, k * self.dim, centroids).view(k, self.dim)
            else:
                y = torch.zeros(k, self.dim)
            if self.prod:
                scale = rnorms[s:e] if rnorms is not None else torch.ones(k)
                y += sign_unsketch(a["qjl"][i * sign_bytes : (i + 1) * sign_bytes], k, proj, scale)
            y *= norms[s:e, None]  # (y @ B) * norm == (y * norm) @ B, on the narrower side
            for lo, hi, h in _head_segments(s, e, tokens, basis.shape[0] == 1):
                if add:
                    out[s + lo : s + hi].addmm_(y[lo:hi], basis[h])
                else:
                    torch.mm(y[lo:hi], basis[h], out=out[s + lo : s + hi])


def join_packed(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate the packed blocks of one array (an empty uint8 array when there are none)."""
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


@register
@dataclass
class TurboQuant(Codec):
    """``turboquant:bits=3,seed=0,variant=mse`` — rotation + Lloyd-Max codes, fp16 norm per vector.

    ``bits``: 1..8, or a quarter step between (2.5, 3.25, ...) for the §4.3 outlier-channel split, which
    needs ``bits·head_dim`` to be a whole number. ``variant=prod`` spends one of the bits on a QJL sketch of
    the residual for unbiased inner products. ``seed`` picks the rotation (and QJL projection).
    ``sink=n`` keeps the first ``n`` tokens in fp16; ``center=true`` codes each token minus its head's
    per-channel mean where that is shorter (both off by default; see the module docstring).
    """

    bits: float = 3
    seed: int = 0
    variant: Literal["mse", "prod"] = "mse"
    center: bool = False
    sink: int = 0
    unbiased: bool = False
    norm_bits: int = 16
    name: ClassVar[str] = "turboquant"
    #: parameter sets `kvtool sweep`'s presets add beside the defaults at each width (kvtool.codecs.presets)
    #: (the form measured best end to end at 3 bits: benchmarks/results/eval_fidelity.md)
    sweep_variants: ClassVar[tuple[str, ...]] = ("center=true,sink=4,norm_bits=8,unbiased=true",)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._outliers: np.ndarray | None = None  # (heads, n_outlier) channel indices, from fit
        self._first_position = 0  # absolute position of the first row to encode, from fit's context

    # -- parameters ---------------------------------------------------------------------------------
    def validate(self, head_dim: int | None = None) -> None:
        bits = float(self.bits)
        if not (1 <= bits <= 8 and (4 * bits).is_integer()):
            raise CodecError(f"bits must be one of {ALLOWED_BITS}, got {self.bits:g}")
        if self.variant not in ("mse", "prod"):
            raise CodecError(f"variant must be one of mse, prod, got {self.variant}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise CodecError(f"seed must be a non-negative integer, got {self.seed}")
        if not isinstance(self.center, bool):
            raise CodecError(f"center must be one of true, false, got {self.center}")
        if not isinstance(self.unbiased, bool):
            raise CodecError(f"unbiased must be one of true, false, got {self.unbiased}")
        if self.norm_bits not in (8, 16):
            raise CodecError(f"norm_bits must be one of 8, 16, got {self.norm_bits}")
        if self.norm_bits == 8 and self.variant == "prod":
            raise CodecError("norm_bits=8 cannot be combined with variant=prod (its residual norms are fp16)")
        if self.unbiased and self.variant == "prod":
            raise CodecError("unbiased applies to variant=mse (variant=prod is unbiased by its QJL stage)")
        if not isinstance(self.sink, int) or isinstance(self.sink, bool) or not 0 <= self.sink <= MAX_SINK:
            raise CodecError(f"sink must be one of 0..{MAX_SINK}, got {self.sink}")
        if head_dim is not None and not (bits * head_dim).is_integer():
            raise CodecError(
                f"bits must be one of {self._allowed_at(head_dim)} at head_dim {head_dim}, "
                f"got {self.bits:g}: a fractional budget needs a whole number of outlier channels"
            )

    @staticmethod
    def _allowed_at(head_dim: int) -> str:
        steps = [q / 4 for q in range(4, 33) if (q * head_dim) % 4 == 0]
        return ", ".join(f"{b:g}" for b in steps)

    @property
    def fractional(self) -> bool:
        return not float(self.bits).is_integer()

    def _split(self, head_dim: int) -> tuple[int, int, int]:
        """``(n_outlier, high bits, low bits)`` for this budget at ``head_dim``."""
        low = math.floor(self.bits)
        n_out = round((self.bits - low) * head_dim)
        return n_out, low + 1, low

    # -- fitting ------------------------------------------------------------------------------------
    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> TurboQuant:
        """Validate against ``x`` ``(heads, tokens, head_dim)``; with fractional bits, pick each head's
        outlier channels: the ``n_outlier`` with the largest mean square over the coded tokens."""
        x = check_input(x)
        self.validate(x.shape[-1])
        positions = context.key_positions if context is not None else None
        self._first_position = int(positions[0]) if positions is not None and len(positions) else 0
        if self.fractional:
            x = self._body(x)[0]  # the rows that are coded
            n_out = self._split(x.shape[-1])[0]
            energy = np.einsum("htd,htd->hd", x, x)  # (heads, head_dim)
            top = np.argpartition(-energy, n_out - 1, axis=1)[:, :n_out]
            self._outliers = np.sort(top, axis=1).astype(np.uint16)
        return self

    def streaming_form(self) -> tuple[int, Codec]:
        return (STREAM_BLOCK if self.center or self.fractional else 1), self

    def shared_state(self) -> dict[str, np.ndarray]:
        return {} if self._outliers is None else {"outlier_channels": self._outliers}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> TurboQuant:
        unknown = set(state) - {"outlier_channels"}
        if unknown:
            raise CodecError(f"turboquant has no shared state {sorted(unknown)}; it stores outlier_channels")
        self._outliers = np.asarray(state["outlier_channels"], dtype=np.uint16) if state else None
        return self

    # -- coding -------------------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> Encoded:
        """Encode ``x`` ``(heads, tokens, head_dim)``; fractional bits use the fitted channels (or fit x)."""
        x = check_input(x)
        heads, _, d = x.shape
        self.validate(d)
        if self.fractional and self._outliers is None:
            self.fit(x)
        body, arrays, centred = self._body(x)  # body (heads, tokens - sink, d), centred (heads, tokens)
        tokens = body.shape[1]
        rows = as_rows(body, d)  # (heads * tokens, d)
        coded: dict[str, np.ndarray] = {}
        for stage, basis in self._stages(heads, d):
            coded.update(stage.encode(rows, basis, tokens))
        coded = _norms_per_head(coded, heads, tokens)
        if centred is not None and self.norm_bits == 8:  # no sign bit in a log-norm byte: one packed bit a row
            coded["centred"] = np.packbits(centred, axis=1)
        elif centred is not None:
            np.negative(coded["norms"], out=coded["norms"], where=centred)  # the sign bit says "add the mean"
        if self.norm_bits == 8:
            coded = {k2: v2 for k, v in coded.items() for k2, v2 in (_log8(k, v) if k.endswith("norms") else
                                                                       {k: v}).items()}
        arrays.update(coded)
        return Encoded(arrays, x.shape, {"seed": self.seed})

    def _body(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """The rows to code ``(heads, tokens - sink, d)``, the fp16 arrays stored beside them
        (``sink_rows`` ``(heads, sink, d)``, ``mean`` ``(heads, d)``) and, with ``center``, which rows
        are coded minus the mean ``(heads, tokens - sink)`` bool."""
        n_sink = min(max(self.sink - self._first_position, 0), x.shape[1])  # rows at positions < sink
        arrays: dict[str, np.ndarray] = {}
        if n_sink:
            arrays["sink_rows"] = x[:, :n_sink].astype(np.float16)
        body = x[:, n_sink:]
        if not (self.center and body.shape[1]):
            return body, arrays, None
        arrays["mean"] = body.mean(axis=1, dtype=np.float64).astype(np.float16)  # (heads, d)
        mean = arrays["mean"].astype(np.float32)  # (heads, d): coded against the stored fp16 mean
        # ‖x − μ‖² < ‖x‖²  ⇔  2 x·μ > ‖μ‖²
        centred = 2 * np.einsum("htd,hd->ht", body, mean) > np.einsum("hd,hd->h", mean, mean)[:, None]
        return body - centred[:, :, None] * mean[:, None, :], arrays, centred

    def _stages(self, heads: int, d: int, seed: int | None = None) -> list[tuple[_Stage, torch.Tensor]]:
        """The TurboQuant instances of this budget with their bases (see :class:`_Stage`)."""
        seed = self.seed if seed is None else seed
        prod = self.variant == "prod"
        if not self.fractional:
            stage = _Stage(d, int(self.bits), prod, seed, 0, unbiased=self.unbiased)
            return [(stage, stage.basis())]
        hi, lo = self._channel_sets(heads, d)
        n_out, b_hi, b_lo = self._split(d)
        normal = _Stage(d - n_out, b_lo, prod, seed, 0, unbiased=self.unbiased)
        outlier = _Stage(n_out, b_hi, prod, seed, 1, OUTLIER, unbiased=self.unbiased)
        return [(normal, normal.basis(lo, d)), (outlier, outlier.basis(hi, d))]

    def _channel_sets(self, heads: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Outlier and normal channel indices per head, ``(heads, n_out)`` and ``(heads, d - n_out)``."""
        if self._outliers is None:
            raise CodecError(
                f"turboquant:bits={self.bits:g} needs its outlier channel set: fit the codec or load its "
                f"shared state (outlier_channels) before decoding"
            )
        hi = self._outliers.astype(np.int64)
        n_out = self._split(d)[0]
        if hi.shape != (heads, n_out):
            raise CodecError(f"outlier_channels has shape {hi.shape}, expected {(heads, n_out)} for this tensor")
        mask = np.ones((heads, d), dtype=bool)
        np.put_along_axis(mask, hi, False, axis=1)
        lo = np.nonzero(mask)[1].reshape(heads, d - n_out)
        return hi, lo

    def decode(self, enc: Encoded) -> np.ndarray:
        """Rebuild float32 ``enc.shape`` ``(heads, tokens, head_dim)``."""
        heads, total, d = enc.shape
        sink = enc.arrays.get("sink_rows")
        n_sink = 0 if sink is None else sink.shape[1]
        tokens = total - n_sink
        out = torch.empty(heads * tokens, d)
        arrays = _unlog8(dict(enc.arrays))
        packed = arrays.pop("centred", None)  # norm_bits=8: the choices packed, a bit per row
        if packed is not None:
            centred = np.unpackbits(packed, axis=1, count=tokens).astype(bool)
        else:
            centred = np.signbit(arrays["norms"]) if "mean" in arrays else None  # (heads, tokens)
        if centred is not None:
            arrays["norms"] = np.abs(arrays["norms"])
        stages = self._stages(heads, d, int(enc.meta.get("seed", self.seed)))
        for i, (stage, basis) in enumerate(stages):
            stage.decode_into(out, arrays, basis, tokens, add=i > 0)
        body = out.numpy().reshape(heads, tokens, d)
        if centred is not None:
            body += centred[:, :, None] * arrays["mean"].astype(np.float32)[:, None, :]
        if sink is None:
            return body
        return np.concatenate([sink.astype(np.float32), body], axis=1)


LOG8 = "_log8_range"


def _log8(name: str, norms: np.ndarray) -> dict[str, np.ndarray]:
    """``norm_bits=8``: norms ``(heads, tokens)`` as uint8 codes of their logarithm, uniform between each
    head's smallest and largest log-norm (stored as fp16 ``(heads, 2)``, and the codes against those rounded
    values). A step of ``range/255`` in log space: about 1 % of the norm for norms spanning e^2.6."""
    logs = np.log(np.maximum(norms.astype(np.float32), 1e-30))  # (heads, tokens)
    bounds = np.stack([logs.min(axis=1), logs.max(axis=1)], axis=1).astype(np.float16) if logs.size else \
        np.zeros((norms.shape[0], 2), np.float16)
    lo, hi = bounds[:, :1].astype(np.float32), bounds[:, 1:].astype(np.float32)
    step = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    codes = np.clip(np.rint((logs - lo) / step), 0, 255).astype(np.uint8)
    return {name: codes, name + LOG8: bounds}


def _unlog8(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`_log8` for every norm array stored that way (others pass through)."""
    for key in [k for k in arrays if k.endswith(LOG8)]:
        name = key[: -len(LOG8)]
        bounds = arrays.pop(key).astype(np.float32)
        lo, hi = bounds[:, :1], bounds[:, 1:]
        step = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
        arrays[name] = np.exp(lo + arrays[name].astype(np.float32) * step).astype(np.float32)
    return arrays


def _norms_per_head(arrays: dict[str, np.ndarray], heads: int, tokens: int) -> dict[str, np.ndarray]:
    """Store the per-vector fp16 norms as ``(heads, tokens)``, the layout the rest of the file uses."""
    return {k: v.reshape(heads, tokens) if k.endswith("norms") else v for k, v in arrays.items()}
