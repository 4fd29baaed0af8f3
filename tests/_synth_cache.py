"""Synthetic kvtool caches with planted structure, for the analysis tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvtool.store import CacheWriter, StoreHeader

KV_HEADS, Q_HEADS, HEAD_DIM = 2, 4, 32


def header(num_layers: int, *, q_heads: int = Q_HEADS, kv_heads: int = KV_HEADS, d: int = HEAD_DIM,
           dtype: str = "float32") -> StoreHeader:
    return StoreHeader(model="synthetic", model_architecture="Synthetic", num_layers=num_layers,
                       num_q_heads=q_heads, num_kv_heads=kv_heads, head_dim=d, attn_scaling=d ** -0.5,
                       dtype=dtype)


LayerFn = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def write_cache(path: Path, num_layers: int, tokens: int, layer_fn: LayerFn, *, num_queries: int = 0,
                **header_kw: object) -> Path:
    """Write a one-sequence cache; ``layer_fn(i)`` returns keys, values (kv, T, d), queries or None."""
    with CacheWriter(path, header(num_layers, **header_kw)) as w:
        w.add_sequence(np.arange(tokens), source="synthetic", text="synthetic")
        for i in range(num_layers):
            k, v, q = layer_fn(i)
            qpos = np.arange(tokens - q.shape[1], tokens) if q is not None else None
            w.write_layer(0, i, k, v, queries=q, query_positions=qpos)
    return path


def gaussian(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def low_rank(rng: np.random.Generator, heads: int, tokens: int, d: int, rank: int) -> np.ndarray:
    """(heads, tokens, d) of exact rank ``rank`` per head, all singular values equal."""
    out = np.empty((heads, tokens, d), np.float32)
    for h in range(heads):
        u, _ = np.linalg.qr(rng.standard_normal((tokens, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((d, rank)))
        out[h] = 10.0 * u @ v.T
    return out
