"""``outliers``: dense-and-sparse — the largest entries kept exactly, the rest coded by the next codec.

KVQuant (Hooper et al., arXiv 2401.18079, §3.4 "Dense-and-Sparse Quantization"): a few per cent of the
entries stretch the range every quantization group must cover; keeping them aside in 16 bits (with their
indices) lets the dense remainder be quantized over a much narrower range. Here the ``frac`` largest
``|x|`` of each KV head are kept, as fp16 values plus their flat index within the head in 16 bits (its
low 16 bits, with per-block counts of 65,536 entries where a head holds more); all are stored and
counted. The dense payload — ``x`` with those entries set to 0 — goes to the next codec of a composition
(``outliers:frac=0.01+turboquant:bits=3``), or is stored in fp16 when the stage stands alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvtool.codecs.base import Encoded, Stage, register
from kvtool.errors import CodecError

IDX, VAL, BLOCKS = "outlier_idx", "outlier_val", "outlier_blocks"
#: Flat indices are stored as their low 16 bits; a head with more entries than this also stores how many of
#: its outliers fall in each block of this many entries (uint32 counts), so an index costs 16 bits, not 32.
BLOCK = 1 << 16


def outlier_count(frac: float, per_head: int) -> int:
    """Entries kept per head: ``ceil(frac · per_head)``, at most all of them."""
    return min(per_head, math.ceil(frac * per_head)) if frac > 0 else 0


def split_outliers(x: np.ndarray, frac: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``x`` ``(heads, tokens, d)`` → (stored arrays, dense ``x`` with those entries zeroed). Stored:
    ``outlier_val`` fp16 ``(heads, k)``, ``outlier_idx`` uint16 ``(heads, k)`` (each flat index within its
    head, modulo 65,536, ascending) and, when a head holds more than 65,536 entries, ``outlier_blocks``
    uint32 ``(heads, blocks)``: how many of the head's indices fall in each block of 65,536."""
    heads = x.shape[0]
    flat = x.reshape(heads, -1)
    per_head = flat.shape[1]
    k = outlier_count(frac, per_head)
    dense = flat.copy()
    if k == 0:
        return {}, dense.reshape(x.shape)
    idx = np.argpartition(-np.abs(flat), k - 1, axis=1)[:, :k]  # (heads, k)
    idx.sort(axis=1)
    vals = np.take_along_axis(flat, idx, axis=1).astype(np.float16)
    np.put_along_axis(dense, idx, 0.0, axis=1)
    arrays = {IDX: (idx % BLOCK).astype(np.uint16), VAL: vals}
    if per_head > BLOCK:
        blocks = -(-per_head // BLOCK)
        arrays[BLOCKS] = np.stack([np.bincount(row // BLOCK, minlength=blocks) for row in idx]).astype(np.uint32)
    return arrays, dense.reshape(x.shape)


def outlier_indices(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The flat indices ``(heads, k)`` int64 back from the stored low bits and block counts."""
    low = arrays[IDX].astype(np.int64)
    if BLOCKS not in arrays:
        return low
    counts = arrays[BLOCKS].astype(np.int64)  # (heads, blocks)
    high = np.stack([np.repeat(np.arange(c.size), c) for c in counts])  # (heads, k)
    return high * BLOCK + low


def merge_outliers(arrays: dict[str, np.ndarray], dense: np.ndarray) -> np.ndarray:
    """Put the kept entries back into the decoded dense tensor ``(heads, tokens, d)``."""
    if IDX not in arrays:
        return dense
    out = np.ascontiguousarray(dense, dtype=np.float32).reshape(dense.shape[0], -1).copy()
    np.put_along_axis(out, outlier_indices(arrays), arrays[VAL].astype(np.float32), axis=1)
    return out.reshape(dense.shape)


@register
@dataclass
class Outliers(Stage):
    """``outliers:frac=0.01`` — keep each KV head's ``frac`` largest-magnitude entries in fp16 (indices
    counted), hand the rest to the next codec. Stored bits per element on top of the next codec's:
    ``frac · 32`` (0.32 at 1 %) plus 32 bits per block of 65,536 entries of a head."""

    name = "outliers"
    frac: float = 0.01

    def validate(self, head_dim: int | None = None) -> None:
        if not 0 <= self.frac < 0.5:
            raise CodecError(f"frac must be in [0, 0.5) (a share of the entries), got {self.frac:g}")

    def split(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int | float | str]]:
        own, dense = split_outliers(x, self.frac)
        return own, dense, {}

    def merge(self, own: Encoded, payload: np.ndarray) -> np.ndarray:
        return merge_outliers(own.arrays, payload)

    def payload_shape(self, own: Encoded) -> tuple[int, int, int]:
        return own.shape
