"""kvtool: capture, analyse and compress the KV cache of causal language models, offline.

The library is importable without the CLI; heavy dependencies (torch, transformers) load lazily.

>>> import kvtool
>>> keys, values, queries = kvtool.load_layer("cache.h5", layer=0)   # (heads, tokens, head_dim) each
>>> codec = kvtool.parse_spec("turboquant:bits=3")
>>> from kvtool.compress import compress
>>> report = compress("cache.h5", codec, codec)                       # per-layer bits and errors
"""

from __future__ import annotations

from kvtool._version import __version__
from kvtool.errors import CodecError, InputError, KvtoolError, ModelError, StoreError
from kvtool.store import CacheReader, CacheWriter, LayerData, StoreHeader, load_layer, read_info


def __getattr__(name: str):
    # the codecs pull in torch: import them only when asked for.
    if name == "parse_spec":
        from kvtool.codecs import parse_spec

        return parse_spec
    if name == "CodecCache":  # imports torch and transformers
        from kvtool.cache import CodecCache

        return CodecCache
    if name == "Assignment":
        from kvtool.codecs.assignment import Assignment

        return Assignment
    raise AttributeError(f"module 'kvtool' has no attribute {name!r}")


__all__ = [
    "__version__",
    "parse_spec",
    "Assignment",
    "CodecCache",
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
