"""Dense packing of 1–8-bit codes into bytes.

``pack(codes, bits)`` stores ``n`` codes in exactly ``ceil(n * bits / 8)`` bytes, little-endian within
each byte (code ``k`` of a group of 8 occupies bits ``bits*k .. bits*k + bits - 1`` of the group's
``bits`` bytes). This is the hot path of every quantizer, so it works column-wise on groups of 8 codes
with uint8 shifts: about ``8 + bits`` vectorised passes over ``n / 8`` bytes, no wider integer types.
"""

from __future__ import annotations

import numpy as np

from kvtool.errors import CodecError


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise CodecError(f"bits must be one of 1..8, got {bits}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def _layout(bits: int) -> list[tuple[int, int, int]]:
    """For each code k of a group of 8: (byte index, bit offset in it, bits spilling into the next byte)."""
    out = []
    for k in range(8):
        start = bits * k
        byte, offset = divmod(start, 8)
        out.append((byte, offset, max(0, offset + bits - 8)))
    return out


def _pack_aligned(flat: np.ndarray, bits: int) -> np.ndarray:
    """2 and 4 bits: whole codes per byte, so one strided pass per code of a byte (no transposes)."""
    per_byte = 8 // bits
    pad = -flat.size % per_byte
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    cols = flat.reshape(-1, per_byte)
    mask = np.uint8((1 << bits) - 1)
    out = cols[:, 0] & mask
    for k in range(1, per_byte):
        out |= (cols[:, k] & mask) << np.uint8(bits * k)
    return out


def _unpack_aligned(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((data.size, per_byte), dtype=np.uint8)
    np.bitwise_and(data, mask, out=out[:, 0])
    for k in range(1, per_byte):
        np.right_shift(data, np.uint8(bits * k), out=out[:, k])
        if k < per_byte - 1:
            out[:, k] &= mask
    return out.reshape(-1)[:count]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``codes`` (any shape, uint8, every value ``< 2**bits``) into a flat uint8 array.

    Returns ``ceil(codes.size * bits / 8)`` bytes. Bits above ``bits`` in a code are discarded.
    """
    _check_bits(bits)
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    n = flat.size
    if bits == 8:
        return flat.copy()
    if bits == 1:
        return np.packbits(flat, bitorder="little")
    if bits in (2, 4):
        return _pack_aligned(flat, bits)
    groups = -(-n // 8)
    if groups * 8 != n:
        flat = np.concatenate([flat, np.zeros(groups * 8 - n, dtype=np.uint8)])
    cols = flat.reshape(groups, 8).T  # (8, groups): column k holds code k of every group
    mask = np.uint8((1 << bits) - 1)
    out = np.zeros((bits, groups), dtype=np.uint8)  # row j: byte j of every group
    for k, (byte, offset, spill) in enumerate(_layout(bits)):
        code = cols[k] & mask
        out[byte] |= code << np.uint8(offset)
        if spill:
            out[byte + 1] |= code >> np.uint8(bits - spill)
    return out.T.reshape(-1)[: packed_size(n, bits)]


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``count`` codes as a flat uint8 array."""
    _check_bits(bits)
    data = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    need = packed_size(count, bits)
    if data.size < need:
        raise CodecError(f"packed array holds {data.size} bytes, {count} codes of {bits} bits need {need}")
    if bits == 8:
        return data[:count].copy()
    if bits == 1:
        return np.unpackbits(data[:need], count=count, bitorder="little")
    if bits in (2, 4):
        return _unpack_aligned(data[:need], bits, count)
    groups = -(-count // 8)
    if groups * bits != need:
        data = np.concatenate([data[:need], np.zeros(groups * bits - need, dtype=np.uint8)])
    rows = data[: groups * bits].reshape(groups, bits).T  # (bits, groups)
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((8, groups), dtype=np.uint8)
    for k, (byte, offset, spill) in enumerate(_layout(bits)):
        code = rows[byte] >> np.uint8(offset)
        if spill:
            code |= rows[byte + 1] << np.uint8(bits - spill)
        out[k] = code & mask
    return out.T.reshape(-1)[:count]
