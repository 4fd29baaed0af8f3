"""The kvtool HDF5 store: the one place that knows the file layout.

Schema version 1
================

A kvtool file is an ordinary HDF5 file; any h5py user can open it.

Root attributes (all required unless marked optional)::

    kvtool_schema      int     1
    kind               str     "cache" (raw keys/values) or "compressed" (codec output)
    model              str     the model spec the user gave ("default", a folder, a hub id, a .gguf path)
    model_architecture str     e.g. "LlamaForCausalLM"
    model_source       str     "sha256:<hex>" of a GGUF file, or a revision / commit hash, or "" if unknown
    num_layers         int     decoder layers in the model
    num_q_heads        int     attention (query) heads
    num_kv_heads       int     key/value heads (== num_q_heads for MHA, 1 for MQA, in between for GQA)
    head_dim           int
    dtype              str     storage dtype of keys/values/queries: "float16" or "float32"
    created            str     ISO-8601 UTC time of the capture
    kvtool_version     str
    text_sha256        str     sha256 of all sequence texts, concatenated in order
    attn_scaling       float   the factor the model multiplies QK^T by (usually head_dim ** -0.5)
    codec_keys         str     (compressed only) canonical codec spec used for keys
    codec_values       str     (compressed only) canonical codec spec used for values

Groups and datasets::

    /sequences/<j>                       attrs: source (file name or "prompt"), text_sha256, num_tokens
    /sequences/<j>/tokens                int32 (T,)   the token ids fed to the model
    /sequences/<j>/layers/<i>            attrs: layer_type ("full" | "sliding"),
                                                sliding_window (int, 0 if none),
                                                key_start (position of the first stored key; > 0 only
                                                when a sliding-window cache dropped older tokens),
                                                optional rope_inv_freq (float32 (n,)) and
                                                rope_attention_factor (float): the layer's rotary
                                                embedding, post = factor * R(position) * pre on the first
                                                2n channels (transformers' rotate_half layout); absent in
                                                files of older captures and for models whose rotary
                                                embedding kvtool cannot reproduce (kvtool/rope.py)
    /sequences/<j>/layers/<i>/keys       (kv_heads, T_i, head_dim)   post-RoPE, as the cache holds them
    /sequences/<j>/layers/<i>/values     (kv_heads, T_i, head_dim)
    /sequences/<j>/layers/<i>/queries    (q_heads, Tq, head_dim)     optional, post-RoPE
    /sequences/<j>/layers/<i>/keys_prerope (kv_heads, T_i, head_dim) optional: the same keys before RoPE
                                         (after the key norm where the model has one)
    /sequences/<j>/layers/<i>/query_positions  int32 (Tq,)          required iff queries exist
    /sequences/<j>/layers/<i>/kept       bool (kv_heads, T_i)        optional: written by decompress for a
                                         token-selecting codec (eviction); True where the key and value
                                         rows exist. Rows marked False were evicted: they hold zeros and
                                         readers must give them no attention (mask, not zero vectors)

``<j>`` and ``<i>`` are decimal indices starting at 0. Keys, values and queries are chunked one head
per chunk, so one head or one layer reads without touching the rest.

In a compressed file (kind="compressed") ``keys`` and ``values`` are *groups* instead of datasets.
Each holds the codec's stored arrays (packed codes, scales, norms, ...) as datasets under the codec's
names, its shared state (a fixed per-layer overhead such as an index table) as datasets
``shared.<name>``, and attributes ``codec`` (the canonical spec), ``shape`` (heads, tokens, head_dim),
``stored_bytes`` (sum of the codec's arrays, shared state excluded) and ``meta.<name>`` for each of the
codec's small scalars (seeds, never matrices). A codec that codes two adjacent layers together (cross-layer
sharing, ``minicache``) stores what they share once, in the first layer's group; the second layer's group
has ``meta.partner`` (the first layer's index) and its codec reads the first group's arrays too.
Queries, when present, stay as they were so attention metrics still work. A compressed file keeps its
source's ``text_sha256`` values.

Integrity. Every dataset is chunked and carries HDF5's Fletcher-32 filter (one checksum per chunk):
keys, values, queries and keys_prerope one chunk per head, every other array (tokens, query positions,
a codec's arrays) one chunk (split along its first axis past 1 GiB). HDF5 cannot chunk a 0-d array,
so a codec's scalar array is stored with shape (1,) and the attribute ``kvtool_scalar`` = 1. Files use
HDF5's 1.10 format (library version bounds v110), whose superblock and object headers carry checksums
too. Keys, values, queries and keys_prerope hold only finite values. Files written before checksums
existed (earliest format, no filter) stay readable; ``kvtool inspect`` says they carry none.

Readers validate the schema version, the required attributes and every shape against the root
attributes, and fail with a :class:`~kvtool.errors.StoreError` that names what was expected. A chunk
that fails its checksum, or data that cannot be read, fails with one StoreError naming the file, the
sequence, the layer and the dataset; a layer holding NaN or infinity with a NonFiniteError naming the
sequence and the layer. Writers go to a temporary file beside the target (space reserved ahead of
each write, so a full disk fails cleanly) and rename it on success, so an interrupted or failed write
never leaves a file posing as complete, nor a temporary file.

Exact bases (kind "base", written by ``kvtool eval --save-base``, read by ``--base``)
-----------------------------------------------------------------------------------

What an eval's exact pass yields for its scored positions, so later runs on the same model, text, context
and mode skip that pass. Root attributes: ``kvtool_schema`` (1), ``kind`` ("base"), ``base_version``
(:data:`BASE_VERSION`), ``model``, ``model_architecture``, ``model_source`` (as above), ``mode``,
``context``, ``prompt_tokens`` (the first ``context // 2`` tokens of a chunk, not scored), ``num_chunks``,
``tokens_sha256`` (sha256 of the chunks' int64 token ids, in order), ``stored`` ("hidden" or "logits"),
``width`` (the last axis of ``exact``), ``created``, ``kvtool_version``. Groups and datasets::

    /chunks/<c>/tokens   int32 (context,)           the chunk's token ids as fed to the model
    /chunks/<c>/exact    float32 (scored, width)    scored = context − 1 − prompt_tokens: per scored
                                                    position, what the model's head reads in the exact pass
                                                    (stored "hidden": the final hidden states, from which
                                                    the head recomputes the exact logits; stored "logits":
                                                    the logits, for a model whose head kvtool cannot apply
                                                    slice by slice, see kvtool/scoring.py)

The hidden states are the model's own float32 (or its bfloat16/float16, widened losslessly), so nothing is
lost: the exact log-distribution is recomputed from them, bit for bit what the exact pass gives. Every
dataset is chunked with Fletcher-32; the file is written to a temporary file and renamed when complete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kvtool._version import __version__
from kvtool.errors import NonFiniteError, StoreError
from kvtool.rope import RopeParams
from kvtool.util import os_error_reason, publish, temp_beside

SCHEMA_VERSION = 1
KIND_CACHE = "cache"
KIND_COMPRESSED = "compressed"
KINDS = (KIND_CACHE, KIND_COMPRESSED)
KIND_BASE = "base"  # an eval's exact base: its own layout (module docstring), not a cache
BASE_VERSION = 1
BASE_CHUNKS = "chunks"
BASE_EXACT = "exact"
BASE_STORED = ("hidden", "logits")
BASE_IDENTITY: dict[str, type] = {  # what a run must match to reuse a base, and each attribute's type
    "model": str, "model_architecture": str, "model_source": str, "mode": str, "context": int,
    "prompt_tokens": int, "num_chunks": int, "tokens_sha256": str, "stored": str, "width": int,
}

SEQUENCES = "sequences"
LAYERS = "layers"
TOKENS = "tokens"
KEYS = "keys"
VALUES = "values"
QUERIES = "queries"
QUERY_POSITIONS = "query_positions"
KEYS_PREROPE = "keys_prerope"
KEPT = "kept"
ROPE_INV_FREQ = "rope_inv_freq"
ROPE_ATTENTION_FACTOR = "rope_attention_factor"

LAYER_FULL = "full"
LAYER_SLIDING = "sliding"
LAYER_TYPES = (LAYER_FULL, LAYER_SLIDING)

STORAGE_DTYPES = ("float16", "float32")

#: HDF5 file-format bounds of every file kvtool writes: the 1.10 format checksums its own metadata.
LIBVER = ("v110", "v110")
#: Marks a codec array that was 0-d before it was stored as shape (1,) (HDF5 cannot chunk a scalar).
SCALAR_ATTR = "kvtool_scalar"
#: Above this a non-head-chunked array is split along its first axis (HDF5 caps a chunk at 4 GiB).
MAX_CHUNK_BYTES = 1 << 30
#: Datasets whose values must be finite (float keys/values/queries of a cache).
FLOAT_DATASETS = (KEYS, VALUES, QUERIES, KEYS_PREROPE)

REQUIRED_ROOT_ATTRS: dict[str, type] = {
    "kvtool_schema": int,
    "kind": str,
    "model": str,
    "model_architecture": str,
    "model_source": str,
    "num_layers": int,
    "num_q_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "dtype": str,
    "created": str,
    "kvtool_version": str,
    "text_sha256": str,
    "attn_scaling": float,
}


def _version() -> str:
    return __version__


# --------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class LayerInfo:
    """What a layer of one sequence holds, read from attributes and dataset shapes only."""

    index: int
    layer_type: str
    sliding_window: int
    key_start: int
    num_tokens: int  # T_i: keys/values actually stored (the window for sliding layers)
    num_queries: int  # Tq, 0 when no queries were captured
    encoded: bool  # keys/values are codec groups (compressed file)


@dataclass(frozen=True)
class SequenceInfo:
    index: int
    source: str
    text_sha256: str
    num_tokens: int
    layers: tuple[LayerInfo, ...]


@dataclass(frozen=True)
class StoreInfo:
    """Root attributes of a kvtool file plus per-sequence, per-layer shapes."""

    path: Path
    kind: str
    model: str
    model_architecture: str
    model_source: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    attn_scaling: float
    created: str
    kvtool_version: str
    text_sha256: str
    sequences: tuple[SequenceInfo, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def has_queries(self) -> bool:
        return any(layer.num_queries > 0 for seq in self.sequences for layer in seq.layers)


@dataclass
class LayerData:
    """One layer of one sequence, as float32 numpy arrays.

    keys, values: (kv_heads, T_i, head_dim); queries: (q_heads, Tq, head_dim) or None;
    keys_prerope: (kv_heads, T_i, head_dim) or None (only when captured with --pre-rope-keys).
    kept: (kv_heads, T_i) bool or None: the rows that exist in a decompressed evicted cache.
    rope: the layer's rotary embedding, or None (older files, or a model kvtool cannot reproduce).
    ``key_positions`` (T_i,) and ``query_positions`` (Tq,) are absolute token positions, which is
    what a causal mask needs when a sliding-window layer kept only its window.
    """

    layer: int
    keys: np.ndarray
    values: np.ndarray
    queries: np.ndarray | None
    key_positions: np.ndarray
    query_positions: np.ndarray | None
    layer_type: str
    sliding_window: int
    scaling: float
    keys_prerope: np.ndarray | None = None
    kept: np.ndarray | None = None
    rope: RopeParams | None = None


# ---------------------------------------------------------------------------------------------- reading


def _fail(path: Path | str, what: str) -> StoreError:
    return StoreError(f"{path}: {what}")


def _attr(obj: Any, name: str, kind: type, path: Path | str) -> Any:
    if name not in obj.attrs:
        raise _fail(path, f"missing attribute '{name}' on {obj.name} (not a kvtool file of schema "
                    f"{SCHEMA_VERSION}?)")
    value = obj.attrs[name]
    with contextlib.suppress(UnicodeDecodeError):
        value = value.decode() if isinstance(value, bytes) else value
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    integral = isinstance(value, (int, np.integer)) and number
    text = isinstance(value, str) and value.encode("utf-8", "replace").decode() == value  # no stray surrogates
    if (kind is int and integral) or (kind is float and number) or (kind is str and text):
        return kind(value)
    shown = repr(value)
    raise _fail(path, f"attribute '{name}' on {obj.name} should be {kind.__name__}, found "
                f"{shown[:60] + '...' if len(shown) > 60 else shown}")


def _problem(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "filter returned failure" in text:  # Fletcher-32 is the only filter kvtool writes
        return "checksum mismatch: the data is damaged (restore the file or capture it again)"
    return f"cannot be read: the file is truncated or corrupt ({text[:160] or type(exc).__name__})"


@contextlib.contextmanager
def reading(path: Path | str, where: str):
    """Turn whatever h5py raises while reading damaged data or metadata into one StoreError naming ``where``
    (for code outside this module that touches the open file directly, such as ``kvtool inspect``)."""
    try:
        yield
    except (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError, OverflowError) as exc:
        raise _fail(path, f"{where}: {_problem(exc)}") from None


def _where(sequence: int, layer: int | None = None, name: str | None = None) -> str:
    parts = [f"sequence {sequence}"] + ([f"layer {layer}"] if layer is not None else [])
    return ", ".join(parts + ([name] if name else []))


def _all_finite(x: np.ndarray) -> bool:
    if x.dtype == np.float16:  # numpy's float16 arithmetic is emulated: test the exponent bits instead
        return not bool(((x.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(x).all())


def check_finite(x: np.ndarray, what: str, hint: str) -> None:
    """Raise :class:`NonFiniteError` "``what`` holds N NaN and M infinite value(s); ``hint``" when ``x``
    is not all finite (a no-op for integer arrays)."""
    if x.dtype.kind != "f" or _all_finite(x):
        return
    n_nan = int(np.isnan(x).sum())
    raise NonFiniteError(f"{what} holds {n_nan} NaN and {int(x.size - n_nan - np.isfinite(x).sum())} "
                         f"infinite value(s); {hint}")


DAMAGED_HINT = "the file is damaged, or its capture overflowed (capture again with --dtype float32)"


def _open_h5(path: Path | str, mode: str = "r"):
    import h5py

    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such file")
    if p.is_dir():
        raise StoreError(f"{p}: is a directory, expected a kvtool .h5 file")
    try:
        return h5py.File(p, mode)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        reason = str(exc).split("(")[0].strip().rstrip(",")
        raise StoreError(f"{p}: not a readable HDF5 file ({reason or 'unreadable'})") from None


class CacheReader:
    """Validating, lazy reader of a kvtool file. Use as a context manager.

    >>> with CacheReader("cache.h5") as r:
    ...     layer = r.layer(3)            # LayerData for sequence 0
    """

    def __init__(self, path: Path | str, *, kinds: tuple[str, ...] = KINDS) -> None:
        self.path = Path(path)
        self._h5 = _open_h5(self.path)
        try:
            self.info = self._validate(kinds)
        except StoreError:
            self._h5.close()
            raise
        except Exception as exc:  # a truncated file can fail deep inside h5py on first touch
            self._h5.close()
            raise _fail(self.path, f"corrupt or truncated HDF5 file ({type(exc).__name__}: {exc})") from None

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._h5.close()

    @property
    def h5(self):
        """The open h5py.File, for code that needs raw access (e.g. compressed groups)."""
        return self._h5

    # -- validation -------------------------------------------------------------------------------

    def _validate(self, kinds: tuple[str, ...]) -> StoreInfo:
        h5, path = self._h5, self.path
        if "kvtool_schema" not in h5.attrs:
            raise _fail(path, "HDF5 file without kvtool's schema (no 'kvtool_schema' attribute); "
                        "create one with `kvtool capture`")
        schema = _attr(h5, "kvtool_schema", int, path)
        if schema != SCHEMA_VERSION:
            raise _fail(path, f"kvtool schema {schema} is not supported (expected {SCHEMA_VERSION})")
        root = {name: _attr(h5, name, kind, path) for name, kind in REQUIRED_ROOT_ATTRS.items()}
        if root["kind"] not in kinds:
            raise _fail(path, f"file kind is '{root['kind']}', expected one of {', '.join(kinds)}")
        if root["dtype"] not in STORAGE_DTYPES:
            raise _fail(path, f"dtype '{root['dtype']}' is not one of {', '.join(STORAGE_DTYPES)}")
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
            if root[name] < 1:
                raise _fail(path, f"attribute '{name}' must be >= 1, found {root[name]}")
        if not (math.isfinite(root["attn_scaling"]) and root["attn_scaling"] > 0):
            raise _fail(path, f"attribute 'attn_scaling' must be a positive number, found {root['attn_scaling']}")
        if root["num_q_heads"] % root["num_kv_heads"]:
            raise _fail(path, f"num_q_heads ({root['num_q_heads']}) is not a multiple of num_kv_heads "
                        f"({root['num_kv_heads']})")
        if SEQUENCES not in h5 or len(h5[SEQUENCES]) == 0:
            raise _fail(path, f"no '/{SEQUENCES}' group with at least one sequence")
        seqs = tuple(self._validate_sequence(j, root) for j in range(len(h5[SEQUENCES])))
        extra = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
        fields = {k: root[k] for k in root if k != "kvtool_schema"}
        return StoreInfo(path=path, sequences=seqs, attrs=extra, **fields)

    def _validate_sequence(self, j: int, root: dict[str, Any]) -> SequenceInfo:
        path = self.path
        name = f"/{SEQUENCES}/{j}"
        if name not in self._h5:
            raise _fail(path, f"missing group {name} (sequences must be numbered 0..N-1)")
        g = self._h5[name]
        if TOKENS not in g or g[TOKENS].ndim != 1:
            raise _fail(path, f"missing 1-D dataset {name}/{TOKENS}")
        n_tok = int(g[TOKENS].shape[0])
        if LAYERS not in g or len(g[LAYERS]) != root["num_layers"]:
            found = len(g[LAYERS]) if LAYERS in g else 0
            raise _fail(path, f"{name}/{LAYERS} should hold {root['num_layers']} layers, found {found}")
        layers = tuple(self._validate_layer(g[LAYERS], i, n_tok, root) for i in range(root["num_layers"]))
        return SequenceInfo(
            index=j,
            source=_attr(g, "source", str, path),
            text_sha256=_attr(g, "text_sha256", str, path),
            num_tokens=n_tok,
            layers=layers,
        )

    def _validate_layer(self, layers: Any, i: int, n_tok: int, root: dict[str, Any]) -> LayerInfo:
        path = self.path
        if str(i) not in layers:
            raise _fail(path, f"missing layer group {layers.name}/{i}")
        g = layers[str(i)]
        layer_type = _attr(g, "layer_type", str, path)
        if layer_type not in LAYER_TYPES:
            raise _fail(path, f"{g.name}: layer_type '{layer_type}' is not one of {', '.join(LAYER_TYPES)}")
        window = _attr(g, "sliding_window", int, path)
        key_start = _attr(g, "key_start", int, path)
        kv_heads, q_heads, d = root["num_kv_heads"], root["num_q_heads"], root["head_dim"]
        encoded = root["kind"] == KIND_COMPRESSED
        t_i = None
        for name in (KEYS, VALUES):
            if name not in g:
                raise _fail(path, f"missing {g.name}/{name}")
            obj = g[name]
            shape = tuple(int(s) for s in (obj.attrs["shape"] if encoded and "shape" in obj.attrs
                                           else getattr(obj, "shape", ())))
            if len(shape) != 3 or shape[0] != kv_heads or shape[2] != d:
                raise _fail(path, f"{obj.name} has shape {shape}, expected ({kv_heads}, tokens, {d})")
            if t_i is not None and shape[1] != t_i:
                raise _fail(path, f"{g.name}: keys hold {t_i} tokens but values {shape[1]}")
            t_i = shape[1]
        if key_start < 0 or key_start + t_i > n_tok:
            raise _fail(path, f"{g.name}: keys cover positions {key_start}..{key_start + t_i - 1} but the "
                        f"sequence has {n_tok} tokens")
        if KEPT in g and tuple(g[KEPT].shape) != (kv_heads, t_i):
            raise _fail(path, f"{g[KEPT].name} has shape {g[KEPT].shape}, expected ({kv_heads}, {t_i})")
        if KEYS_PREROPE in g and tuple(g[KEYS_PREROPE].shape) != (kv_heads, t_i, d):
            raise _fail(path, f"{g[KEYS_PREROPE].name} has shape {g[KEYS_PREROPE].shape}, expected "
                        f"({kv_heads}, {t_i}, {d}) like the keys")
        n_q = 0
        if QUERIES in g:
            q = g[QUERIES]
            if q.ndim != 3 or q.shape[0] != q_heads or q.shape[2] != d:
                raise _fail(path, f"{q.name} has shape {q.shape}, expected ({q_heads}, tokens, {d})")
            n_q = int(q.shape[1])
            if QUERY_POSITIONS not in g or g[QUERY_POSITIONS].shape != (n_q,):
                raise _fail(path, f"{g.name}: queries need a {QUERY_POSITIONS} dataset of shape ({n_q},)")
        return LayerInfo(index=i, layer_type=layer_type, sliding_window=window, key_start=key_start,
                         num_tokens=t_i, num_queries=n_q, encoded=encoded)

    # -- data ---------------------------------------------------------------------------------------

    def check_layer(self, layer: int, sequence: int = 0) -> None:
        """Raise StoreError naming the valid range when ``layer`` or ``sequence`` is out of range."""
        n_seq, n_layer = len(self.info.sequences), self.info.num_layers
        if not 0 <= sequence < n_seq:
            raise _fail(self.path, f"sequence {sequence} out of range: the file holds 0..{n_seq - 1}")
        if not 0 <= layer < n_layer:
            raise _fail(self.path, f"layer {layer} out of range: the file holds 0..{n_layer - 1}")

    def layer_group(self, layer: int, sequence: int = 0):
        self.check_layer(layer, sequence)
        with reading(self.path, _where(sequence, layer)):
            return self._h5[f"/{SEQUENCES}/{sequence}/{LAYERS}/{layer}"]

    def read_dataset(self, group: Any, name: str, sequence: int, layer: int | None = None, *,
                     label: str | None = None) -> np.ndarray:
        """Every chunk of ``group[name]``, checksums verified; a damaged chunk raises StoreError naming the
        file, sequence, layer and dataset (``label``, default ``name``). Float keys/values/queries are
        checked to be finite (NonFiniteError)."""
        where = _where(sequence, layer, label or name)
        with reading(self.path, where):
            ds = group[name]
            x = ds[()]
            if SCALAR_ATTR in ds.attrs:
                x = x.reshape(())
        if name in FLOAT_DATASETS:
            check_finite(x, f"{self.path}: {where}", DAMAGED_HINT)
        return x

    def tokens(self, sequence: int = 0) -> np.ndarray:
        self.check_layer(0, sequence)
        with reading(self.path, _where(sequence)):
            g = self._h5[f"/{SEQUENCES}/{sequence}"]
        return self.read_dataset(g, TOKENS, sequence)

    def layer(self, layer: int, sequence: int = 0, *, queries: bool = True) -> LayerData:
        """Read one layer of one sequence as float32 arrays (see :class:`LayerData`).

        Raises StoreError when a chunk fails its checksum, NonFiniteError when the layer holds NaN/inf.
        """
        g = self.layer_group(layer, sequence)
        info = self.info.sequences[sequence].layers[layer]
        if info.encoded:
            raise _fail(self.path, "keys/values are codec-encoded; decode them with "
                        "`kvtool decompress` or kvtool.compress.decompress")

        def read(name: str) -> np.ndarray | None:
            with reading(self.path, _where(sequence, layer)):
                present = name in g
            return self.read_dataset(g, name, sequence, layer).astype(np.float32, copy=False) if present else None

        keys, values = read(KEYS), read(VALUES)
        q = read(QUERIES) if queries else None
        qpos = self.read_dataset(g, QUERY_POSITIONS, sequence, layer).astype(np.int64) if q is not None else None
        with reading(self.path, _where(sequence, layer)):
            has_kept = KEPT in g
        kept = self.read_dataset(g, KEPT, sequence, layer).astype(bool) if has_kept else None
        return LayerData(
            layer=layer,
            keys=keys,  # type: ignore[arg-type]  # validation guarantees keys and values exist
            values=values,  # type: ignore[arg-type]
            queries=q,
            key_positions=np.arange(info.key_start, info.key_start + info.num_tokens, dtype=np.int64),
            query_positions=qpos,
            layer_type=info.layer_type,
            sliding_window=info.sliding_window,
            scaling=self.info.attn_scaling,
            keys_prerope=read(KEYS_PREROPE),
            kept=kept,
            rope=self.rope(layer, sequence),
        )

    def rope(self, layer: int, sequence: int = 0) -> RopeParams | None:
        """The layer's recorded rotary embedding (``None`` when the file has none)."""
        g = self.layer_group(layer, sequence)
        if ROPE_INV_FREQ not in g.attrs:
            return None
        inv = np.asarray(g.attrs[ROPE_INV_FREQ], dtype=np.float32).reshape(-1)
        if inv.size == 0 or 2 * inv.size > self.info.head_dim:
            raise _fail(self.path, f"{g.name}: {ROPE_INV_FREQ} holds {inv.size} frequencies; expected 1.."
                        f"{self.info.head_dim // 2} (half the rotated channels)")
        return RopeParams(inv, float(g.attrs.get(ROPE_ATTENTION_FACTOR, 1.0)))

    def read_encoded(self, layer: int, name: str, sequence: int = 0) -> tuple[dict[str, np.ndarray],
                                                                               dict[str, Any]]:
        """Arrays and attributes of a codec group (``name`` is ``keys`` or ``values``)."""
        group = self.layer_group(layer, sequence)
        with reading(self.path, _where(sequence, layer, name)):
            g = group[name]
            names = list(g)
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
        arrays = {k: self.read_dataset(g, k, sequence, layer, label=f"{name}/{k}") for k in names}
        return arrays, attrs


def read_info(path: Path | str) -> StoreInfo:
    """Validate a kvtool file and return its metadata (no array data is read)."""
    with CacheReader(path) as reader:
        return reader.info


def load_layer(path: Path | str, layer: int, sequence: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """keys, values, queries-or-None of one layer as float32 numpy arrays.

    keys, values: (kv_heads, tokens, head_dim); queries: (q_heads, Tq, head_dim).
    """
    with CacheReader(path, kinds=(KIND_CACHE,)) as reader:
        data = reader.layer(layer, sequence)
    return data.keys, data.values, data.queries


def _label(name: str) -> str:
    """"/sequences/0/layers/15/keys/codes" -> "sequence 0, layer 15, keys/codes"."""
    parts = name.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == SEQUENCES:
        if len(parts) >= 5 and parts[2] == LAYERS:
            return _where(int(parts[1]) if parts[1].isdigit() else -1,
                          int(parts[3]) if parts[3].isdigit() else -1, "/".join(parts[4:]))
        return f"sequence {parts[1]}, {'/'.join(parts[2:])}"
    return name


def checksum_coverage(reader: CacheReader) -> tuple[int, int]:
    """(datasets carrying the Fletcher-32 filter, all datasets) of an open kvtool file."""
    import h5py

    datasets: list[Any] = []
    with reading(reader.path, "listing the datasets"):
        reader.h5.visititems(lambda _name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        return sum(bool(ds.fletcher32) for ds in datasets), len(datasets)


def verify(path: Path | str) -> dict[str, Any]:
    """Read every chunk of every dataset of a kvtool file: checksums where the file has them, and that
    keys/values/queries are finite. Memory: one chunk (one head of one layer) at a time.

    Returns ``{"datasets", "checksummed", "chunks", "bytes", "problems"}``; ``problems`` holds one line per
    damaged dataset ("sequence 0, layer 15, keys: checksum mismatch in 1 of 3 chunks: ...").
    """
    import h5py

    with CacheReader(path) as reader:
        names: list[str] = []
        with reading(reader.path, "listing the datasets"):
            reader.h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        out: dict[str, Any] = {"datasets": len(names), "checksummed": 0, "chunks": 0, "bytes": 0,
                               "problems": []}
        for name in names:
            _verify_dataset(reader, name, out)
    return out


def _verify_dataset(reader: CacheReader, name: str, out: dict[str, Any]) -> None:
    label = _label(name)
    try:
        ds = reader.h5[name]
        out["checksummed"] += bool(ds.fletcher32)
        pieces = list(ds.iter_chunks()) if ds.chunks and ds.size else [()]
    except Exception as exc:  # damaged metadata: h5py raises a variety of types
        out["problems"].append(f"{label}: {_problem(exc)}")
        return
    bad, first, nonfinite = 0, "", 0
    for sel in pieces:
        try:
            x = ds[sel]
        except Exception as exc:
            bad += 1
            first = first or _problem(exc)
            continue
        out["chunks"] += 1
        out["bytes"] += int(np.asarray(x).nbytes)
        if name.rsplit("/", 1)[-1] in FLOAT_DATASETS and np.asarray(x).dtype.kind == "f":
            nonfinite += int(np.size(x) - np.isfinite(x).sum())
    if bad:
        out["problems"].append(f"{label}: {bad} of {len(pieces)} chunk(s) bad, {first}")
    if nonfinite:
        out["problems"].append(f"{label}: {nonfinite} NaN/infinite value(s); {DAMAGED_HINT}")


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class StoreHeader:
    """Root attributes a writer needs; see the module docstring for their meaning."""

    model: str
    model_architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    attn_scaling: float
    dtype: str = "float16"
    model_source: str = ""
    kind: str = KIND_CACHE
    extra: dict[str, Any] = field(default_factory=dict)
    text_sha256: str | None = None  # a derived file keeps its source's; otherwise hashed from the texts


def check_output_path(path: Path | str, force: bool) -> Path:
    """Refuse an existing output without ``force`` and an unwritable directory, before any work."""
    p = Path(path)
    if p.exists() and p.is_dir():
        raise StoreError(f"{p}: is a directory; give a file name such as {p / 'cache.h5'}")
    if p.exists() and not force:
        raise StoreError(f"{p}: already exists (pass --force to overwrite)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise StoreError(f"{parent}: output directory does not exist")
    if not parent.is_dir():
        raise StoreError(f"{parent}: is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"{parent}: output directory is not writable")
    return p


#: Disk space kept reserved beyond what a writer has written so far (HDF5's own metadata), and an upper
#: bound of one object's metadata (object header, chunk index, attributes).
RESERVE_HEADROOM = 128 << 10
RESERVE_PER_OBJECT = 2 << 10
RESERVE_STEP = 64 << 20  # reservations grow geometrically up to this step
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _hdf5_end(path: Path) -> int | None:
    """The end-of-file address a version 2/3 superblock records (None for other superblocks)."""
    with open(path, "rb") as f:
        head = f.read(48)
    if len(head) < 48 or head[:8] != _HDF5_SIGNATURE or head[8] not in (2, 3) or head[9] != 8:
        return None
    base = int.from_bytes(head[12:20], "little")
    return base + int.from_bytes(head[28:36], "little")


def _chunking(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One chunk for the whole array; split along the first axis when it is larger than MAX_CHUNK_BYTES."""
    chunks = [max(1, n) for n in shape]
    row = itemsize * math.prod(chunks[1:])
    if chunks and row * chunks[0] > MAX_CHUNK_BYTES:
        chunks[0] = max(1, MAX_CHUNK_BYTES // row)
    return tuple(chunks)


def _attrs_bytes(attrs: Mapping[str, Any]) -> int:
    return sum(len(k) + (np.asarray(v).nbytes if not isinstance(v, str) else len(v.encode()))
               for k, v in attrs.items())


class CacheWriter:
    """Atomic writer of a kvtool file.

    Everything goes to a hidden temporary file beside ``path``; :meth:`commit` (called by a clean
    ``with`` exit) renames it into place. Any exception, KeyboardInterrupt included, removes it.

    Disk space is reserved (``posix_fallocate``) before each write, so a full disk or a file-size limit
    fails as one StoreError with the temporary file removed, not inside HDF5 (whose write errors surface
    late, or not at all). Without ``force`` an output that another process finished meanwhile is never
    overwritten.
    """

    def __init__(self, path: Path | str, header: StoreHeader, *, force: bool = False) -> None:
        import h5py

        if header.dtype not in STORAGE_DTYPES:
            raise StoreError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {header.dtype!r}")
        if header.kind not in KINDS:
            raise StoreError(f"kind must be one of {', '.join(KINDS)}, got {header.kind!r}")
        self.path = check_output_path(path, force)
        self.header = header
        self._force = force
        self._np_dtype = np.dtype(header.dtype)
        try:
            self._tmp = temp_beside(self.path)
        except OSError as exc:
            raise StoreError(f"{self.path.parent}: output directory is not writable "
                             f"({exc.strerror or exc})") from None
        self._done = False
        self._fd: int | None = None
        self._estimate = self._reserved = 0
        self._texts = hashlib.sha256()
        self._sequences = 0
        with self._writing():
            self._h5 = h5py.File(self._tmp, "w", libver=LIBVER)
            self._fd = os.open(self._tmp, os.O_WRONLY)
            self._reserve(_attrs_bytes(header.extra), objects=2)
            self._write_root()

    # -- disk space and failures --------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self):
        """An OSError while writing (a full disk, a file-size limit) aborts: one StoreError, no file left."""
        try:
            yield
        except OSError as exc:
            self.abort()
            raise StoreError(f"{self.path}: cannot write ({os_error_reason(exc)}); no file was left") from None
        except BaseException:
            self.abort()
            raise

    def _reserve(self, nbytes: int, objects: int = 1) -> None:
        """Allocate disk space for ``nbytes`` of data and ``objects`` new HDF5 objects before HDF5 writes
        them; raises OSError (ENOSPC, EFBIG) while nothing is half-written."""
        self._estimate += nbytes + objects * RESERVE_PER_OBJECT
        end = self._estimate + RESERVE_HEADROOM
        if self._fd is None or end <= self._reserved:
            return
        ahead = max(end, min(2 * self._reserved, self._reserved + RESERVE_STEP))  # fewer, larger reservations
        for want in dict.fromkeys((ahead, end)):  # near a limit, reserve only what is needed before failing
            try:
                os.posix_fallocate(self._fd, self._reserved, want - self._reserved)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
                    self._close_fd()  # a file system that cannot reserve: write unreserved (best effort)
                    return
                if want == end:
                    raise
                continue
            self._reserved = want
            return

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _create(self, g: Any, name: str, data: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
        """A chunked dataset with the Fletcher-32 filter (see "Integrity" in the module docstring)."""
        x = np.asarray(data)
        scalar = x.ndim == 0
        if scalar:
            x = x.reshape(1)
        chunks = tuple(max(1, int(c)) for c in (chunks or _chunking(x.shape, x.itemsize)))
        # HDF5 needs chunk sides >= 1, so an empty axis must be extendible to be chunked at all.
        maxshape = tuple(None if n == 0 else n for n in x.shape)
        n_chunks = math.prod(-(-max(n, 1) // c) for n, c in zip(x.shape, chunks, strict=True))
        self._reserve(x.nbytes + 4 * n_chunks)
        ds = g.create_dataset(name, data=x, chunks=chunks, maxshape=maxshape, fletcher32=True)
        if scalar:
            ds.attrs[SCALAR_ATTR] = 1

    # -- the file -----------------------------------------------------------------------------------

    def _write_root(self) -> None:
        h = self.header
        a = self._h5.attrs
        a["kvtool_schema"] = SCHEMA_VERSION
        a["kind"] = h.kind
        a["model"] = h.model
        a["model_architecture"] = h.model_architecture
        a["model_source"] = h.model_source
        a["num_layers"] = h.num_layers
        a["num_q_heads"] = h.num_q_heads
        a["num_kv_heads"] = h.num_kv_heads
        a["head_dim"] = h.head_dim
        a["dtype"] = h.dtype
        a["attn_scaling"] = float(h.attn_scaling)
        a["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        a["kvtool_version"] = _version()
        a["text_sha256"] = hashlib.sha256().hexdigest()
        for k, v in h.extra.items():
            a[k] = v
        self._h5.create_group(SEQUENCES)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def add_sequence(self, tokens: np.ndarray, *, source: str, text: str | bytes = b"",
                     text_sha256: str | None = None) -> int:
        """Start sequence j (returned); ``tokens`` (T,) int. Layers are written with :meth:`write_layer`.

        ``text_sha256`` overrides the hash of ``text`` (a derived file copying its source's sequences).
        """
        raw = text.encode() if isinstance(text, str) else text
        self._texts.update(raw)
        j = self._sequences
        with self._writing():
            self._reserve(len(source.encode()), objects=2)
            g = self._h5.create_group(f"{SEQUENCES}/{j}")
            g.attrs["source"] = source
            g.attrs["text_sha256"] = text_sha256 or hashlib.sha256(raw).hexdigest()
            g.attrs["num_tokens"] = int(len(tokens))
            self._create(g, TOKENS, np.asarray(tokens, dtype=np.int32))
            g.create_group(LAYERS)
        self._sequences += 1
        return j

    def _layer_group(self, sequence: int, layer: int, layer_type: str, sliding_window: int, key_start: int,
                     rope: RopeParams | None = None):
        if layer_type not in LAYER_TYPES:
            raise StoreError(f"layer_type must be one of {', '.join(LAYER_TYPES)}, got {layer_type!r}")
        self._reserve(0)
        g = self._h5.require_group(f"{SEQUENCES}/{sequence}/{LAYERS}/{layer}")
        g.attrs["layer_type"] = layer_type
        g.attrs["sliding_window"] = int(sliding_window)
        g.attrs["key_start"] = int(key_start)
        if rope is not None:
            g.attrs[ROPE_INV_FREQ] = np.asarray(rope.inv_freq, dtype=np.float32)
            g.attrs[ROPE_ATTENTION_FACTOR] = float(rope.attention_factor)
        return g

    def _put(self, g: Any, name: str, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[2] != self.header.head_dim:
            raise StoreError(f"{name} must be (heads, tokens, {self.header.head_dim}), got {x.shape}")
        with np.errstate(over="ignore"):  # an overflowing cast is reported below, not as a warning
            stored = x.astype(self._np_dtype, copy=False)
        check_finite(stored, f"{self.path}: cannot store {g.name}/{name}: it",
                     f"kvtool files hold finite {self.header.dtype} values only"
                     + (" (a float16 overflow needs --dtype float32)" if self.header.dtype == "float16" else ""))
        self._create(g, name, stored, chunks=(1, max(1, x.shape[1]), x.shape[2]))  # one head per chunk

    def write_layer(self, sequence: int, layer: int, keys: np.ndarray, values: np.ndarray, *,
                    queries: np.ndarray | None = None, query_positions: np.ndarray | None = None,
                    layer_type: str = LAYER_FULL, sliding_window: int = 0, key_start: int = 0,
                    keys_prerope: np.ndarray | None = None, kept: np.ndarray | None = None,
                    rope: RopeParams | None = None) -> None:
        """Write one layer: keys/values (and keys_prerope) (kv_heads, T_i, head_dim), queries (q_heads, Tq, d),
        ``kept`` (kv_heads, T_i) bool for a decompressed evicted cache; ``rope``: the layer's rotary
        embedding, if known."""
        h = self.header
        for name, x in ((KEYS, keys), (VALUES, values)):
            if np.shape(x)[0] != h.num_kv_heads:
                raise StoreError(f"{name} have {np.shape(x)[0]} heads, expected {h.num_kv_heads}")
        if keys_prerope is not None and np.shape(keys_prerope) != np.shape(keys):
            raise StoreError(f"keys_prerope shape {np.shape(keys_prerope)} differs from keys {np.shape(keys)}")
        if kept is not None and np.shape(kept) != np.shape(keys)[:2]:
            raise StoreError(f"kept mask shape {np.shape(kept)} differs from keys {np.shape(keys)[:2]}")
        with self._writing():
            g = self._layer_group(sequence, layer, layer_type, sliding_window, key_start, rope)
            self._put(g, KEYS, keys)
            self._put(g, VALUES, values)
            if keys_prerope is not None:
                self._put(g, KEYS_PREROPE, keys_prerope)
            if kept is not None:
                self._create(g, KEPT, np.asarray(kept, dtype=bool))
        if queries is not None:
            self.write_queries(sequence, layer, queries, query_positions)

    def write_queries(self, sequence: int, layer: int, queries: np.ndarray,
                      query_positions: np.ndarray | None) -> None:
        if np.shape(queries)[0] != self.header.num_q_heads:
            raise StoreError(f"queries have {np.shape(queries)[0]} heads, expected {self.header.num_q_heads}")
        if query_positions is None or len(query_positions) != np.shape(queries)[1]:
            raise StoreError("queries need query_positions with one position per query token")
        with self._writing():
            self._reserve(0)
            g = self._h5.require_group(f"{SEQUENCES}/{sequence}/{LAYERS}/{layer}")
            self._put(g, QUERIES, queries)
            self._create(g, QUERY_POSITIONS, np.asarray(query_positions, dtype=np.int32))

    def write_encoded(self, sequence: int, layer: int, name: str, arrays: Mapping[str, np.ndarray],
                      attrs: Mapping[str, Any], *, shape: tuple[int, int, int], layer_type: str = LAYER_FULL,
                      sliding_window: int = 0, key_start: int = 0, rope: RopeParams | None = None) -> None:
        """Write a codec group (compressed files): ``arrays`` stored as-is, ``attrs`` as attributes."""
        with self._writing():
            g = self._layer_group(sequence, layer, layer_type, sliding_window, key_start, rope)
            self._reserve(_attrs_bytes(attrs))
            grp = g.create_group(name)
            for k, v in arrays.items():
                self._create(grp, k, np.asarray(v))
            for k, v in attrs.items():
                grp.attrs[k] = v
            grp.attrs["shape"] = np.asarray(shape, dtype=np.int64)

    def commit(self) -> Path:
        """Close the temporary file and rename it to ``path``; StoreError (and nothing left) on failure."""
        if self._done:
            return self.path
        with self._writing():
            self._reserve(0)
            self._h5.attrs["text_sha256"] = self.header.text_sha256 or self._texts.hexdigest()
            self._h5.close()
            self._close_fd()
            end = _hdf5_end(self._tmp) if self._reserved else None
            if end is not None and end < self._tmp.stat().st_size:
                os.truncate(self._tmp, end)  # give back the space reserved beyond HDF5's end of file
            try:
                publish(self._tmp, self.path, replace=self._force)
            except FileExistsError:
                raise StoreError(f"{self.path}: another process created this file while kvtool was writing "
                                 "it; it was left as it is (pass --force to overwrite)") from None
        self._done = True
        return self.path

    def abort(self) -> None:
        """Remove the temporary file (safe to call twice, and after a failed write)."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(Exception):
            self._h5.close()
        self._close_fd()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


# ------------------------------------------------------------------------ derived files (compress/decompress)

CODEC_ATTR = "codec"
STORED_BYTES_ATTR = "stored_bytes"
SHARED_PREFIX = "shared."
META_PREFIX = "meta."


def derived_writer(path: Path | str, source: StoreInfo, *, kind: str, extra: Mapping[str, Any] | None = None,
                   force: bool = False) -> CacheWriter:
    """A writer for a file derived from ``source`` (compressed or decompressed): the same model header and
    text hashes, another ``kind``. Sequences are copied with :func:`copy_sequence`."""
    if Path(path).resolve() == Path(source.path).resolve():
        raise StoreError(f"{path}: the output must not be the input file")
    header = StoreHeader(model=source.model, model_architecture=source.model_architecture,
                         num_layers=source.num_layers, num_q_heads=source.num_q_heads,
                         num_kv_heads=source.num_kv_heads, head_dim=source.head_dim,
                         attn_scaling=source.attn_scaling, dtype=source.dtype, model_source=source.model_source,
                         kind=kind, extra=dict(extra or {}), text_sha256=source.text_sha256)
    return CacheWriter(path, header, force=force)


def copy_sequence(writer: CacheWriter, reader: CacheReader, sequence: int) -> int:
    """Start a sequence in ``writer`` with the tokens, source and text hash of ``reader``'s ``sequence``."""
    seq = reader.info.sequences[sequence]
    return writer.add_sequence(reader.tokens(sequence), source=seq.source, text_sha256=seq.text_sha256)


# ------------------------------------------------------------------------------------------ exact bases


class BaseWriter:
    """Atomic writer of an exact base (layout in the module docstring): chunks are added as they are
    computed, into a temporary file beside ``path`` that :meth:`commit` renames into place; any exception
    (an interruption included) removes it. ``identity`` holds every :data:`BASE_IDENTITY` attribute."""

    def __init__(self, path: Path | str, identity: Mapping[str, Any], *, force: bool = True) -> None:
        import h5py

        missing = [k for k in BASE_IDENTITY if k not in identity]
        if missing:
            raise StoreError(f"an exact base needs {', '.join(missing)}")
        self.path = check_output_path(path, force)
        try:
            self._tmp = temp_beside(self.path)
            self._h5 = h5py.File(self._tmp, "w", libver=LIBVER)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write ({os_error_reason(exc)})") from None
        a = self._h5.attrs
        a["kvtool_schema"] = SCHEMA_VERSION
        a["kind"] = KIND_BASE
        a["base_version"] = BASE_VERSION
        for k, kind in BASE_IDENTITY.items():
            a[k] = kind(identity[k])
        a["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        a["kvtool_version"] = _version()
        self._chunks = self._h5.create_group(BASE_CHUNKS)
        self._n = 0

    def add_chunk(self, tokens: np.ndarray, exact: np.ndarray) -> None:
        """Chunk ``self._n``: its ``tokens`` ``(context,)`` and ``exact`` ``(scored, width)``."""
        g = self._chunks.create_group(str(self._n))
        try:
            for name, x in ((TOKENS, np.asarray(tokens, dtype=np.int32)),
                            (BASE_EXACT, np.asarray(exact, dtype=np.float32))):
                g.create_dataset(name, data=x, chunks=_chunking(x.shape, x.itemsize), fletcher32=True)
        except OSError as exc:
            self.abort()
            raise StoreError(f"{self.path}: cannot write ({os_error_reason(exc)}); no file was left") from None
        self._n += 1

    def commit(self) -> Path:
        expected = int(self._h5.attrs["num_chunks"])
        if self._n != expected:
            self.abort()
            raise StoreError(f"{self.path}: {self._n} chunks written, {expected} expected; no file was left")
        try:
            self._h5.close()
            publish(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise StoreError(f"{self.path}: cannot write ({os_error_reason(exc)}); no file was left") from None
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._h5.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> BaseWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class BaseReader:
    """Reader of an exact base: validates kind, version and identity attributes on open; chunk by chunk."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._h5 = _open_h5(self.path)
        try:
            with reading(self.path, "root"):
                kind = _attr(self._h5, "kind", str, self.path)
                if kind != KIND_BASE:
                    raise _fail(self.path, f"is a kvtool file of kind {kind!r}, not an exact base "
                                "(make one with kvtool eval --save-base)")
                version = _attr(self._h5, "base_version", int, self.path)
                if version != BASE_VERSION:
                    raise _fail(self.path, f"exact base version {version}; this kvtool reads version "
                                f"{BASE_VERSION} (compute it again with --save-base)")
                self.identity = {k: _attr(self._h5, k, kind, self.path) for k, kind in BASE_IDENTITY.items()}
                chunks = self._h5[BASE_CHUNKS]
                if len(chunks) != self.identity["num_chunks"]:
                    raise _fail(self.path, f"holds {len(chunks)} chunks, its header says "
                                f"{self.identity['num_chunks']}")
        except BaseException:
            self._h5.close()
            raise

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``c``: (tokens ``(context,)`` int64, exact ``(scored, width)`` float32)."""
        with reading(self.path, f"chunk {c}"):
            g = self._h5[BASE_CHUNKS][str(c)]
            tokens = np.asarray(g[TOKENS][...], dtype=np.int64)
            exact = np.asarray(g[BASE_EXACT][...])
        scored = self.identity["context"] - 1 - self.identity["prompt_tokens"]
        if tokens.shape != (self.identity["context"],) or exact.shape != (scored, self.identity["width"]):
            raise _fail(self.path, f"chunk {c} holds tokens {tokens.shape} and exact {exact.shape}; expected "
                        f"({self.identity['context']},) and ({scored}, {self.identity['width']})")
        check_finite(exact, f"{self.path}: chunk {c}", "the file is damaged")
        return tokens, exact

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> BaseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
