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
                                                when a sliding-window cache dropped older tokens)
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

Readers validate the schema version, the required attributes and every shape against the root
attributes, and fail with a :class:`~kvtool.errors.StoreError` that names what was expected.
Writers go to a temporary file beside the target and rename it on success, so an interrupted write
never leaves a file posing as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.errors import StoreError

SCHEMA_VERSION = 1
KIND_CACHE = "cache"
KIND_COMPRESSED = "compressed"
KINDS = (KIND_CACHE, KIND_COMPRESSED)

SEQUENCES = "sequences"
LAYERS = "layers"
TOKENS = "tokens"
KEYS = "keys"
VALUES = "values"
QUERIES = "queries"
QUERY_POSITIONS = "query_positions"
KEYS_PREROPE = "keys_prerope"
KEPT = "kept"

LAYER_FULL = "full"
LAYER_SLIDING = "sliding"
LAYER_TYPES = (LAYER_FULL, LAYER_SLIDING)

STORAGE_DTYPES = ("float16", "float32")

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
    from kvtool import __version__

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


# ---------------------------------------------------------------------------------------------- reading


def _fail(path: Path | str, what: str) -> StoreError:
    return StoreError(f"{path}: {what}")


def _attr(obj: Any, name: str, kind: type, path: Path | str) -> Any:
    if name not in obj.attrs:
        raise _fail(path, f"missing attribute '{name}' on {obj.name} (not a kvtool file of schema "
                    f"{SCHEMA_VERSION}?)")
    value = obj.attrs[name]
    if isinstance(value, bytes):
        value = value.decode()
    try:
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise _fail(path, f"attribute '{name}' on {obj.name} should be {kind.__name__}, "
                    f"found {value!r}") from None


def _open_h5(path: Path | str, mode: str = "r"):
    import h5py

    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such file")
    if p.is_dir():
        raise StoreError(f"{p}: is a directory, expected a kvtool .h5 file")
    try:
        return h5py.File(p, mode)
    except OSError as exc:
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
        return self._h5[f"/{SEQUENCES}/{sequence}/{LAYERS}/{layer}"]

    def tokens(self, sequence: int = 0) -> np.ndarray:
        self.check_layer(0, sequence)
        return self._h5[f"/{SEQUENCES}/{sequence}/{TOKENS}"][()]

    def layer(self, layer: int, sequence: int = 0, *, queries: bool = True) -> LayerData:
        """Read one layer of one sequence as float32 arrays (see :class:`LayerData`)."""
        g = self.layer_group(layer, sequence)
        info = self.info.sequences[sequence].layers[layer]
        if info.encoded:
            raise _fail(self.path, "keys/values are codec-encoded; decode them with "
                        "`kvtool decompress` or kvtool.compress.decompress")
        try:
            keys = g[KEYS][()].astype(np.float32, copy=False)
            values = g[VALUES][()].astype(np.float32, copy=False)
            q = g[QUERIES][()].astype(np.float32, copy=False) if queries and QUERIES in g else None
            qpos = g[QUERY_POSITIONS][()].astype(np.int64) if q is not None else None
            pre = g[KEYS_PREROPE][()].astype(np.float32, copy=False) if KEYS_PREROPE in g else None
            kept = g[KEPT][()].astype(bool) if KEPT in g else None
        except OSError as exc:
            raise _fail(self.path, f"cannot read {g.name} (truncated or corrupt: {exc})") from None
        return LayerData(
            layer=layer,
            keys=keys,
            values=values,
            queries=q,
            key_positions=np.arange(info.key_start, info.key_start + info.num_tokens, dtype=np.int64),
            query_positions=qpos,
            layer_type=info.layer_type,
            sliding_window=info.sliding_window,
            scaling=self.info.attn_scaling,
            keys_prerope=pre,
            kept=kept,
        )

    def read_encoded(self, layer: int, name: str, sequence: int = 0) -> tuple[dict[str, np.ndarray],
                                                                               dict[str, Any]]:
        """Arrays and attributes of a codec group (``name`` is ``keys`` or ``values``)."""
        g = self.layer_group(layer, sequence)[name]
        arrays = {k: g[k][()] for k in g}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
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


class CacheWriter:
    """Atomic writer of a kvtool file.

    Everything goes to a hidden temporary file beside ``path``; :meth:`commit` (called by a clean
    ``with`` exit) renames it into place. Any exception, KeyboardInterrupt included, removes it.
    """

    def __init__(self, path: Path | str, header: StoreHeader, *, force: bool = False) -> None:
        import h5py

        if header.dtype not in STORAGE_DTYPES:
            raise StoreError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {header.dtype!r}")
        if header.kind not in KINDS:
            raise StoreError(f"kind must be one of {', '.join(KINDS)}, got {header.kind!r}")
        self.path = check_output_path(path, force)
        self.header = header
        self._np_dtype = np.dtype(header.dtype)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
        except OSError as exc:
            raise StoreError(f"{self.path.parent}: output directory is not writable "
                             f"({exc.strerror or exc})") from None
        self._tmp = Path(tmp)
        self._h5 = h5py.File(self._tmp, "w")
        self._texts = hashlib.sha256()
        self._sequences = 0
        self._done = False
        self._write_root()

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
        g = self._h5.create_group(f"{SEQUENCES}/{j}")
        g.attrs["source"] = source
        g.attrs["text_sha256"] = text_sha256 or hashlib.sha256(raw).hexdigest()
        g.attrs["num_tokens"] = int(len(tokens))
        g.create_dataset(TOKENS, data=np.asarray(tokens, dtype=np.int32))
        g.create_group(LAYERS)
        self._sequences += 1
        return j

    def _layer_group(self, sequence: int, layer: int, layer_type: str, sliding_window: int, key_start: int):
        if layer_type not in LAYER_TYPES:
            raise StoreError(f"layer_type must be one of {', '.join(LAYER_TYPES)}, got {layer_type!r}")
        g = self._h5.require_group(f"{SEQUENCES}/{sequence}/{LAYERS}/{layer}")
        g.attrs["layer_type"] = layer_type
        g.attrs["sliding_window"] = int(sliding_window)
        g.attrs["key_start"] = int(key_start)
        return g

    def _put(self, g: Any, name: str, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[2] != self.header.head_dim:
            raise StoreError(f"{name} must be (heads, tokens, {self.header.head_dim}), got {x.shape}")
        chunks = (1, max(1, x.shape[1]), x.shape[2])  # one head per chunk
        g.create_dataset(name, data=x.astype(self._np_dtype, copy=False), chunks=chunks)

    def write_layer(self, sequence: int, layer: int, keys: np.ndarray, values: np.ndarray, *,
                    queries: np.ndarray | None = None, query_positions: np.ndarray | None = None,
                    layer_type: str = LAYER_FULL, sliding_window: int = 0, key_start: int = 0,
                    keys_prerope: np.ndarray | None = None, kept: np.ndarray | None = None) -> None:
        """Write one layer: keys/values (and keys_prerope) (kv_heads, T_i, head_dim), queries (q_heads, Tq, d),
        ``kept`` (kv_heads, T_i) bool for a decompressed evicted cache."""
        h = self.header
        for name, x in ((KEYS, keys), (VALUES, values)):
            if np.shape(x)[0] != h.num_kv_heads:
                raise StoreError(f"{name} have {np.shape(x)[0]} heads, expected {h.num_kv_heads}")
        g = self._layer_group(sequence, layer, layer_type, sliding_window, key_start)
        self._put(g, KEYS, keys)
        self._put(g, VALUES, values)
        if keys_prerope is not None:
            if np.shape(keys_prerope) != np.shape(keys):
                raise StoreError(f"keys_prerope shape {np.shape(keys_prerope)} differs from keys {np.shape(keys)}")
            self._put(g, KEYS_PREROPE, keys_prerope)
        if kept is not None:
            if np.shape(kept) != np.shape(keys)[:2]:
                raise StoreError(f"kept mask shape {np.shape(kept)} differs from keys {np.shape(keys)[:2]}")
            g.create_dataset(KEPT, data=np.asarray(kept, dtype=bool))
        if queries is not None:
            self.write_queries(sequence, layer, queries, query_positions)

    def write_queries(self, sequence: int, layer: int, queries: np.ndarray,
                      query_positions: np.ndarray | None) -> None:
        if np.shape(queries)[0] != self.header.num_q_heads:
            raise StoreError(f"queries have {np.shape(queries)[0]} heads, expected {self.header.num_q_heads}")
        if query_positions is None or len(query_positions) != np.shape(queries)[1]:
            raise StoreError("queries need query_positions with one position per query token")
        g = self._h5.require_group(f"{SEQUENCES}/{sequence}/{LAYERS}/{layer}")
        self._put(g, QUERIES, queries)
        g.create_dataset(QUERY_POSITIONS, data=np.asarray(query_positions, dtype=np.int32))

    def write_encoded(self, sequence: int, layer: int, name: str, arrays: Mapping[str, np.ndarray],
                      attrs: Mapping[str, Any], *, shape: tuple[int, int, int], layer_type: str = LAYER_FULL,
                      sliding_window: int = 0, key_start: int = 0) -> None:
        """Write a codec group (compressed files): ``arrays`` stored as-is, ``attrs`` as attributes."""
        g = self._layer_group(sequence, layer, layer_type, sliding_window, key_start)
        grp = g.create_group(name)
        for k, v in arrays.items():
            grp.create_dataset(k, data=np.asarray(v))
        for k, v in attrs.items():
            grp.attrs[k] = v
        grp.attrs["shape"] = np.asarray(shape, dtype=np.int64)

    def commit(self) -> Path:
        if self._done:
            return self.path
        self._h5.attrs["text_sha256"] = self.header.text_sha256 or self._texts.hexdigest()
        self._h5.close()
        # mkstemp creates 0600; give the finished file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)
        os.replace(self._tmp, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        if self._done:
            return
        with contextlib.suppress(Exception):
            self._h5.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()
        self._done = True


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
