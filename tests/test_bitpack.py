"""Dense bit packing: exact round trip, exact size, documented bit order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtool.codecs.bitpack import pack, packed_size, unpack
from kvtool.errors import CodecError


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_is_exact(bits: int, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=100))
    codes = np.array(values, dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_size(codes.size, bits) == -(-len(values) * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits, codes.size), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_large_round_trip_and_size(bits: int) -> None:
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(3, 1001, 7)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.size == (codes.size * bits + 7) // 8
    np.testing.assert_array_equal(unpack(packed, bits, codes.size), codes.reshape(-1))


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_order_is_little_endian(bits: int) -> None:
    codes = np.array([k % (1 << bits) for k in range(8)], dtype=np.uint8)
    word = int.from_bytes(pack(codes, bits).tobytes(), "little")
    assert [(word >> (bits * k)) & ((1 << bits) - 1) for k in range(8)] == codes.tolist()


def test_high_bits_are_discarded() -> None:
    assert unpack(pack(np.array([0xFF, 0x01], np.uint8), 2), 2, 2).tolist() == [3, 1]


def test_bad_arguments() -> None:
    with pytest.raises(CodecError, match="bits must be one of 1..8, got 9"):
        pack(np.zeros(4, np.uint8), 9)
    with pytest.raises(CodecError, match="need"):
        unpack(np.zeros(1, np.uint8), 4, 3)
