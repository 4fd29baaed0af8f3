"""Dense packing of 1–8-bit codes in torch, byte for byte the layout of :mod:`kvtool.codecs.bitpack`.

Code ``k`` of a group of 8 occupies bits ``bits*k .. bits*k + bits - 1`` of the group's ``bits`` bytes,
little-endian. A group of 8 codes is at most 64 bits, so one int64 per group holds it: packing ORs the 8
shifted codes into it and splits it into bytes; unpacking does the reverse. Everything stays on the
tensors' device (no host round trip).
"""

from __future__ import annotations

import torch

from kvtool.errors import CodecError


def _check(bits: int) -> None:
    if not 1 <= int(bits) <= 8:
        raise CodecError(f"bits must be one of 1..8, got {bits}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy."""
    return (count * bits + 7) // 8


def _shifts(n: int, step: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device, dtype=torch.int64) * step


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (any shape, integer, values ``< 2**bits``) into a flat uint8 tensor of
    ``ceil(codes.numel() * bits / 8)`` bytes."""
    _check(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    pad = -n % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    mask = (1 << bits) - 1
    groups = (flat.view(-1, 8).to(torch.int64) & mask) << _shifts(8, bits, flat.device)  # (G, 8)
    word = groups.sum(dim=1, keepdim=True)  # disjoint bit fields: the sum is the OR
    out = ((word >> _shifts(bits, 8, flat.device)) & 0xFF).to(torch.uint8)  # (G, bits)
    return out.reshape(-1)[: packed_size(n, bits)]


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` codes as a flat uint8 tensor."""
    _check(bits)
    data = packed.reshape(-1)
    need = packed_size(count, bits)
    if data.numel() < need:
        raise CodecError(f"packed array holds {data.numel()} bytes, {count} codes of {bits} bits need {need}")
    if bits == 8:
        return data[:count].clone()
    groups = -(-count // 8)
    data = data[:need]
    if groups * bits != need:
        data = torch.cat([data, data.new_zeros(groups * bits - need)])
    word = (data.view(groups, bits).to(torch.int64) << _shifts(bits, 8, data.device)).sum(dim=1, keepdim=True)
    codes = ((word >> _shifts(8, bits, data.device)) & ((1 << bits) - 1)).to(torch.uint8)  # (G, 8)
    return codes.reshape(-1)[:count]


def packbits_rows(bits: torch.Tensor) -> torch.Tensor:
    """``numpy.packbits(bits, axis=1)`` (big-endian within a byte) of a ``(rows, n)`` bool tensor."""
    rows, n = bits.shape
    pad = -n % 8
    b = bits.to(torch.int64)
    if pad:
        b = torch.cat([b, b.new_zeros(rows, pad)], dim=1)
    weights = 1 << torch.arange(7, -1, -1, device=bits.device, dtype=torch.int64)
    return (b.view(rows, -1, 8) * weights).sum(dim=2).to(torch.uint8)


def unpackbits_rows(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`packbits_rows`: ``(rows, count)`` bool."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.int64)
    bits = (packed.to(torch.int64)[:, :, None] >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :count].bool()


def _unit_table(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, int, int]:
    """``(2**unit_bits, codes_per_unit)`` table of ``values[code]`` for every packed unit: a byte for 1, 2
    and 4 bits, 12 bits (4 codes) for 3 bits; with the unit's width and code count."""
    unit_bits = 12 if bits == 3 else 8
    per_unit = unit_bits // bits
    units = torch.arange(1 << unit_bits, device=values.device)
    codes = (units[:, None] >> (torch.arange(per_unit, device=values.device) * bits)) & ((1 << bits) - 1)
    return values[codes], unit_bits, per_unit


_TABLES: dict[tuple, torch.Tensor] = {}


def unpack_lookup(packed: torch.Tensor, bits: int, count: int, values: torch.Tensor) -> torch.Tensor:
    """``values[code]`` for the first ``count`` packed codes, ``(count,)`` in ``values``' dtype: one gather per
    packed unit (a byte, or 12 bits at 3 bits) from a table of every unit's decoded codes, instead of
    unpacking codes one by one (the reference's 3-bit trick, :func:`kvtool.codecs.quant.turboquant.lookup`)."""
    if bits not in (1, 2, 3, 4) or count % 8:
        return values[unpack(packed, bits, count).long()]
    key = (bits, values.data_ptr(), values.numel(), str(values.device), values.dtype)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 64:
            _TABLES.clear()
        table = _TABLES[key] = _unit_table(values, bits)[0]
    data = packed.reshape(-1)[: packed_size(count, bits)]
    if bits == 3:
        b = data.view(-1, 3).to(torch.int32)
        units = torch.stack([b[:, 0] | ((b[:, 1] & 0xF) << 8), (b[:, 1] >> 4) | (b[:, 2] << 4)], dim=1).view(-1)
    else:
        units = data.to(torch.int32)
    return torch.index_select(table, 0, units).view(-1)[:count]
