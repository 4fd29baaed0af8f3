"""``outliers``: dense-and-sparse — the largest entries kept exactly, the rest coded by the next codec.

KVQuant (Hooper et al., arXiv 2401.18079, §3.4 "Dense-and-Sparse Quantization"): a few per cent of the
entries stretch the range every quantization group must cover; keeping them aside in 16 bits (with their
indices) lets the dense remainder be quantized over a much narrower range. Here the ``frac`` largest
``|x|`` of each KV head are kept, as fp16 values plus their flat index within the head (``uint16`` when a
head holds at most 65,536 entries, else ``uint32``); both are stored and counted. The dense payload —
``x`` with those entries set to 0 — goes to the next codec of a composition
(``outliers:frac=0.01+turboquant:bits=3``), or is stored in fp16 when the stage stands alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvtool.codecs.base import Encoded, Stage, register
from kvtool.errors import CodecError

IDX, VAL = "outlier_idx", "outlier_val"


def outlier_count(frac: float, per_head: int) -> int:
    """Entries kept per head: ``ceil(frac · per_head)``, at most all of them."""
    return min(per_head, math.ceil(frac * per_head)) if frac > 0 else 0


def index_dtype(per_head: int) -> type:
    return np.uint16 if per_head <= 1 << 16 else np.uint32


def split_outliers(x: np.ndarray, frac: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``x`` ``(heads, tokens, d)`` → (``{outlier_idx, outlier_val}`` each ``(heads, k)``, dense ``x`` with
    those entries zeroed)."""
    heads = x.shape[0]
    flat = x.reshape(heads, -1)
    k = outlier_count(frac, flat.shape[1])
    dense = flat.copy()
    if k == 0:
        return {}, dense.reshape(x.shape)
    idx = np.argpartition(-np.abs(flat), k - 1, axis=1)[:, :k]  # (heads, k)
    idx.sort(axis=1)
    vals = np.take_along_axis(flat, idx, axis=1).astype(np.float16)
    np.put_along_axis(dense, idx, 0.0, axis=1)
    return {IDX: idx.astype(index_dtype(flat.shape[1])), VAL: vals}, dense.reshape(x.shape)


def merge_outliers(arrays: dict[str, np.ndarray], dense: np.ndarray) -> np.ndarray:
    """Put the kept entries back into the decoded dense tensor ``(heads, tokens, d)``."""
    if IDX not in arrays:
        return dense
    out = np.ascontiguousarray(dense, dtype=np.float32).reshape(dense.shape[0], -1).copy()
    np.put_along_axis(out, arrays[IDX].astype(np.int64), arrays[VAL].astype(np.float32), axis=1)
    return out.reshape(dense.shape)


@register
@dataclass
class Outliers(Stage):
    """``outliers:frac=0.01`` — keep each KV head's ``frac`` largest-magnitude entries in fp16 (indices
    counted), hand the rest to the next codec. Stored bits per element on top of the next codec's:
    ``frac · (16 + 16 or 32)``, i.e. 0.32 at 1 % with 16-bit indices."""

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
