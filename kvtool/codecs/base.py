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
  element, not inside them. A rotation is stored as its seed in ``meta``, not as a matrix.
* Invalid parameters raise :class:`kvtool.errors.CodecError` naming the allowed values, from
  :meth:`Codec.validate` (called on construction with ``head_dim=None`` and by ``fit`` with the real
  head_dim).

Hooks for the codec families still to come:

* Token selection (SnapKV, H2O, StreamingLLM) subclasses :class:`Selector`: ``fit`` receives a
  :class:`LayerContext` carrying the captured queries, positions and the layer's original keys; it stores
  ``arrays["kept"]`` — per-head indices of the tokens kept, shape ``(heads, n_keep)`` — and ``decode``
  returns the full token length with evicted rows zeroed. :meth:`Codec.token_mask` tells the metrics which
  rows exist (evicted keys are masked out of attention, not treated as zero vectors).
* Composition ``a+b`` (:class:`Composed`) runs selectors first and gives the kept rows to the last codec.
* Per-layer state (a low-rank basis, a learned codebook) is fitted in ``fit`` and exposed through
  ``shared_state``; cross-layer sharing can key its state on ``context.layer``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np

from kvtool.errors import CodecError

ROLES = ("keys", "values")

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
    codec that needs attention weights reads the layer's original ``keys`` ``(kv_heads, T, head_dim)``.
    """

    layer: int = 0
    role: str = "keys"
    queries: np.ndarray | None = None
    query_positions: np.ndarray | None = None
    key_positions: np.ndarray | None = None
    keys: np.ndarray | None = None
    scaling: float | None = None
    sliding_window: int | None = None


def check_input(x: np.ndarray) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 ``(heads, tokens, head_dim)`` array, or raise CodecError."""
    x = np.asarray(x)
    if x.ndim != 3:
        raise CodecError(f"a codec encodes (heads, tokens, head_dim) arrays, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


class Codec(ABC):
    """Base of every codec. Subclasses are ``@dataclass``es whose init fields are the spec parameters."""

    name: ClassVar[str]

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
        """Canonical ``name:key=value,...`` (every parameter); ``parse_spec(c.spec())`` equals ``c``."""
        items = ",".join(f"{k}={format_value(v)}" for k, v in self.params().items())
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

    # -- fixed overhead -----------------------------------------------------------------------------
    def shared_state(self) -> dict[str, np.ndarray]:
        """Fitted arrays stored once per layer and tensor (codebook, basis); reported beside the bits."""
        return {}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        """Restore what :meth:`shared_state` returned (for decoding a file); returns ``self``."""
        if state:
            raise CodecError(f"codec {self.name!r} has no shared state, got arrays {sorted(state)}")
        return self


def format_value(value: object) -> str:
    """Spec text for one parameter value: ``3`` for 3.0, shortest round-tripping text otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def choice_error(param: str, allowed: str, got: object) -> CodecError:
    """The one phrasing of a bad parameter: ``bits must be one of 1..8, got 9``."""
    return CodecError(f"{param} must be one of {allowed}, got {format_value(got)}")


def check_int_range(param: str, value: int, lo: int, hi: int) -> None:
    """Raise ``<param> must be one of lo..hi, got v`` unless ``lo <= value <= hi``."""
    if not lo <= value <= hi:
        raise choice_error(param, f"{lo}..{hi}", value)


class Selector(Codec):
    """Base of token-selection codecs (eviction). Not registered itself.

    Subclasses implement :meth:`select`; the base stores the kept indices (``arrays["kept"]``, smallest
    unsigned dtype that fits, counted in the bytes) and the kept rows in fp16 (``arrays["rows"]``). In a
    composition ``selector+quantizer`` the rows go to the quantizer instead. ``decode`` returns every token
    position with evicted rows zeroed; :meth:`token_mask` says which rows were kept.
    """

    @abstractmethod
    def select(self, x: np.ndarray) -> np.ndarray:
        """Indices of the kept tokens per head, ``(heads, n_keep)`` int, ascending within each head."""

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        kept = self.select(x)
        rows = np.take_along_axis(x, kept[:, :, None], axis=1)  # (heads, n_keep, head_dim)
        arrays = {"kept": pack_indices(kept, x.shape[1]), "rows": rows.astype(np.float16)}
        return Encoded(arrays, x.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        return scatter_rows(enc.arrays["rows"].astype(np.float32), enc.arrays["kept"], enc.shape)

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        return kept_mask(enc.arrays["kept"], enc.shape)


def pack_indices(kept: np.ndarray, tokens: int) -> np.ndarray:
    """Kept token indices in the smallest unsigned dtype that holds ``tokens - 1``."""
    dtype = np.uint8 if tokens <= 1 << 8 else np.uint16 if tokens <= 1 << 16 else np.uint32
    return np.ascontiguousarray(kept, dtype=dtype)


def scatter_rows(rows: np.ndarray, kept: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Put ``rows`` ``(heads, n_keep, d)`` at token indices ``kept`` ``(heads, n_keep)``; zeros elsewhere."""
    out = np.zeros(shape, dtype=np.float32)
    np.put_along_axis(out, kept.astype(np.int64)[:, :, None], rows, axis=1)
    return out


def kept_mask(kept: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Boolean ``(heads, tokens)`` with True at the kept indices."""
    mask = np.zeros(shape[:2], dtype=bool)
    np.put_along_axis(mask, kept.astype(np.int64), True, axis=1)
    return mask


INNER = "inner."


@dataclass
class Composed(Codec):
    """``head+tail``: a token selector, then any codec on the kept rows (``snapkv:keep=0.5+kivi:bits=4``).

    Built by the spec parser from ``+``; not registered. Stored arrays: the selector's ``kept`` plus the
    tail's arrays prefixed ``inner.``. Chaining two quantizers is rejected: the second would only see the
    first one's codes.
    """

    head: Codec
    tail: Codec
    name: ClassVar[str] = "+"

    def validate(self, head_dim: int | None = None) -> None:
        if not isinstance(self.head, Selector):
            raise CodecError(
                f"in '{self.head.name}+{self.tail.name}' every stage but the last must select tokens; "
                f"'{self.head.name}' is a quantizer (two quantizers cannot be chained)"
            )
        self.head.validate(head_dim)
        self.tail.validate(head_dim)

    def spec(self) -> str:
        return f"{self.head.spec()}+{self.tail.spec()}"

    def for_role(self, role: str) -> Codec:
        return Composed(self.head.for_role(role), self.tail.for_role(role))

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> Codec:
        x = check_input(x)
        self.head.fit(x, context)
        self.tail.fit(self._kept_rows(x)[1], context)
        return self

    def _kept_rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kept = self.head.select(x)  # type: ignore[attr-defined]
        return kept, np.take_along_axis(x, kept[:, :, None], axis=1)

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        kept, rows = self._kept_rows(x)
        inner = self.tail.encode(rows)
        arrays = {"kept": pack_indices(kept, x.shape[1])}
        arrays.update({INNER + k: v for k, v in inner.arrays.items()})
        meta = {INNER + k: v for k, v in inner.meta.items()}
        return Encoded(arrays, x.shape, meta)

    def _inner(self, enc: Encoded) -> Encoded:
        kept = enc.arrays["kept"]
        strip = len(INNER)
        arrays = {k[strip:]: v for k, v in enc.arrays.items() if k.startswith(INNER)}
        meta = {k[strip:]: v for k, v in enc.meta.items() if k.startswith(INNER)}
        return Encoded(arrays, (enc.shape[0], kept.shape[1], enc.shape[2]), meta)

    def decode(self, enc: Encoded) -> np.ndarray:
        rows = self.tail.decode(self._inner(enc))
        return scatter_rows(rows, enc.arrays["kept"], enc.shape)

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        kept = enc.arrays["kept"].astype(np.int64)  # (heads, n_keep)
        inner = self.tail.token_mask(self._inner(enc))  # (heads, n_keep) or None
        mask = np.zeros(enc.shape[:2], dtype=bool)
        np.put_along_axis(mask, kept, True if inner is None else inner, axis=1)
        return mask

    def shared_state(self) -> dict[str, np.ndarray]:
        return {INNER + k: v for k, v in self.tail.shared_state().items()}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        self.tail.load_shared_state({k[len(INNER):]: v for k, v in state.items() if k.startswith(INNER)})
        return self
