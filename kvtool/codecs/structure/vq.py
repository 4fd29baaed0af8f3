"""``vq`` — residual vector quantization of head vectors (Juang & Gray 1982; faiss ``ResidualQuantizer``),
codebooks learned per layer and head.

Stage 1 replaces each whole head vector ``(d,)`` by the nearest of ``2^bits`` centroids; each later stage
quantizes what the previous stages left (the residual) with its own ``2^bits`` centroids, so the
reconstruction is the sum of one centroid per stage. Training is greedy residual k-means, stage by
stage (faiss k-means from k-means++ seeds); encoding is faiss ``ResidualQuantizer`` with those codebooks
and beam 1 (greedy, like the training; faiss's beam search and codebook refinement cost several times
the time). Residual quantization of KV caches: e.g. arXiv
2410.15704.

Stored: ``codes`` ``(heads, T, ceil(stages·bits/8))`` uint8. Shared state: ``codebooks`` ``(heads, stages,
2^bits, d)`` fp16. **Bits: ``8·ceil(stages·bits/8)/d``** (0.5 at ``stages=4, bits=8, d=64``), plus the
codebooks amortized over the cache. A head with fewer tokens than centroids gets its own vectors as
first-stage centroids (coded exactly; later stages then code zero residuals).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvtool.codecs.base import Codec, Encoded, LayerContext, check_input, register
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
)
from kvtool.errors import CodecError

MAX_STAGES = 64


@register
@dataclass
class VQ(Codec):
    """``vq:stages=4,bits=8,iters=8,seed=0`` — residual vector quantization of whole head vectors, codebooks
    per layer and head (faiss k-means, ``iters`` Lloyd iterations from k-means++ seeds)."""

    stages: int = 4
    bits: int = 8
    iters: int = DEFAULT_ITERS
    seed: int = 0
    name: ClassVar[str] = "vq"
    #: A basis or codebook is fitted on the whole prompt: not coded token by token as a cache grows.
    streaming: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._codebooks: np.ndarray | None = None  # (heads, stages, k, d) float32 (fp16 values)
        self._loaded = False

    def validate(self, head_dim: int | None = None) -> None:
        check_bits(self.bits)
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or not 1 <= self.stages <= MAX_STAGES:
            raise CodecError(f"stages must be one of 1..{MAX_STAGES}, got {self.stages}")
        check_iters(self.iters)
        check_seed(self.seed)

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> VQ:
        """Learn each head's stage codebooks on ``x`` ``(heads, T, d)``, unless restored."""
        x = check_input(x)
        heads, tokens, d = x.shape
        self.validate(d)
        if self._loaded:
            if self._codebooks is None or self._codebooks.shape[0] != heads or self._codebooks.shape[3] != d:
                raise CodecError(f"the restored vq codebooks are for {self._codebooks.shape[0]} heads of "  # type: ignore[union-attr]
                                 f"{self._codebooks.shape[3]} values; this tensor has {heads} of {d}")  # type: ignore[union-attr]
            return self
        faiss = faiss_module()
        k = 1 << self.bits

        def one(h: int) -> np.ndarray:
            # one head's stages, greedily: each stage's k-means codes what the earlier ones left
            residual = np.ascontiguousarray(x[h])
            stages = []
            for s in range(self.stages):
                rng = np.random.default_rng([self.seed, h, s])
                seeds = kmeanspp(residual, k, rng) if tokens > k else residual
                book = fp16_round(kmeans(faiss, residual, k, seeds, self.iters, self.seed + 1000 * h + s))
                index = faiss.IndexFlatL2(d)
                index.add(book)
                nearest = index.search(residual, 1)[1][:, 0] if tokens else np.zeros(0, np.int64)
                residual = np.ascontiguousarray(residual - book[nearest])
                stages.append(book)
            return np.stack(stages)

        self._codebooks = np.stack(faiss_map(faiss, one, range(heads)))
        return self

    def shared_state(self) -> dict[str, np.ndarray]:
        return {} if self._codebooks is None else {"codebooks": self._codebooks.astype(np.float16)}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> VQ:
        if not state:
            return self
        if set(state) != {"codebooks"}:
            raise CodecError(f"vq shared state holds codebooks; got {sorted(state)}")
        books = np.asarray(state["codebooks"], dtype=np.float32)
        if books.ndim != 4 or books.shape[1] != self.stages or books.shape[2] != 1 << self.bits:
            raise CodecError(f"vq codebooks of shape {books.shape} do not fit stages={self.stages}, bits={self.bits}")
        self._codebooks = books
        self._loaded = True
        return self

    def _quantizer(self, faiss, h: int, d: int):
        rq = faiss.ResidualQuantizer(d, self.stages, self.bits)
        rq.max_beam_size = 1
        faiss.copy_array_to_vector(np.ascontiguousarray(self._codebooks[h]).reshape(-1), rq.codebooks)  # type: ignore[index]
        rq.is_trained = True
        return rq

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        heads, tokens, d = x.shape
        self.validate(d)
        if self._codebooks is None:
            self.fit(x)
        faiss = faiss_module()
        with blas_search(faiss):
            codes = [self._quantizer(faiss, h, d).compute_codes(np.ascontiguousarray(x[h])) for h in range(heads)]
        return Encoded({"codes": np.stack(codes).reshape(heads, tokens, -1)}, x.shape, {})

    def decode(self, enc: Encoded) -> np.ndarray:
        if self._codebooks is None:
            raise CodecError("vq has no codebooks: call fit(x) first, or load_shared_state() to decode a file")
        heads, tokens, d = enc.shape
        faiss = faiss_module()
        out = np.zeros(enc.shape, dtype=np.float32)
        for h in range(heads):
            if tokens:
                codes = np.ascontiguousarray(enc.arrays["codes"][h]).reshape(tokens, -1)
                out[h] = self._quantizer(faiss, h, d).decode(codes)
        return out
