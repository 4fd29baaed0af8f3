"""``pq`` — product quantization of head vectors (Jégou et al., TPAMI 2011; OPQ: Ge et al., CVPR 2013),
with codebooks learned per layer and head by faiss.

Each head's vectors ``(T, d)`` are cut into ``m`` sub-vectors of ``d/m`` values; each sub-vector is
replaced by the index of the nearest of ``2^bits`` centroids learned by k-means on that head (k-means++
seeds, then ``iters`` of faiss's Lloyd iterations, default 8: see ``learned.py``). Optional rotation first:
``random`` (a seeded Haar rotation, stored as the seed: spreads channel outliers over the sub-vectors) or
``opq`` (faiss ``OPQMatrix``: the rotation that minimises the PQ error, learned per head and stored; the
identity for a head with fewer than ``max(d, 2·2^bits)`` tokens, where faiss's OPQ fit breaks down). Product
quantization of KV caches: e.g. PQCache, arXiv 2407.12820.

Stored: ``codes`` ``(heads, T, ceil(m·bits/8))`` uint8. Shared state: ``codebooks`` ``(heads, m, 2^bits,
d/m)`` fp16 and, with ``opq``, ``rotation`` ``(heads, d, d)`` float32. **Bits: ``8·ceil(m·bits/8)/d``**
(2 at ``m=16, bits=8, d=64``), plus the codebooks amortized over the cache (at ``bits=8``, ``d=64``:
``2^bits·d·16`` bits per head = 0.5 MiB per layer and tensor for 3 heads; 2 bits per element on a 2k-token
cache — see ``bits_per_element_with_state``). A head with fewer tokens than centroids gets its own
sub-vectors as centroids, so it is coded exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from kvtool.codecs.base import Codec, Encoded, LayerContext, check_input, register
from kvtool.codecs.quant.rotation import random_rotation
from kvtool.codecs.structure.learned import (
    DEFAULT_ITERS,
    blas_search,
    check_bits,
    check_iters,
    check_seed,
    faiss_map,
    faiss_module,
    fp16_round,
    kmeans,
    kmeanspp,
    points_as_centroids,
    quiet,
)
from kvtool.errors import CodecError

#: OPQ alternations (faiss's default is 50; 10 keeps a per-head fit within seconds and gained little more).
OPQ_ITERATIONS = 10


@register
@dataclass
class PQ(Codec):
    """``pq:m=16,bits=8,rotation=none|random|opq,iters=8,seed=0`` — product quantization, codebooks per layer
    and head (faiss k-means, ``iters`` Lloyd iterations from k-means++ seeds)."""

    m: int = 16
    bits: int = 8
    rotation: Literal["none", "random", "opq"] = "none"
    iters: int = DEFAULT_ITERS
    seed: int = 0
    name: ClassVar[str] = "pq"
    #: A basis or codebook is fitted on the whole prompt: not coded token by token as a cache grows.
    streaming: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._codebooks: np.ndarray | None = None  # (heads, m, k, d/m) float32 (fp16 values)
        self._rotations: np.ndarray | None = None  # (heads, d, d) for opq
        self._loaded = False

    def validate(self, head_dim: int | None = None) -> None:
        check_bits(self.bits)
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise CodecError(f"m must be a positive divisor of head_dim, got {self.m}")
        if head_dim is not None and head_dim % self.m:
            allowed = ", ".join(str(k) for k in range(1, head_dim + 1) if head_dim % k == 0)
            raise CodecError(f"m must divide head_dim={head_dim} (one of {allowed}), got {self.m}")
        if self.rotation not in ("none", "random", "opq"):
            raise CodecError(f"rotation must be one of none, random, opq, got {self.rotation}")
        check_iters(self.iters)
        check_seed(self.seed)

    # -- fitting ------------------------------------------------------------------------------------
    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> PQ:
        """Learn each head's codebooks (and OPQ rotation) on ``x`` ``(heads, T, d)``, unless restored."""
        x = check_input(x)
        heads, tokens, d = x.shape
        self.validate(d)
        if self._loaded:
            if self._codebooks is None or self._codebooks.shape[0] != heads or \
                    self._codebooks.shape[1] * self._codebooks.shape[3] != d:
                raise CodecError(f"the restored pq codebooks are for {self._codebooks.shape[0]} heads of "  # type: ignore[union-attr]
                                 f"{self._codebooks.shape[1] * self._codebooks.shape[3]} values; this tensor has "  # type: ignore[union-attr]
                                 f"{heads} of {d}")
            return self
        faiss = faiss_module()
        k, sub = 1 << self.bits, d // self.m
        rots = None
        if self.rotation == "opq":
            def opq(h: int) -> np.ndarray:
                if tokens < max(d, 2 * k):  # faiss's OPQ fit breaks down on so few tokens: no rotation
                    return np.eye(d, dtype=np.float32)
                return self._fit_opq(faiss, np.ascontiguousarray(x[h]))

            rots = np.stack(faiss_map(faiss, opq, range(heads))).astype(np.float32)
        self._rotations = rots
        xr = np.stack([self._rotate(x[h], h) for h in range(heads)]) if self.rotation != "none" else x

        if tokens <= k:  # each head's own sub-vectors as centroids: coded exactly
            books = np.stack([[points_as_centroids(np.ascontiguousarray(xr[h, :, j * sub:(j + 1) * sub]), k)
                               for j in range(self.m)] for h in range(heads)])
            self._codebooks = fp16_round(books)
            return self
        # (heads, m, T, sub): every sub-vector problem of every head
        xs = np.ascontiguousarray(xr.reshape(heads, tokens, self.m, sub).transpose(0, 2, 1, 3))

        def seed_head(h: int) -> np.ndarray:  # k-means++ seeds of a head's m problems in lockstep: (m, k, sub)
            return kmeanspp(xs[h], k, np.random.default_rng([self.seed, h]))

        seeds = faiss_map(faiss, seed_head, range(heads))

        def one(job: tuple[int, int]) -> np.ndarray:
            # one sub-quantizer of one head: faiss's Lloyd iterations from its seeds (a job per (head,
            # sub-vector), so the thread pool's workers stay evenly loaded)
            h, j = job
            return kmeans(faiss, xs[h, j], k, seeds[h][j], self.iters, self.seed + h * self.m + j)

        jobs = [(h, j) for h in range(heads) for j in range(self.m)]
        self._codebooks = fp16_round(np.stack(faiss_map(faiss, one, jobs)).reshape(heads, self.m, k, sub))
        return self

    def _fit_opq(self, faiss, x: np.ndarray) -> np.ndarray:
        d = x.shape[1]
        opq = faiss.OPQMatrix(d, self.m)
        opq.niter = OPQ_ITERATIONS
        inner = faiss.ProductQuantizer(d, self.m, self.bits)
        quiet(inner.cp, self.seed)
        inner.cp.niter = max(self.iters, 1)
        opq.pq = inner  # OPQ trains this one (quietly) instead of its own
        opq.train(x)
        return faiss.vector_to_array(opq.A).reshape(d, d).astype(np.float32)

    # -- shared state -------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, np.ndarray]:
        if self._codebooks is None:
            return {}
        state = {"codebooks": self._codebooks.astype(np.float16)}
        if self._rotations is not None:
            state["rotation"] = self._rotations
        return state

    def load_shared_state(self, state: dict[str, np.ndarray]) -> PQ:
        if not state:
            return self
        if "codebooks" not in state or set(state) - {"codebooks", "rotation"}:
            raise CodecError(f"pq shared state holds codebooks (and rotation); got {sorted(state)}")
        books = np.asarray(state["codebooks"], dtype=np.float32)
        if books.ndim != 4 or books.shape[1] != self.m or books.shape[2] != 1 << self.bits:
            raise CodecError(f"pq codebooks of shape {books.shape} do not fit m={self.m}, bits={self.bits}")
        if (self.rotation == "opq") != ("rotation" in state):
            raise CodecError(f"the restored pq state does not match rotation={self.rotation}")
        self._codebooks = books
        self._rotations = np.asarray(state["rotation"], np.float32) if "rotation" in state else None
        self._loaded = True
        return self

    # -- coding -------------------------------------------------------------------------------------
    def _quantizer(self, faiss, h: int, d: int):
        pq = faiss.ProductQuantizer(d, self.m, self.bits)
        faiss.copy_array_to_vector(np.ascontiguousarray(self._codebooks[h]).reshape(-1), pq.centroids)  # type: ignore[index]
        return pq

    def _rotate(self, x: np.ndarray, h: int, inverse: bool = False) -> np.ndarray:
        d = x.shape[-1]
        if self.rotation == "none":
            return x
        rot = self._rotations[h] if self.rotation == "opq" else random_rotation(d, self.seed).numpy()  # type: ignore[index]
        return np.ascontiguousarray(x @ rot if inverse else x @ rot.T)

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        heads, tokens, d = x.shape
        self.validate(d)
        if self._codebooks is None:
            self.fit(x)
        faiss = faiss_module()
        with blas_search(faiss):
            codes = [self._quantizer(faiss, h, d).compute_codes(self._rotate(x[h], h)) for h in range(heads)]
        return Encoded({"codes": np.stack(codes).reshape(heads, tokens, -1)}, x.shape, {"seed": self.seed})

    def decode(self, enc: Encoded) -> np.ndarray:
        if self._codebooks is None:
            raise CodecError("pq has no codebooks: call fit(x) first, or load_shared_state() to decode a file")
        heads, tokens, d = enc.shape
        faiss = faiss_module()
        out = np.empty(enc.shape, dtype=np.float32)
        for h in range(heads):
            codes = np.ascontiguousarray(enc.arrays["codes"][h]).reshape(tokens, -1)
            out[h] = self._rotate(self._quantizer(faiss, h, d).decode(codes), h, inverse=True) if tokens else 0
        return out
