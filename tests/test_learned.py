"""``pq`` and ``vq`` (faiss codebooks per layer and head): exact on planted clusters, better with more bits,
codebooks restored rather than refitted, bad parameters named; the speed machinery (batched k-means++,
``iters``, the thread pool, faiss's BLAS threshold) changes no result it should not."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kvtool.codecs import parse_spec
from kvtool.codecs.structure import learned
from kvtool.codecs.structure.learned import BLAS_THRESHOLD, blas_search, faiss_module, kmeans, kmeanspp
from kvtool.errors import CodecError

D = 32


def clustered(bits: int, heads: int = 2, tokens: int = 1200, seed: int = 0) -> np.ndarray:
    """Tokens drawn from 2^bits distinct points per head (fp16-representable). (heads, tokens, D)."""
    rng = np.random.default_rng(seed)
    centers = 5 * rng.standard_normal((heads, 1 << bits, D))
    pick = rng.integers(0, 1 << bits, size=(heads, tokens))
    return np.take_along_axis(centers, pick[:, :, None], axis=1).astype(np.float16).astype(np.float32)


def rel_mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x - y) ** 2).sum() / (x**2).sum())


def roundtrip(spec: str, x: np.ndarray) -> np.ndarray:
    codec = parse_spec(spec).fit(x)
    return codec.decode(codec.encode(x))


@pytest.mark.parametrize("spec", ["pq:m=8,bits={}", "pq:m=4,bits={},rotation=random", "vq:stages=1,bits={}"])
@pytest.mark.parametrize("bits", [2, 5])
def test_data_drawn_from_2_to_the_bits_clusters_is_exact(spec: str, bits: int) -> None:
    x = clustered(bits, seed=bits)
    assert rel_mse(x, roundtrip(spec.format(bits), x)) < 1e-6


def test_pq_and_vq_error_falls_as_bits_rise_on_gaussian_data() -> None:
    x = np.random.default_rng(1).standard_normal((2, 800, D)).astype(np.float32)
    pq = [rel_mse(x, roundtrip(f"pq:m=8,bits={b}", x)) for b in (1, 2, 4, 6)]
    vq = [rel_mse(x, roundtrip(f"vq:stages={s},bits=6", x)) for s in (1, 2, 4)]
    for errors in (pq, vq):
        assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    # a Gaussian in 4-dim sub-vectors at 6 bits: roughly 2^(-2·6/4) of the energy left (high-rate k-means)
    assert 0.03 < pq[-1] < 0.25


def test_restored_codebooks_are_used_not_refitted() -> None:
    a, b = clustered(3, seed=10), clustered(3, seed=11)  # different cluster centres
    for spec in ("pq:m=8,bits=3", "vq:stages=1,bits=3", "pq:m=8,bits=3,rotation=opq"):
        calib = parse_spec(spec).fit(a)
        codec = parse_spec(spec).load_shared_state(calib.shared_state())
        codec.fit(b)
        for k, v in codec.shared_state().items():
            np.testing.assert_array_equal(v, calib.shared_state()[k])
        assert rel_mse(b, codec.decode(codec.encode(b))) > 0.05  # a's centroids do not hold b exactly
        assert rel_mse(b, roundtrip(spec, b)) < 1e-6


def test_kmeanspp_seeds_one_point_per_cluster() -> None:
    x = clustered(4, heads=1)[0]
    seeds = kmeanspp(x, 16, np.random.default_rng(0))
    assert len(np.unique(seeds, axis=0)) == 16


@pytest.mark.parametrize("spec,dim,message", [
    ("pq:m=5", D, f"m must divide head_dim={D} (one of 1, 2, 4, 8, 16, 32), got 5"),
    ("pq:bits=0", None, "bits must be one of 1..16, got 0"),
    ("pq:bits=17", None, "bits must be one of 1..16, got 17"),
    ("vq:bits=17", None, "bits must be one of 1..16, got 17"),
    ("vq:stages=0", None, "stages must be one of 1..64, got 0"),
    ("pq:rotation=hadamard", None, "rotation must be one of none, random, opq, got hadamard"),
    ("pq:iters=-1", None, "iters must be one of 0..1000, got -1"),
    ("vq:iters=1001", None, "iters must be one of 0..1000, got 1001"),
    ("vq:iters=many", None, "iters must be an integer, got many"),
])
def test_bad_parameters(spec: str, dim, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        parse_spec(spec).validate(dim)


def test_batched_kmeanspp_recovers_every_problems_planted_clusters() -> None:
    x = np.stack([clustered(4, heads=1, seed=s)[0] for s in range(6)])  # 6 problems (6, 1200, D)
    seeds = kmeanspp(x, 16, np.random.default_rng(0))
    assert seeds.shape == (6, 16, D)
    for xb, sb in zip(x, seeds, strict=True):
        centers = np.unique(xb, axis=0)
        assert len(np.unique(sb, axis=0)) == 16
        assert all((c == centers).all(axis=1).any() for c in sb)  # every seed is one of its own problem's points


def test_batched_kmeanspp_draws_with_probability_proportional_to_squared_distance() -> None:
    # one 1-d problem of 3 points, repeated 60,000 times in one batch: the first seed is uniform, the second
    # is drawn ∝ squared distance to the first; the joint frequencies match those probabilities
    pts = np.array([[0.0], [1.0], [3.0]], np.float32)
    n = 60_000
    seeds = kmeanspp(np.broadcast_to(pts, (n, 3, 1)), 2, np.random.default_rng(1))[:, :, 0]
    for a in range(3):
        d2 = (pts[:, 0] - pts[a, 0]) ** 2
        for b in range(3):
            expected = d2[b] / d2.sum() / 3
            observed = np.mean((seeds[:, 0] == pts[a, 0]) & (seeds[:, 1] == pts[b, 0]))
            assert abs(observed - expected) < 0.01, (a, b, observed, expected)


def test_kmeanspp_with_fewer_distinct_points_than_k_takes_them_all() -> None:
    x = np.repeat(np.eye(3, D, dtype=np.float32), 10, axis=0)  # 3 distinct points, 30 rows
    seeds = kmeanspp(x, 8, np.random.default_rng(0))
    assert len(np.unique(seeds, axis=0)) == 3


def test_iters_0_keeps_the_kmeanspp_seeds() -> None:
    faiss = faiss_module()
    x = np.random.default_rng(2).standard_normal((600, 4)).astype(np.float32)
    seeds = kmeanspp(x, 16, np.random.default_rng(3))
    np.testing.assert_array_equal(kmeans(faiss, x, 16, seeds, 0, seed=0), seeds)
    assert not np.array_equal(kmeans(faiss, x, 16, seeds, 8, seed=0), seeds)
    # through the codec: every centroid of iters=0 is one of the head's own sub-vectors (fp16-rounded)
    xh = np.random.default_rng(4).standard_normal((1, 600, D)).astype(np.float32)
    books = parse_spec("pq:m=8,bits=4,iters=0").fit(xh).shared_state()["codebooks"][0]  # (8, 16, 4)
    subs = xh[0].reshape(600, 8, 4).transpose(1, 0, 2).astype(np.float16)  # (8, 600, 4)
    for j in range(8):
        assert all((c == subs[j]).all(axis=1).any() for c in books[j])


def test_more_lloyd_iterations_lower_the_error() -> None:
    x = np.random.default_rng(5).standard_normal((2, 800, D)).astype(np.float32)
    for spec in ("pq:m=8,bits=5,iters={}", "vq:stages=2,bits=5,iters={}"):
        errors = [rel_mse(x, roundtrip(spec.format(i), x)) for i in (0, 1, 8, 25)]
        assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), (spec, errors)


@pytest.mark.parametrize("spec", ["pq:m=8,bits=5", "pq:m=8,bits=4,rotation=opq", "vq:stages=2,bits=5"])
def test_codebooks_do_not_depend_on_the_worker_count(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(6).standard_normal((3, 700, D)).astype(np.float32)
    pools = []

    class Pool(learned.ThreadPoolExecutor):
        def __init__(self, workers: int, **kwargs) -> None:
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(learned, "ThreadPoolExecutor", Pool)
    states = []
    for workers in (1, 2, 1):
        monkeypatch.setattr(learned, "available_cores", lambda w=workers: w)
        states.append(parse_spec(spec).fit(x).shared_state())
    assert pools and set(pools) == {2}  # two workers ran a pool; one ran in the calling thread
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        for k in state:
            np.testing.assert_array_equal(state[k], states[0][k])


def test_blas_threshold_is_set_inside_and_restored_after() -> None:
    faiss = faiss_module()
    before = faiss.cvar.distance_compute_blas_threshold
    try:
        faiss.cvar.distance_compute_blas_threshold = 12345
        with blas_search(faiss):
            assert faiss.cvar.distance_compute_blas_threshold == BLAS_THRESHOLD
            with blas_search(faiss):  # nested: the outer one still holds it after the inner exits
                pass
            assert faiss.cvar.distance_compute_blas_threshold == BLAS_THRESHOLD
        assert faiss.cvar.distance_compute_blas_threshold == 12345
        with pytest.raises(RuntimeError), blas_search(faiss):
            raise RuntimeError
        assert faiss.cvar.distance_compute_blas_threshold == 12345
        x = clustered(3, seed=7)
        for spec in ("pq:m=8,bits=3", "vq:stages=1,bits=3"):
            roundtrip(spec, x)
            assert faiss.cvar.distance_compute_blas_threshold == 12345
    finally:
        faiss.cvar.distance_compute_blas_threshold = before
