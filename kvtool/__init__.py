"""kvtool: capture, analyse and compress the KV cache of causal language models, offline.

The library is importable without the CLI; heavy dependencies (torch, transformers) load lazily.

>>> import kvtool
>>> keys, values, queries = kvtool.load_layer("cache.h5", layer=0)   # (heads, tokens, head_dim) each
"""

from __future__ import annotations

__version__ = "0.1.0"

from kvtool.errors import CodecError, InputError, KvtoolError, ModelError, StoreError
from kvtool.store import CacheReader, CacheWriter, LayerData, StoreHeader, load_layer, read_info

__all__ = [
    "__version__",
    "CacheReader",
    "CacheWriter",
    "CodecError",
    "InputError",
    "KvtoolError",
    "LayerData",
    "ModelError",
    "StoreError",
    "StoreHeader",
    "load_layer",
    "read_info",
]
