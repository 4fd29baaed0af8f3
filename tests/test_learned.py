"""``pq`` and ``vq`` (faiss codebooks per layer and head): exact on planted clusters, better with more bits,
codebooks restored rather than refitted, bad parameters named."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kvtool.codecs import parse_spec
from kvtool.codecs.learned import kmeanspp
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
])
def test_bad_parameters(spec: str, dim, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        parse_spec(spec).validate(dim)
