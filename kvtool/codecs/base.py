"""The codec contract: what every KV-cache codec implements and what it must report honestly.

A codec turns one tensor of one layer — keys or values, shape ``(heads, tokens, head_dim)`` float32 —
into an :class:`Encoded`: the arrays that are actually stored (packed codes, fp16 scales, norms, kept
indices, residual windows...) plus a few scalars (a seed). ``Encoded.nbytes`` is the sum of those arrays'
bytes and is the only size kvtool ever reports; a codec cannot claim a nominal bit width.

Life cycle, as :func:`kvtool.compress.compress` drives it for each layer and each of keys/values::

    codec = parse_spec("uniform:bits=4")       # a dataclass; its fields are the spec parameters
    codec.fit(x, context)                      # x (heads, tokens, head_dim); data-oblivious codecs only
                                               # validate the shape
    enc = codec.encode(x)                      # Encoded
    x_hat = codec.decode(enc)                  # (heads, tokens, head_dim) float32

Rules every codec follows:

* ``decode`` works from ``enc.arrays``, ``enc.meta``, the codec's parameters and (if any) the state
  restored with :meth:`Codec.load_shared_state` — never from state left behind by ``fit``/``encode``, so
  ``kvtool decompress`` can rebuild a cache from a file with a freshly parsed codec.
* Fitted state that is a fixed overhead independent of the number of tokens (a codebook, a PCA basis) is
  returned by :meth:`Codec.shared_state`, stored once per layer and tensor, and reported beside the bits per
  element (and amortized over the cache in ``bits_per_element_with_state``). A rotation is stored as its
  seed in ``meta``, not as a matrix.
* State restored with :meth:`Codec.load_shared_state` *before* ``fit`` is kept: ``fit`` then only binds
  what belongs to the tensor itself (positions, selector scores). That is how ``compress --fit-on``
  applies a basis or codebook fitted on another cache (compress also restores it again after ``fit``, so
  a codec that refits regardless still codes with the calibration state).
* Invalid parameters raise :class:`kvtool.errors.CodecError` naming the allowed values, from
  :meth:`Codec.validate` (called on construction with ``head_dim=None`` and by ``fit`` with the real
  head_dim).

Composition and stages:

* A :class:`Stage` turns ``x`` into arrays it stores itself plus a *payload* for the next codec; alone it
  stores the payload in fp16. :class:`Composed` (``a+b``, built by the spec parser from ``+``) hands the
  head's payload to the tail and counts both: ``snapkv:keep=0.5+kivi:bits=4`` (a token selector's kept
  rows), ``lowrank:rank=24+turboquant:bits=4`` (low-rank coefficients, so TurboQuant's head_dim is 24),
  ``snapkv:keep=0.5+lowrank:rank=32+turboquant:bits=4`` (stages chain). Only the last codec may be a
  plain quantizer.
* Token selection (SnapKV, H2O, StreamingLLM) subclasses :class:`Selector`, the stage whose payload is
  the kept rows: ``fit`` receives a :class:`LayerContext` carrying the captured queries, positions and the
  layer's original keys; ``select(x)`` returns per-head indices of the tokens kept, shape
  ``(heads, n_keep)``, stored as ``arrays["kept"]``; ``decode`` returns the full token length with evicted
  rows zeroed and :meth:`Codec.token_mask` tells the metrics which rows exist (evicted keys are masked out
  of attention, not treated as zero vectors).
* Per-layer state (a low-rank basis, a learned codebook) is fitted in ``fit`` and exposed through
  ``shared_state``; cross-layer sharing can key its state on ``context.layer``. What a codec resolved while
  fitting (a rank chosen from an energy target) is reported through :meth:`Codec.report`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np

from kvtool.codecs.moments import QueryMoments
from kvtool.errors import CodecError
from kvtool.rope import RopeParams

ROLES = ("keys", "values")
#: Last query positions of the prompt a query-reading codec gets by default (:meth:`Codec.observed_queries`).
DEFAULT_OBSERVED = 128

#: Every registered codec class, by name. Filled by :func:`register`; ``kvtool.codecs`` re-exports it.
REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add a codec class to :data:`REGISTRY` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if name in REGISTRY and REGISTRY[name] is not cls:
        other = REGISTRY[name].__name__
        raise TypeError(f"codec name {name!r} is registered twice ({other}, {cls.__name__})")
    REGISTRY[name] = cls
    return cls


#: Spec forms other than ``name:key=value`` — ``heads[a|b|...]`` — by their opening text: each maps to
#: ``build(spec, parse)``, which builds the codec and parses the specs it holds with ``parse``. Filled by the
#: module that defines the form (:mod:`kvtool.codecs.compose.heads`), read by the parser
#: (:mod:`kvtool.codecs.spec`), so the parser needs no import of the wrappers that need it.
SPEC_FORMS: dict[str, Callable[[str, Callable[[str], Codec]], Codec]] = {}


@dataclass
class Encoded:
    """What a codec stores for one tensor.

    ``arrays`` are stored verbatim (already packed: uint8 codes, fp16 scales, ...); ``shape`` is the
    ``(heads, tokens, head_dim)`` of the input; ``meta`` holds small scalars stored as HDF5 attributes
    (a seed, a resolved parameter). Array names are plain identifiers (``[A-Za-z0-9_.]``); composed codecs
    prefix their inner codec's names with ``"inner."``.
    """

    arrays: dict[str, np.ndarray]
    shape: tuple[int, int, int]
    meta: dict[str, int | float | str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """The true stored size: the sum of the bytes of every stored array."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def elements(self) -> int:
        """Number of elements of the original tensor, ``heads * tokens * head_dim``."""
        return math.prod(self.shape)

    def bits_per_element(self) -> float:
        """``8 * nbytes / elements`` — every stored byte counted."""
        return 8.0 * self.nbytes / max(self.elements, 1)


@dataclass
class LayerContext:
    """What a codec may know about the layer it encodes, beyond the tensor itself.

    Data-oblivious codecs ignore it. Token selectors read ``queries`` (``(q_heads, Tq, head_dim)``, the last
    ``Tq`` positions, post-RoPE) with ``query_positions`` ``(Tq,)`` and ``key_positions`` ``(T,)``; a value
    codec that needs attention weights reads the layer's original ``keys`` ``(kv_heads, T, head_dim)``, and
    a key codec that weighs tokens by their values reads ``values`` (same shape). ``rope_inv_freq``
    ``(head_dim // 2,)`` are the layer's rotary inverse frequencies (rotate-half pairing ``i``, ``i + d/2``)
    when known, for codecs that move queries to other positions. ``keys_prerope`` ``(kv_heads, T, head_dim)``
    and ``rope`` (a :class:`kvtool.rope.RopeParams`: inverse frequencies and attention factor) are set where
    the cache recorded them (``lowrank:prerope=true`` codes keys before RoPE). ``query_moments``: the moments of
    all the prompt's queries (:class:`kvtool.codecs.moments.QueryMoments`) where ``kvtool eval`` streamed them for a
    codec that asks (:meth:`Codec.query_moments`). ``reconstruction`` ``(kv_heads, P)``: per prompt position, the
    most attention the layer's kv head received in ``kvtool eval``'s reconstruction pass (:mod:`kvtool.reconstruct`),
    where a codec asks for it (:meth:`Codec.reads_reconstruction`); index it by ``key_positions``.
    """

    layer: int = 0
    role: str = "keys"
    queries: np.ndarray | None = None
    query_positions: np.ndarray | None = None
    key_positions: np.ndarray | None = None
    keys: np.ndarray | None = None
    scaling: float | None = None
    sliding_window: int | None = None
    values: np.ndarray | None = None
    rope_inv_freq: np.ndarray | None = None
    keys_prerope: np.ndarray | None = None
    rope: RopeParams | None = None
    query_moments: QueryMoments | None = None
    reconstruction: np.ndarray | None = None


def check_input(x: np.ndarray) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 ``(heads, tokens, head_dim)`` array, or raise CodecError."""
    x = np.asarray(x)
    if x.ndim != 3:
        raise CodecError(f"a codec encodes (heads, tokens, head_dim) arrays, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


class Codec(ABC):
    """Base of every codec. Subclasses are ``@dataclass``es whose init fields are the spec parameters."""

    name: ClassVar[str]
    #: Whether ``kvtool.CodecCache(mode="streaming")`` (``kvtool eval --mode streaming``) can use the codec:
    #: it then codes a growing cache block by block, as tokens arrive (see :meth:`streaming_form`).
    #: Quantizers can; token selectors that need the whole prompt at once (:class:`Selector`) cannot.
    streaming: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.validate()

    # -- parameters ---------------------------------------------------------------------------------
    def validate(self, head_dim: int | None = None) -> None:
        """Raise CodecError (naming the allowed values) if the parameters are invalid.

        Called with ``head_dim=None`` on construction (parameter ranges only) and by :meth:`fit` with the
        real head_dim (e.g. a group size that must divide it). The default accepts everything: it is for
        codecs without parameters.
        """
        return None

    def params(self) -> dict[str, object]:
        """The spec parameters, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}  # type: ignore[arg-type]

    def spec(self) -> str:
        """Canonical ``name:key=value,...`` (every parameter given; ``None`` = not given, left out);
        ``parse_spec(c.spec())`` equals ``c``."""
        items = ",".join(f"{k}={format_value(v)}" for k, v in self.params().items() if v is not None)
        return f"{self.name}:{items}" if items else self.name

    def for_role(self, role: str) -> Codec:
        """A copy configured for ``role`` (``"keys"`` or ``"values"``). KIVI picks its axis here."""
        if role not in ROLES:
            raise CodecError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return replace(self)  # type: ignore[type-var]

    # -- fitting and coding -------------------------------------------------------------------------
    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> Codec:
        """Fit to ``x`` ``(heads, tokens, head_dim)`` float32 and return ``self``.

        The default validates against ``x``'s head_dim; data-dependent codecs override it (and call
        ``super().fit``). ``context`` is optional: codecs must work without it unless they say otherwise.
        """
        x = check_input(x)
        self.validate(x.shape[-1])
        return self

    @abstractmethod
    def encode(self, x: np.ndarray) -> Encoded:
        """Encode ``x`` ``(heads, tokens, head_dim)`` float32 into the arrays to store."""

    @abstractmethod
    def decode(self, enc: Encoded) -> np.ndarray:
        """Rebuild a float32 ``enc.shape`` ``(heads, tokens, head_dim)`` array from ``enc`` alone."""

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        """Boolean ``(heads, tokens)``: which token rows ``decode`` really restores; ``None`` = all."""
        return None

    def report(self, enc: Encoded) -> dict[str, object]:
        """What the codec resolved for this tensor, for the compress report (e.g. ``{"rank": 24}``); JSON
        values only. Scalars also show in the compress table."""
        return {}

    def uses_queries(self) -> bool:
        """True when :meth:`fit` reads ``context.queries`` (a query-aware selector or basis).

        ``kvtool compress`` then hands it only the observed queries (``--observe``) and scores the
        attention metrics on the held-out ones, so no codec is scored on the queries it was fitted to.
        """
        return False

    def observed_queries(self) -> int | None:
        """How many of the prompt's last query positions :meth:`fit` wants in its context where a cache
        records them (``kvtool eval``): 0 for a codec that reads no queries, ``None`` for all of them
        (without the streamed moments of :meth:`query_moments`, Expected Attention estimates its statistics
        from the queries it is given)."""
        return DEFAULT_OBSERVED if self.uses_queries() else 0

    def query_moments(self) -> int | None:
        """Where a cache can stream them (``kvtool eval``): ``s`` when :meth:`fit` reads the moments of all
        the prompt's queries from position ``s`` on (``context.query_moments``, the first ``s`` positions kept
        as they are), instead of the queries themselves; None when it reads none (the default)."""
        return None

    def reads_reconstruction(self) -> bool:
        """True when :meth:`fit` reads ``context.reconstruction``: the scores of a pass in which the model
        repeats its prompt (``kvzip``). Only ``kvtool eval`` runs the model, so only it can give them."""
        return False

    # -- streaming ----------------------------------------------------------------------------------
    def streaming_form(self) -> tuple[int, Codec]:
        """``(block, codec)`` for a cache that grows token by token (``CodecCache(mode="streaming")``).

        New tokens wait in a 16-bit window until ``block`` of them are there; each complete block is then
        fitted, encoded and decoded on its own with ``codec`` (``fit`` gets the block's absolute
        ``key_positions`` in its :class:`LayerContext`, and the queries of earlier forward passes). The
        default, ``(1, self)``, codes every token as it arrives: right for codecs that code each token
        vector on its own. A codec whose statistics span tokens (per-channel groups, a mean) returns its
        group or window size; one with its own full-precision window (KIVI) returns a copy without it,
        since the cache's window plays that part. Raise :class:`CodecError` (see
        :func:`streaming_error`) if the codec cannot stream.
        """
        if not type(self).streaming:
            raise streaming_error(self)
        return 1, self

    # -- fixed overhead -----------------------------------------------------------------------------
    def shared_state(self) -> dict[str, np.ndarray]:
        """Fitted arrays stored once per layer and tensor (codebook, basis); reported beside the bits."""
        return {}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        """Restore what :meth:`shared_state` returned (for decoding a file); returns ``self``."""
        if state:
            raise CodecError(f"codec {self.name!r} has no shared state, got arrays {sorted(state)}")
        return self


def latest_sink(sinks: Iterable[int | None]) -> int | None:
    """The largest of :meth:`Codec.query_moments` positions, ignoring ``None`` (None if all are)."""
    given = [s for s in sinks if s is not None]
    return max(given) if given else None


def most_queries(counts: Iterable[int | None]) -> int | None:
    """The largest of :meth:`Codec.observed_queries` counts, ``None`` (all queries) above any number."""
    counts = list(counts)
    return None if any(c is None for c in counts) else max(counts, default=0)


def format_value(value: object) -> str:
    """Spec text for one parameter value: ``3`` for 3.0, shortest round-tripping text otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` outside square brackets: a parameter value in ``[...]`` may hold whole specs
    (``age:bands=[0-128:fp16;128-:turboquant:bits=4,center=true]``) with their own ``,`` and ``+``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise CodecError(f"unbalanced ']' in codec spec {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise CodecError(f"unbalanced '[' in codec spec {text!r}")
    return [*parts, text[start:]]


def choice_error(param: str, allowed: str, got: object) -> CodecError:
    """The one phrasing of a bad parameter: ``bits must be one of 1..8, got 9``."""
    return CodecError(f"{param} must be one of {allowed}, got {format_value(got)}")


def check_int_range(param: str, value: int, lo: int, hi: int) -> None:
    """Raise ``<param> must be one of lo..hi, got v`` unless ``lo <= value <= hi``."""
    if not lo <= value <= hi:
        raise choice_error(param, f"{lo}..{hi}", value)


def streaming_error(codec: Codec) -> CodecError:
    """The one message for a codec that cannot stream, naming the registered selectors that can."""
    able = sorted(n for n, cls in REGISTRY.items() if issubclass(cls, Selector) and cls.streaming)
    why = "it selects tokens from the whole prompt at once" if isinstance(codec, Selector) else \
        "it needs the whole prompt at once"
    return CodecError(f"--mode streaming cannot use {codec.name!r}: {why}; token selectors that can stream: "
                      f"{', '.join(able) or 'none registered'} (or use --mode prefill)")


class Stage(Codec):
    """Intermediate base of codecs that can run before another codec in a composition ``a+b``.

    A stage splits ``x`` ``(heads, tokens, head_dim)`` into arrays it stores itself (kept indices, fp16
    sink rows...) and a *payload* ``(heads', tokens', dim')`` that the next stage codes: the kept rows of
    a token selector, the coefficients of a low-rank projection. On its own (no next stage) the payload is
    stored in fp16 as ``arrays[payload_name]``. Subclasses implement :meth:`split`, :meth:`merge` and
    :meth:`payload_shape`; :class:`Selector` is the stage whose payload is a subset of token rows.
    """

    #: The array the payload is stored under when the stage stands alone.
    payload_name: ClassVar[str] = "payload"

    @abstractmethod
    def split(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int | float | str]]:
        """``x`` ``(heads, tokens, head_dim)`` float32 → (own stored arrays, payload float32, own meta)."""

    @abstractmethod
    def merge(self, own: Encoded, payload: np.ndarray) -> np.ndarray:
        """Rebuild ``own.shape`` from the stage's stored arrays and meta (``own.arrays``, ``own.meta``) and
        the decoded payload ``(heads', tokens', dim')``."""

    @abstractmethod
    def payload_shape(self, own: Encoded) -> tuple[int, int, int]:
        """The payload's shape, from the stage's own stored arrays/meta and its parameters and state."""

    def payload_dim(self, head_dim: int | None) -> int | None:
        """The payload's last dimension for input ``head_dim`` (``None`` = known only after ``fit``);
        a composition validates the next stage against it."""
        return head_dim

    def payload_mask(self, own: Encoded, inner: np.ndarray | None) -> np.ndarray | None:
        """Boolean ``(heads, tokens)`` of rows restored, given the next stage's mask over the payload."""
        return None if inner is None else inner

    def payload_context(self, context: LayerContext | None) -> LayerContext | None:
        """The context the next stage is fitted with (default: this stage's own)."""
        return context

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        own, payload, meta = self.split(x)
        return Encoded({**own, self.payload_name: payload.astype(np.float16)}, x.shape, dict(meta))

    def decode(self, enc: Encoded) -> np.ndarray:
        own = Encoded({k: v for k, v in enc.arrays.items() if k != self.payload_name}, enc.shape, enc.meta)
        return self.merge(own, enc.arrays[self.payload_name].astype(np.float32))

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        own = Encoded({k: v for k, v in enc.arrays.items() if k != self.payload_name}, enc.shape, enc.meta)
        return self.payload_mask(own, None)


class Selector(Stage):
    """Base of token-selection codecs (eviction): a :class:`Stage` whose payload is the kept rows.

    Subclasses implement :meth:`select` (the same number of tokens in every head) or override
    :meth:`keep_mask` (head-adaptive budgets: heads may keep different numbers of tokens). The base stores
    the kept indices (``arrays["kept"]``, smallest unsigned dtype that fits, counted in the bytes; see
    :func:`pack_selection`) and the kept rows in fp16 (``arrays["rows"]``). In a composition
    ``selector+quantizer`` the rows go to the quantizer instead. ``decode`` returns every token position
    with evicted rows zeroed; :meth:`token_mask` says which rows were kept.

    In ``kvtool eval`` and :class:`kvtool.CodecCache` evicted rows are never attended to: the cache turns
    :meth:`token_mask` into a per-head key mask that kvtool's attention function applies (zeroed keys
    would still draw ``exp(0)`` of the softmax). :meth:`fit` receives the prompt's last queries
    (``LayerContext.queries``, post-RoPE, with ``query_positions``, ``key_positions`` and ``scaling``).

    Streaming: selectors default to ``streaming = False`` (they choose from the whole prompt). A selector
    that can decide block by block — from the block's absolute ``context.key_positions`` and the queries of
    earlier steps, e.g. keeping attention sinks and letting the cache's recent window hold the rest — sets
    ``streaming = True`` and, if its blocks are larger than one token, overrides :meth:`streaming_form`.
    """

    streaming: ClassVar[bool] = False

    payload_name: ClassVar[str] = "rows"

    @abstractmethod
    def select(self, x: np.ndarray) -> np.ndarray:
        """Indices of the kept tokens per head, ``(heads, n_keep)`` int, ascending within each head."""

    def keep_mask(self, x: np.ndarray) -> np.ndarray:
        """Boolean ``(heads, tokens)``: the tokens to keep. Heads may keep different numbers of tokens."""
        return kept_mask(self.select(x), x.shape)

    def split(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, int | float | str]]:
        mask = self.keep_mask(x)
        own = pack_selection(mask)
        rows = x[mask]  # (kept rows of every head, head_dim), head-major, ascending within a head
        return own, rows.reshape(self.payload_shape(Encoded(own, x.shape))), {}

    def merge(self, own: Encoded, payload: np.ndarray) -> np.ndarray:
        out = np.zeros(own.shape, dtype=np.float32)
        out[selection_mask(own.arrays, own.shape)] = payload.reshape(-1, own.shape[2])
        return out

    def payload_shape(self, own: Encoded) -> tuple[int, int, int]:
        """``(heads, n_keep, head_dim)``; a head-adaptive selection (heads keeping different numbers of
        tokens) hands on its rows as one sequence ``(1, Σ n_h, head_dim)``, head after head."""
        kept = own.arrays["kept"]
        if "kept_counts" in own.arrays:
            return 1, kept.shape[0], own.shape[2]
        return own.shape[0], kept.shape[1], own.shape[2]

    def payload_mask(self, own: Encoded, inner: np.ndarray | None) -> np.ndarray | None:
        mask = selection_mask(own.arrays, own.shape)
        if inner is not None:
            mask[mask] = np.asarray(inner, dtype=bool).reshape(-1)
        return mask


def pack_indices(kept: np.ndarray, tokens: int) -> np.ndarray:
    """Kept token indices in the smallest unsigned dtype that holds ``tokens - 1``."""
    dtype = np.uint8 if tokens <= 1 << 8 else np.uint16 if tokens <= 1 << 16 else np.uint32
    return np.ascontiguousarray(kept, dtype=dtype)


def scatter_rows(rows: np.ndarray, kept: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Put ``rows`` ``(heads, n_keep, d)`` at token indices ``kept`` ``(heads, n_keep)``; zeros elsewhere."""
    out = np.zeros(shape, dtype=np.float32)
    np.put_along_axis(out, kept.astype(np.int64)[:, :, None], rows, axis=1)
    return out


def kept_mask(kept: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean ``(heads, tokens)`` with True at the kept indices."""
    mask = np.zeros(shape[:2], dtype=bool)
    np.put_along_axis(mask, kept.astype(np.int64), True, axis=1)
    return mask


def pack_selection(mask: np.ndarray) -> dict[str, np.ndarray]:
    """The stored form of a ``(heads, tokens)`` keep mask, in the smallest unsigned dtypes that fit.

    When every head keeps ``n`` tokens: ``kept`` ``(heads, n)``, ascending per head. Otherwise
    (head-adaptive budgets) ``kept`` is the flat ``(Σ n_h,)`` concatenation of each head's ascending
    indices and ``kept_counts`` ``(heads,)`` holds each ``n_h``.
    """
    heads, tokens = mask.shape
    counts = mask.sum(axis=1)
    flat = np.nonzero(mask)[1]  # head-major, ascending within a head
    if heads == 0 or (counts == counts[0]).all():
        return {"kept": pack_indices(flat.reshape(heads, -1), tokens)}
    return {"kept": pack_indices(flat, tokens), "kept_counts": pack_indices(counts, tokens + 1)}


def selection_mask(arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Invert :func:`pack_selection`: the boolean ``(heads, tokens)`` mask of ``arrays["kept"]``."""
    kept = arrays["kept"].astype(np.int64)
    if "kept_counts" not in arrays:
        return kept_mask(kept, shape)
    counts = arrays["kept_counts"].astype(np.int64)
    mask = np.zeros(shape[:2], dtype=bool)
    mask[np.repeat(np.arange(shape[0]), counts), kept] = True
    return mask


INNER = "inner."


def _strip(mapping: dict, prefix: str = INNER) -> dict:
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def _own(mapping: dict, prefix: str = INNER) -> dict:
    return {k: v for k, v in mapping.items() if not k.startswith(prefix)}


@dataclass
class Composed(Codec):
    """``head+tail``: a :class:`Stage`, then any codec on its payload.

    ``snapkv:keep=0.5+kivi:bits=4`` codes the kept rows with KIVI; ``lowrank:rank=24+turboquant:bits=4``
    codes the rank-24 coefficients with TurboQuant (whose head_dim is then 24, and is validated as such);
    stages chain (``snapkv:keep=0.5+lowrank:rank=32+turboquant:bits=4`` nests as ``snapkv+(lowrank+tq)``).
    Built by the spec parser from ``+``; not registered. Stored arrays, meta and shared state: the head's
    under their own names, the tail's prefixed ``inner.`` (``inner.inner.`` two stages down). Every byte
    of both is counted. A codec that is not a stage (a quantizer) can only come last: a second quantizer
    would only see the first one's codes.
    """

    head: Codec
    tail: Codec
    name: ClassVar[str] = "+"

    def validate(self, head_dim: int | None = None) -> None:
        if not isinstance(self.head, Stage):
            raise CodecError(
                f"in '{self.head.name}+{self.tail.name}' every stage but the last must select tokens or "
                f"transform them (a Stage); '{self.head.name}' is a quantizer (two quantizers cannot be chained)"
            )
        self.head.validate(head_dim)
        inner_dim = self.head.payload_dim(head_dim)
        try:
            self.tail.validate(inner_dim)
        except CodecError as exc:
            if inner_dim is None or inner_dim == head_dim:
                raise
            raise CodecError(f"'{self.tail.name}' after '{self.head.name}' codes vectors of {inner_dim} "
                             f"values, not head_dim: {exc}") from None

    def spec(self) -> str:
        return f"{self.head.spec()}+{self.tail.spec()}"

    def for_role(self, role: str) -> Codec:
        return Composed(self.head.for_role(role), self.tail.for_role(role))

    def uses_queries(self) -> bool:
        return self.head.uses_queries() or self.tail.uses_queries()

    def observed_queries(self) -> int | None:
        return most_queries([self.head.observed_queries(), self.tail.observed_queries()])

    def query_moments(self) -> int | None:
        return latest_sink([self.head.query_moments(), self.tail.query_moments()])

    def reads_reconstruction(self) -> bool:
        return self.head.reads_reconstruction() or self.tail.reads_reconstruction()

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> Codec:
        x = check_input(x)
        self.validate(x.shape[-1])
        head: Stage = self.head  # type: ignore[assignment]
        head.fit(x, context)
        payload = head.split(x)[1]
        try:
            self.tail.fit(payload, head.payload_context(context))
        except CodecError as exc:
            if payload.shape[-1] == x.shape[-1]:
                raise
            raise CodecError(f"'{self.tail.name}' after '{self.head.name}' codes vectors of "
                             f"{payload.shape[-1]} values, not head_dim: {exc}") from None
        return self

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        own, payload, meta = self.head.split(x)  # type: ignore[attr-defined]
        inner = self.tail.encode(payload)
        arrays = dict(own)
        arrays.update({INNER + k: v for k, v in inner.arrays.items()})
        meta = {**meta, **{INNER + k: v for k, v in inner.meta.items()}}
        return Encoded(arrays, x.shape, meta)

    def _parts(self, enc: Encoded) -> tuple[Encoded, Encoded]:
        """(the head's own stored part, the tail's Encoded) of a composed ``enc``."""
        own = Encoded(_own(enc.arrays), enc.shape, _own(enc.meta))
        shape = self.head.payload_shape(own)  # type: ignore[attr-defined]
        return own, Encoded(_strip(enc.arrays), shape, _strip(enc.meta))

    def decode(self, enc: Encoded) -> np.ndarray:
        own, inner = self._parts(enc)
        return self.head.merge(own, self.tail.decode(inner))  # type: ignore[attr-defined]

    def streaming_form(self) -> tuple[int, Codec]:
        head_block, head = self.head.streaming_form()
        tail_block, tail = self.tail.streaming_form()
        return max(head_block, tail_block), Composed(head, tail)

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        own, inner = self._parts(enc)
        return self.head.payload_mask(own, self.tail.token_mask(inner))  # type: ignore[attr-defined]

    def report(self, enc: Encoded) -> dict[str, object]:
        own, inner = self._parts(enc)
        return {**self.head.report(own), **{INNER + k: v for k, v in self.tail.report(inner).items()}}

    def shared_state(self) -> dict[str, np.ndarray]:
        return {**self.head.shared_state(), **{INNER + k: v for k, v in self.tail.shared_state().items()}}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        self.head.load_shared_state(_own(state))
        self.tail.load_shared_state(_strip(state))
        return self
