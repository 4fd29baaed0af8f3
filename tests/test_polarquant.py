"""PolarQuant (arXiv 2502.02617): exact polar transform, angle codebooks, error falling with bits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvtool.codecs import parse_spec
from kvtool.codecs.quant.polarquant import angle_codebook
from kvtool.errors import CodecError


def rel_mse(spec: str, x: np.ndarray) -> float:
    codec = parse_spec(spec).fit(x)
    enc = codec.encode(x)
    return float(((codec.decode(enc) - x) ** 2).sum() / (x**2).sum())


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 2000, 64)).astype(np.float32)


def test_default_is_the_papers_3_875_bits(x: np.ndarray) -> None:
    enc = parse_spec("polarquant").encode(x)
    assert set(enc.arrays) == {"level1", "level2", "level3", "level4", "radii"}
    assert enc.arrays["radii"].shape == (2, 2000, 4) and enc.arrays["radii"].dtype == np.float16
    assert enc.bits_per_element() == pytest.approx(3.875)


def test_error_falls_as_bits_rise(x: np.ndarray) -> None:
    errors = [rel_mse(f"polarquant:bits={b},upper_bits={b}", x) for b in range(1, 7)]
    assert all(lo > hi for lo, hi in zip(errors, errors[1:], strict=False)), errors
    # each extra bit on every angle cuts the error about 4x, as for any fine scalar quantizer
    assert errors[4] / errors[5] == pytest.approx(4, rel=0.25)
    assert rel_mse("polarquant:bits=5", x) < rel_mse("polarquant:bits=4", x)
    assert rel_mse("polarquant:upper_bits=3", x) < rel_mse("polarquant:upper_bits=2", x)


def test_transform_is_exact_up_to_fp16_radii(x: np.ndarray) -> None:
    # 8-bit angles everywhere: what is left is angle rounding at 2^-8 resolution and fp16 radii
    assert rel_mse("polarquant:bits=8,upper_bits=8,levels=6", x) < 2e-4


def test_angle_codebook_matches_the_level_density() -> None:
    # level 2: density sin(2ψ) on [0, π/2]; the 1-bit centroids are the half-interval means, 0.5 and π/2 - 0.5
    c, t = angle_codebook(2, 1)
    np.testing.assert_allclose(c, [0.5, math.pi / 2 - 0.5], atol=1e-6)
    np.testing.assert_allclose(t, [math.pi / 4], atol=1e-9)
    # higher levels concentrate at π/4, so their codebooks are narrower
    widths = [np.ptp(angle_codebook(level, 2)[0]) for level in range(2, 6)]
    assert all(a > b for a, b in zip(widths, widths[1:], strict=False))


def test_seed_in_meta_and_fresh_decode(x: np.ndarray) -> None:
    codec = parse_spec("polarquant:seed=5")
    enc = codec.encode(x)
    assert enc.meta["seed"] == 5
    np.testing.assert_array_equal(parse_spec(codec.spec()).decode(enc), codec.decode(enc))


def test_levels_must_divide_head_dim() -> None:
    with pytest.raises(CodecError, match="levels must be one of 1, 2, 3 at head_dim 24"):
        parse_spec("polarquant").fit(np.zeros((1, 4, 24), np.float32))
    with pytest.raises(CodecError, match="upper_bits must be one of 1..8, got 0"):
        parse_spec("polarquant:upper_bits=0")
