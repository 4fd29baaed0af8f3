"""QJL (arXiv 2406.03482): the asymmetric inner-product estimator is unbiased, with the paper's variance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvtool.codecs import parse_spec
from kvtool.codecs.quant.qjl import QJL
from kvtool.codecs.quant.rotation import gaussian_projection
from kvtool.errors import CodecError


def test_decoded_keys_give_the_paper_estimator() -> None:
    """⟨q, k̂⟩ = sqrt(π/2)/m · ‖k‖ · ⟨S q, sign(S k)⟩, computed here independently from S (float64)."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 50, 64)).astype(np.float32)
    q = rng.standard_normal((2, 50, 64))
    codec = QJL(sketch=96, seed=4)
    k_hat = codec.decode(codec.encode(k))
    s = gaussian_projection(96, 64, 4).numpy().astype(np.float64)
    norm = np.linalg.norm(k, axis=-1).astype(np.float16).astype(np.float64)  # the norm is stored in fp16
    sign = np.where(k.astype(np.float64) @ s.T >= 0, 1.0, -1.0)
    estimate = math.sqrt(math.pi / 2) / 96 * norm * ((q @ s.T) * sign).sum(-1)
    np.testing.assert_allclose((q * k_hat).sum(-1), estimate, rtol=1e-4, atol=1e-4)


def test_inner_products_unbiased_over_seeds() -> None:
    """Fixed k and q (⟨q, k⟩ = 0.6): over 400 seeds the mean estimate is within 3 standard errors of the
    truth, and the variance is below the paper's bound (π/2)/m · ‖q‖²‖k‖² (Lemma 3.2)."""
    d = m = 64
    rng = np.random.default_rng(1)
    k = rng.standard_normal(d)
    k /= np.linalg.norm(k)
    z = rng.standard_normal(d)
    z -= (z @ k) * k
    q = 0.6 * k + 0.8 * z / np.linalg.norm(z)
    keys = np.broadcast_to(k.astype(np.float32), (1, 1, d))
    est = np.array([float(QJL(seed=s).decode(QJL(seed=s).encode(keys))[0, 0] @ q) for s in range(400)])
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - 0.6) < 3 * se
    assert est.var(ddof=1) < math.pi / 2 / m


def test_many_keys_one_seed_error_scale() -> None:
    # for independent unit q, k the error variance is (π/2 - ⟨q,k⟩²-ish)/m ≈ (π/2)/m; check within 10 %
    d = 64
    rng = np.random.default_rng(2)
    k = rng.standard_normal((1, 20_000, d)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = rng.standard_normal((1, 20_000, d))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    codec = parse_spec("qjl")
    err = (codec.decode(codec.encode(k)) * q).sum(-1) - (k * q).sum(-1)
    assert abs(err.mean()) < 3 * err.std() / math.sqrt(err.size)
    assert d * err.var() == pytest.approx(math.pi / 2 - 1 / d, rel=0.1)


def test_bits_and_seed() -> None:
    x = np.random.default_rng(3).standard_normal((2, 100, 64)).astype(np.float32)
    enc = parse_spec("qjl:seed=9").encode(x)
    assert enc.bits_per_element() == pytest.approx(1 + 16 / 64)
    assert enc.meta["seed"] == 9
    assert parse_spec("qjl:sketch=256").encode(x).bits_per_element() == pytest.approx((256 + 16) / 64)
    with pytest.raises(CodecError, match="sketch must be one of 0..65536, got -1"):
        parse_spec("qjl:sketch=-1")
