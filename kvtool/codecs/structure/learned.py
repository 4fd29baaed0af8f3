"""Shared machinery of the learned-codebook codecs (``pq``, ``vq``): faiss, one codebook per layer and head.

faiss (arXiv 2401.08281) is the reference implementation of k-means, product quantization and OPQ; kvtool
calls it for Lloyd's iterations rather than a k-means of its own. It is imported lazily.

Speed (fitting 30 layers × 2,048 tokens of keys and values within a minute on 2 cores; measured in
``benchmarks/bench_lowrank.py``):

* Each faiss call runs on one OpenMP thread: on a shared 2-core machine faiss's own threads spin-waited
  for each other (a one-head PQ fit took 7 s on one thread and 29 s on two while other jobs ran). The
  independent k-means runs of a tensor (per head and sub-vector) are spread over a thread pool instead
  (:func:`faiss_map`, one worker per available core; faiss releases the GIL), so the cores are used
  without any faiss call waiting on another.
* k-means++ seeding (:func:`kmeanspp`) is vectorised over a batch of independent problems (PQ: the ``m``
  sub-vectors of a head at once): its 2^bits sequential draws cost one numpy step each for the whole batch.
* Results do not depend on the worker count: every job has its own seeds and faiss seed, and results are
  gathered in the jobs' order (``tests/test_learned.py`` checks 1 against 2 workers).
* Lloyd's iterations stop after ``iters`` (:data:`DEFAULT_ITERS`; faiss's default is 25): from k-means++
  seeds most of the gain comes in the first few (the bench's iteration table gives error and time).

Each head's vectors ``(T, d)`` are coded on their own. Codes are faiss's, packed per vector into
``ceil(code bits / 8)`` bytes (``(heads, T, code_size)`` uint8), and counted as stored. Codebooks are
shared state, stored in fp16; encoding uses the fp16-rounded codebooks, so a reader decodes exactly what
was measured.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from kvtool.errors import CodecError

MAX_BITS = 16
#: Lloyd iterations of each k-means after k-means++ seeding (faiss's default is 25). Chosen from the
#: bench's iteration table (benchmarks/results/lowrank.md): see docs/CODECS.md.
DEFAULT_ITERS = 8
MAX_ITERS = 1000
#: faiss searches of at least this many queries go through BLAS (see :func:`blas_search`).
BLAS_THRESHOLD = 20

_blas_lock = threading.Lock()
_blas_users = 0  # blas_search contexts now open, in any thread
_blas_previous = 0  # the threshold found when the first of them opened

T = TypeVar("T")
R = TypeVar("R")


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
    ``(n, d)`` — or, for a batch of independent problems ``x`` ``(b, n, d)``, ``(b, k, d)`` — each drawn with
    probability ∝ its squared distance to the nearest already chosen.

    faiss seeds k-means with random points; on clustered data two seeds often land in one cluster and
    Lloyd's iterations never separate them (on 2^bits planted clusters faiss's own seeding left 3–15 % of the
    energy as error; with these seeds the clusters come back exactly). The batch runs in lockstep, one
    numpy step per draw for all problems (16 sub-vectors of a head: 5× faster than one by one).
    """
    single = np.ndim(x) == 2
    xb = np.asarray(x, dtype=np.float64)[None] if single else np.asarray(x, dtype=np.float64)
    b, n, d = xb.shape
    rows = np.arange(b)
    sq = np.einsum("bnd,bnd->bn", xb, xb)

    def distance_to(c: np.ndarray) -> np.ndarray:  # c (b, d) -> squared distances (b, n)
        # float64: a point already chosen is left a residue ~1e-16 of |x|², not a chance to be drawn again
        return np.maximum(sq - 2.0 * np.matmul(xb, c[:, :, None])[..., 0] + np.einsum("bd,bd->b", c, c)[:, None], 0.0)

    chosen = np.empty((b, k, d))
    chosen[:, 0] = xb[rows, rng.integers(n, size=b)]
    dist = distance_to(chosen[:, 0])
    for j in range(1, k):
        cum = np.cumsum(dist, axis=1)
        total = cum[:, -1]
        # u in (0, total]: the first index whose running sum reaches u has a positive distance
        u = (1.0 - rng.random(b)) * total
        pick = np.minimum((cum < u[:, None]).sum(axis=1), n - 1)
        flat = total <= 0  # every point already chosen (fewer distinct points than k): any point
        if flat.any():
            pick[flat] = rng.integers(n, size=int(flat.sum()))
        chosen[:, j] = xb[rows, pick]
        np.minimum(dist, distance_to(chosen[:, j]), out=dist)
    chosen = chosen.astype(np.float32)
    return chosen[0] if single else chosen


def faiss_map(faiss: Any, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(i) for i in items]`` for independent faiss work, on a thread pool of one worker per available
    core (at most one per item); results in the items' order, so they do not depend on the worker count.

    faiss releases the GIL, so the workers run in parallel; each worker's faiss runs on one OpenMP thread
    (the setting is per thread). Inside, faiss's searches use BLAS (:func:`blas_search`).
    """
    workers = min(len(items), available_cores())
    with blas_search(faiss):
        if workers <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(workers, initializer=faiss.omp_set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))


@contextlib.contextmanager
def blas_search(faiss: Any) -> Iterator[None]:
    """faiss's exhaustive searches (k-means assignment, nearest codeword) through BLAS, as faiss did by
    default before 1.15 (``distance_compute_blas_threshold`` 20; 1.15's default, 128,000, sends a 2,048 ×
    256 search down its plain loops: 2.5 ms instead of 0.15 ms for 4-dim sub-vectors, measured here, which
    made Lloyd's iterations 10× slower). The setting is global to the process: nested or concurrent uses
    (threads coding several tensors) share it, and the value found before the first is restored when the
    last one exits."""
    global _blas_users, _blas_previous
    with _blas_lock:
        if _blas_users == 0:
            _blas_previous = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                faiss.cvar.distance_compute_blas_threshold = _blas_previous


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CodecError(f"seed must be a non-negative integer, got {seed}")


def check_iters(iters: int) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or not 0 <= iters <= MAX_ITERS:
        raise CodecError(f"iters must be one of 0..{MAX_ITERS}, got {iters}")


def kmeans(faiss: Any, x: np.ndarray, k: int, seeds: np.ndarray, iters: int, seed: int) -> np.ndarray:
    """faiss k-means (``iters`` Lloyd iterations) of ``x`` ``(n, d)`` from the initial centroids ``seeds``
    ``(k, d)`` (k-means++): ``(k, d)``. ``iters=0`` returns the seeds; ``n <= k`` the points themselves."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) <= k:
        return points_as_centroids(x, k)
    if iters == 0:
        return np.array(seeds, dtype=np.float32)
    cp = faiss.ClusteringParameters()
    quiet(cp, seed)
    cp.niter = int(iters)
    clus = faiss.Clustering(x.shape[1], k, cp)
    faiss.copy_array_to_vector(np.ascontiguousarray(seeds, dtype=np.float32).reshape(-1), clus.centroids)
    clus.train(x, faiss.IndexFlatL2(x.shape[1]))
    return faiss.vector_to_array(clus.centroids).reshape(k, x.shape[1])


def fp16_round(a: np.ndarray) -> np.ndarray:
    """The values a reader will load: the array rounded to fp16, back in float32."""
    return np.asarray(a, dtype=np.float16).astype(np.float32)


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise CodecError(f"bits must be one of 1..{MAX_BITS}, got {bits}")
