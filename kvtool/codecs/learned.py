"""Shared machinery of the learned-codebook codecs (``pq``, ``vq``): faiss, one codebook per layer and head.

faiss (arXiv 2401.08281) is the reference implementation of k-means, product quantization and OPQ; kvtool
calls it rather than a k-means of its own. It is imported lazily. Its k-means runs on one OpenMP thread:
on a shared 2-core machine more threads spin-waited for each other (a one-head PQ fit took 7 s on one
thread and 29 s on two while other jobs ran); per-head fits are small, so one thread loses little.

Each head's vectors ``(T, d)`` are coded on their own. Codes are faiss's, packed per vector into
``ceil(code bits / 8)`` bytes (``(heads, T, code_size)`` uint8), and counted as stored. Codebooks are
shared state, stored in fp16; encoding uses the fp16-rounded codebooks, so a reader decodes exactly what
was measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtool.errors import CodecError

MAX_BITS = 16


def faiss_module() -> Any:
    """``import faiss`` with one thread, or a CodecError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise CodecError("the learned codecs need faiss: pip install 'faiss-cpu>=1.8'") from None
    faiss.omp_set_num_threads(1)
    return faiss


def quiet(cp: Any, seed: int) -> None:
    """faiss k-means parameters: no warning for fewer than 39 points per centroid (a head of a 2k-token cache
    has 8 per centroid at 256 centroids: that is the data there is), a fixed seed."""
    cp.min_points_per_centroid = 1
    cp.seed = int(seed) & 0x7FFFFFFF
    cp.verbose = False


def points_as_centroids(x: np.ndarray, k: int) -> np.ndarray:
    """``k`` centroids ``(k, d)`` for ``x`` ``(n, d)`` with ``n < k``: the points themselves (each is then coded
    exactly), the rest copies of the first point (k-means needs at least k points)."""
    out = np.repeat(x[:1], k, axis=0) if len(x) else np.zeros((k, x.shape[1]), np.float32)
    out[: len(x)] = x
    return out.astype(np.float32)


def kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, SODA 2007): ``k`` initial centroids ``(k, d)`` of ``x``
    ``(n, d)``, each drawn with probability ∝ its squared distance to the nearest already chosen.

    faiss seeds k-means with random points; on clustered data two seeds often land in one cluster and
    Lloyd's iterations never separate them (on 2^bits planted clusters faiss's own seeding left 3–15 % of the
    energy as error; with these seeds the clusters come back exactly).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    chosen = np.empty((k, x.shape[1]))
    chosen[0] = x[rng.integers(n)]
    dist = np.square(x - chosen[0]).sum(axis=1)
    for j in range(1, k):
        total = dist.sum()
        i = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
        chosen[j] = x[i]
        np.minimum(dist, np.square(x - chosen[j]).sum(axis=1), out=dist)
    return chosen.astype(np.float32)


def kmeans(faiss: Any, x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """faiss k-means (Lloyd, faiss's 25 iterations) of ``x`` ``(n, d)`` from k-means++ seeds: ``(k, d)``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) <= k:
        return points_as_centroids(x, k)
    cp = faiss.ClusteringParameters()
    quiet(cp, seed)
    clus = faiss.Clustering(x.shape[1], k, cp)
    faiss.copy_array_to_vector(kmeanspp(x, k, np.random.default_rng(seed)).reshape(-1), clus.centroids)
    clus.train(x, faiss.IndexFlatL2(x.shape[1]))
    return faiss.vector_to_array(clus.centroids).reshape(k, x.shape[1])


def fp16_round(a: np.ndarray) -> np.ndarray:
    """The values a reader will load: the array rounded to fp16, back in float32."""
    return np.asarray(a, dtype=np.float16).astype(np.float32)


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise CodecError(f"bits must be one of 1..{MAX_BITS}, got {bits}")
