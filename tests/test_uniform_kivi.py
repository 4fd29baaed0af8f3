"""Uniform and KIVI quantizers against the analytic step-size estimate Δ²/12 on uniform data."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.codecs import parse_pair, parse_spec
from kvtool.codecs.quant.kivi import Kivi
from kvtool.codecs.quant.uniform import Uniform


def uniform_data(heads: int = 2, tokens: int = 4096, dim: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (heads, tokens, dim)).astype(np.float32)


def mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x - y) ** 2).mean())


@pytest.mark.parametrize("bits", range(1, 9))
def test_channel_axis_whole_range_matches_delta_squared_over_12(bits: int) -> None:
    # one group per channel over 4096 tokens: the range is ~[0, 1], so Δ = 1 / (2**b - 1)
    x = uniform_data()
    codec = Uniform(bits=bits, axis="channel")
    y = codec.decode(codec.fit(x).encode(x))
    delta = 1.0 / ((1 << bits) - 1)
    assert mse(x, y) == pytest.approx(delta**2 / 12, rel=0.05)


@pytest.mark.parametrize("spec", ["uniform:bits={b},group=16", "uniform:bits={b}",
                                  "kivi:bits={b},axis=channel,group=32,residual=0",
                                  "kivi:bits={b},axis=token,group=32,residual=0"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_grouped_error_matches_measured_step_sizes(spec: str, bits: int) -> None:
    """MSE = (g − 2)/g · mean over groups of Δ_g² / 12, Δ_g being each group's stored fp16 scale.

    Inside a group of g values the min and max land exactly on the grid (zero error); the other g − 2
    are uniform within the cell, hence Δ²/12 each.
    """
    x = uniform_data(tokens=1024)
    codec = parse_spec(spec.format(b=bits)).fit(x)
    enc = codec.encode(x)
    y = codec.decode(enc)
    scale = enc.arrays["scale"].astype(np.float64)  # one Δ per group
    group = codec.group or x.shape[-1]
    assert scale.size * group == x.size
    expected = (group - 2) / group * float(np.mean(scale**2)) / 12
    assert mse(x, y) == pytest.approx(expected, rel=0.03)


def test_kivi_keeps_the_residual_window_in_fp16() -> None:
    x = uniform_data(tokens=300)
    keys, values = parse_pair(method="kivi:bits=2,group=32,residual=100")
    for codec in (keys, values):
        enc = codec.fit(x).encode(x)
        y = codec.decode(enc)
        np.testing.assert_array_equal(y[:, -100:], x[:, -100:].astype(np.float16).astype(np.float32))
        assert enc.arrays["residual"].shape == (2, 100, 64) and enc.arrays["residual"].dtype == np.float16
        assert np.abs(y[:, :-100] - x[:, :-100]).max() <= 0.5 / 3 * 1.01  # half a step of 2 bits
    assert (keys.axis, values.axis) == ("channel", "token")


def test_kivi_shorter_than_its_residual_is_plain_fp16() -> None:
    x = uniform_data(tokens=50)
    codec = Kivi(bits=2, axis="token", residual=128)
    enc = codec.fit(x).encode(x)
    assert set(enc.arrays) == {"residual"} and enc.bits_per_element() == 16.0


def test_per_channel_keys_beat_per_token_on_outlier_channels() -> None:
    # KIVI's observation (arXiv 2402.02750 §3): key outliers sit in fixed channels
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 512, 64)).astype(np.float32)
    x[:, :, [3, 17]] += 20.0
    err = {}
    for axis in ("token", "channel"):
        codec = Kivi(bits=2, axis=axis, group=32, residual=0)
        err[axis] = mse(x, codec.decode(codec.fit(x).encode(x)))
    assert err["channel"] < 0.5 * err["token"]


def test_constant_groups_decode_exactly() -> None:
    x = np.full((1, 8, 64), 0.25, np.float32)
    codec = Uniform(bits=3, group=16)
    np.testing.assert_array_equal(codec.decode(codec.fit(x).encode(x)), x)


@pytest.mark.parametrize("spec", ["uniform:bits=3,group=4", "uniform:bits=5,axis=channel,group=8",
                                  "kivi:bits=2,axis=channel,group=4,residual=5",
                                  "kivi:bits=7,axis=token,group=6,residual=0"])
def test_unaligned_shapes_take_the_unfused_path(spec: str) -> None:
    # 3 heads × 37 tokens × 12 channels: neither per-head codes nor token groups align to whole bytes
    x = np.random.default_rng(2).standard_normal((3, 37, 12)).astype(np.float32)
    codec = parse_spec(spec).fit(x)
    enc = codec.encode(x)
    y = codec.decode(enc)
    step = np.abs(x).max() * 2 / ((1 << codec.bits) - 1)
    assert np.abs(y - x).max() <= step  # within one step everywhere
    stats = 2 * enc.arrays["scale"].nbytes
    residual = enc.arrays["residual"].nbytes if "residual" in enc.arrays else 0
    quantized = x.size - residual // 2
    assert enc.arrays["codes"].nbytes == -(-quantized * codec.bits // 8)
    assert enc.nbytes == enc.arrays["codes"].nbytes + stats + residual
