"""The ``none`` codec: bit-exact, in the narrowest float format that is exact, honest bytes."""

from __future__ import annotations

import numpy as np
import torch

from kvtool.codecs import parse_spec


def _roundtrip(x: np.ndarray):
    codec = parse_spec("none")
    enc = codec.fit(x).encode(x)
    return enc, codec.decode(enc)


def test_float32_data_is_kept_bit_for_bit_at_32_bits() -> None:
    x = np.random.default_rng(0).standard_normal((3, 17, 64)).astype(np.float32)
    x[0, 0, 0] = -0.0
    enc, y = _roundtrip(x)
    assert enc.meta["dtype"] == "float32" and enc.bits_per_element() == 32.0
    assert np.array_equal(y.view(np.uint32), x.view(np.uint32))  # -0.0 included


def test_fp16_values_are_stored_in_16_bits() -> None:
    x = np.random.default_rng(1).standard_normal((2, 9, 64)).astype(np.float16).astype(np.float32)
    enc, y = _roundtrip(x)
    assert enc.meta["dtype"] == "float16" and enc.bits_per_element() == 16.0
    assert np.array_equal(y, x)


def test_bf16_values_are_stored_in_16_bits() -> None:
    # a bfloat16 value in float16's range is also a float16 value; beyond 65504 only bfloat16 holds it
    t = (torch.randn(2, 9, 64) * 1e6).bfloat16()
    x = t.float().numpy()
    enc, y = _roundtrip(x)
    assert enc.meta["dtype"] == "bfloat16" and enc.bits_per_element() == 16.0
    assert enc.arrays["data"].dtype == np.uint16
    assert np.array_equal(y, x)


def test_empty_tensor() -> None:
    x = np.zeros((2, 0, 64), dtype=np.float32)
    enc, y = _roundtrip(x)
    assert y.shape == x.shape and enc.nbytes == 0
