"""``salient``: mixed precision by importance — the tokens a selector would keep are coded by one codec,
the ones it would evict by a cheaper one instead of being dropped.

Eviction throws away every token outside its budget, and at a tight budget that loss dominates the error:
on the bundled model, ``expected:keep=0.5`` alone costs as much KLD as the 3-bit TurboQuant form alone
(docs/FIDELITY.md). MiKV ("No Token Left Behind", arXiv 2402.18096, §3) and ZipCache (arXiv 2405.14256,
§4) keep the "evicted" tokens at a low precision instead, and the salient ones at a high one: an unimportant
token still draws roughly its share of the softmax, where an evicted one draws none.

Syntax (docs/FIDELITY.md): ``salient:select=[expected:keep=0.4],hi=[turboquant:bits=3],lo=[turboquant:bits=1]``.
``select`` is any token selector (its ``keep`` / ``tokens`` is the share coded by ``hi``; ``sink`` and
``recent`` go to ``hi`` too); ``hi`` codes the selected rows, ``lo`` the rest. Both see a head's rows in
position order, without the layer's context (the rows of different heads sit at different positions); a
codec that needs the context (pre-RoPE keys) cannot be a part. When every head keeps the same number ``n``
of rows, a part codes them as one ``(heads, n, head_dim)`` tensor. When heads keep different numbers
(``per_head=true``, AdaKV's budgets) the layout is *per head*: each head's rows of a part are coded as their
own ``(1, n_h, head_dim)`` tensor by their own copy of the part, fitted on those rows only, so each head
keeps its own statistics (TurboQuant's ``mean``, ``sink_rows``, outlier channels) as in the equal-count
layout; ``meta["layout"] = "per_head"`` marks it. Stored: the selection as a bit mask ``mask``
``(heads, ⌈tokens / 8⌉)`` uint8 — one bit per token and head, cheaper than indices as soon as more than
one token in 16 is kept — and each part's arrays under ``hi.`` / ``lo.`` (per head: ``hi.0.``, ``hi.1.``,
...; nothing for a head with no rows in the part). Shared state follows the same prefixes.

Encodings written before the per-head layout (a ragged mask without ``layout``) gathered a part's rows of
all heads into one sequence ``(1, Σ n_h, head_dim)``; they still decode that way.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from kvtool.codecs.base import (
    Codec,
    Encoded,
    LayerContext,
    Selector,
    check_input,
    latest_sink,
    most_queries,
    register,
)
from kvtool.codecs.spec import parse_spec
from kvtool.errors import CodecError

MASK = "mask"
PARTS = ("hi", "lo")
#: meta key and value of the per-head layout (a ragged mask coded head by head)
LAYOUT, PER_HEAD = "layout", "per_head"
#: a per-head shared-state key: part, head, the part's own key
_HEAD_KEY = re.compile(rf"^({'|'.join(PARTS)})\.(\d+)\.(.+)$")
EXAMPLE = "salient:select=[expected:keep=0.4],hi=[turboquant:bits=3],lo=[turboquant:bits=1]"


def _unwrap(text: str) -> str:
    body = text.strip()
    return body[1:-1] if body.startswith("[") and body.endswith("]") else body


def _prefix(part: str, head: int | None = None) -> str:
    return f"{part}." if head is None else f"{part}.{head}."


def _ragged(mask: np.ndarray) -> bool:
    """Whether the heads of ``mask`` ``(heads, tokens)`` keep different numbers of rows."""
    counts = mask.sum(axis=1)
    return bool(mask.shape[0]) and not (counts == counts[0]).all()


def _rows_shape(mask: np.ndarray, head_dim: int) -> tuple[int, int, int]:
    """Shape of the rows ``mask`` ``(heads, tokens)`` picks: ``(heads, n, d)`` if every head picks ``n``,
    else one sequence ``(1, Σ n_h, d)`` (the layout before the per-head one)."""
    if not _ragged(mask):
        return mask.shape[0], int(mask[0].sum()) if mask.shape[0] else 0, head_dim
    return 1, int(mask.sum()), head_dim


def _pieces(mask: np.ndarray, per_head: bool) -> list[tuple[str, int | None, np.ndarray]]:
    """``(part, head, rows)``: what each coded tensor holds, ``rows`` a ``(heads, tokens)`` bool selection.
    ``head`` is None for a part coded as one tensor, else the one head whose rows it holds."""
    out: list[tuple[str, int | None, np.ndarray]] = []
    for part, sel in (("hi", mask), ("lo", ~mask)):
        if not per_head:
            out.append((part, None, sel))
            continue
        for h in range(mask.shape[0]):
            one = np.zeros_like(sel)
            one[h] = sel[h]
            out.append((part, h, one))
    return out


def _shape(rows: np.ndarray, head: int | None, head_dim: int) -> tuple[int, int, int]:
    """The shape the selection ``rows`` ``(heads, tokens)`` is coded at (see :func:`_pieces`)."""
    return _rows_shape(rows, head_dim) if head is None else (1, int(rows[head].sum()), head_dim)


@register
@dataclass
class Salient(Codec):
    """``salient:select=[SELECTOR],hi=[SPEC],lo=[SPEC]`` — selected tokens coded by ``hi``, the rest by ``lo``.

    Stored arrays: ``mask`` (the selection, one bit per token and head) and each part's arrays prefixed
    ``hi.`` / ``lo.`` — ``hi.<h>.`` / ``lo.<h>.`` per head when heads keep different numbers of rows (see the
    module docstring); shared state likewise. Every row is restored (``lo`` may itself evict: its mask then
    marks the rows it dropped).
    """

    name = "salient"
    #: the selection needs the whole prompt at once
    streaming: ClassVar[bool] = False
    select: str = "[expected:keep=0.5]"
    hi: str = "[turboquant:bits=3]"
    lo: str = "[turboquant:bits=1]"

    def __post_init__(self) -> None:
        self._selector = self._parse("select", self.select)
        if not isinstance(self._selector, Selector):
            raise CodecError(f"salient: select must be a token selector (expected, snapkv, h2o, ...), got "
                             f"{self._selector.spec()!r}; e.g. {EXAMPLE}")
        self._parts = {"hi": self._parse("hi", self.hi), "lo": self._parse("lo", self.lo)}
        self._canonical()
        self._mask: np.ndarray | None = None
        # per-head layout: each head's own copy of a part, fitted or loaded; and per-head shared state
        # loaded before fit (kept by the copies fit makes, as the base part keeps its own)
        self._heads: dict[str, dict[int, Codec]] = {p: {} for p in PARTS}
        self._loaded: dict[str, dict[int, dict[str, np.ndarray]]] = {p: {} for p in PARTS}
        super().__post_init__()

    @staticmethod
    def _parse(what: str, text: str) -> Codec:
        try:
            return parse_spec(_unwrap(text))
        except CodecError as exc:
            raise CodecError(f"salient {what}: {exc}") from None

    def _canonical(self) -> None:
        self.select = f"[{self._selector.spec()}]"
        self.hi, self.lo = (f"[{self._parts[p].spec()}]" for p in PARTS)

    def validate(self, head_dim: int | None = None) -> None:
        self._selector.validate(head_dim)
        for part in PARTS:
            try:
                self._parts[part].validate(head_dim)
            except CodecError as exc:
                raise CodecError(f"salient {part}: {exc}") from None

    def for_role(self, role: str) -> Codec:
        copy = replace(self)
        copy._selector = self._selector.for_role(role)
        copy._parts = {p: c.for_role(role) for p, c in self._parts.items()}
        copy._canonical()
        return copy

    def inner_codecs(self) -> list[Codec]:
        """The selector and both parts (kvtool.cache.can_evict looks inside wrappers through this)."""
        return [self._selector, *self._parts.values()]

    def uses_queries(self) -> bool:
        return self._selector.uses_queries() or any(c.uses_queries() for c in self._parts.values())

    def observed_queries(self) -> int | None:
        return most_queries([self._selector.observed_queries(), *(c.observed_queries() for c in self._parts.values())])

    def query_moments(self) -> int | None:
        return latest_sink([self._selector.query_moments(), *(c.query_moments() for c in self._parts.values())])

    def reads_reconstruction(self) -> bool:
        return any(c.reads_reconstruction() for c in self.inner_codecs())

    # -- coding ----------------------------------------------------------------------------------------
    def _codec(self, part: str, head: int | None) -> Codec:
        """The codec of one piece: the part itself, or head ``head``'s copy (the part itself when none was
        fitted or loaded: a part without shared state decodes alike)."""
        return self._parts[part] if head is None else self._heads[part].get(head, self._parts[part])

    def _head_copy(self, part: str, head: int) -> Codec:
        """A fresh copy of ``part`` for head ``head``, with that head's loaded shared state if any."""
        codec = copy.deepcopy(self._parts[part])
        state = self._loaded[part].get(head)
        return codec if state is None else codec.load_shared_state(state)

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> Salient:
        x = check_input(x)
        super().fit(x, context)
        self._selector.fit(x, context)
        self._mask = self._selector.keep_mask(x)  # (heads, T) bool
        part_context = None if context is None else LayerContext(layer=context.layer, role=context.role)
        per_head = _ragged(self._mask)
        self._heads = {p: {} for p in PARTS}
        for part, head, sel in _pieces(self._mask, per_head):
            rows = x[sel].reshape(_shape(sel, head, x.shape[2]))  # (heads, n, d) or (1, n_h, d)
            if not rows.shape[1]:
                continue
            if head is None:
                self._parts[part].fit(rows, part_context)
            else:
                self._heads[part][head] = self._head_copy(part, head)
                self._heads[part][head].fit(rows, part_context)
        return self

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        mask = self._mask if self._mask is not None and self._mask.shape == x.shape[:2] else None
        if mask is None:  # no context: only selectors that need no queries get here without an error
            self.fit(x)
            mask = self._mask
        arrays: dict[str, np.ndarray] = {MASK: np.packbits(mask, axis=1)}  # type: ignore[arg-type]
        per_head = _ragged(mask)  # type: ignore[arg-type]
        meta: dict[str, int | float | str] = {LAYOUT: PER_HEAD} if per_head else {}
        for part, head, sel in _pieces(mask, per_head):  # type: ignore[arg-type]
            rows = x[sel].reshape(_shape(sel, head, x.shape[2]))
            if not rows.shape[1]:
                continue
            enc = self._codec(part, head).encode(rows)
            p = _prefix(part, head)
            arrays.update({p + k: v for k, v in enc.arrays.items()})
            meta.update({p + k: v for k, v in enc.meta.items()})
        return Encoded(arrays, x.shape, meta)

    def _mask_of(self, enc: Encoded) -> np.ndarray:
        return np.unpackbits(enc.arrays[MASK], axis=1, count=enc.shape[1]).astype(bool)

    def _stored(self, enc: Encoded) -> list[tuple[str, int | None, np.ndarray, Encoded]]:
        """``(part, head, rows, encoded)`` of every piece ``enc`` stores (see :func:`_pieces`)."""
        mask = self._mask_of(enc)
        per_head = enc.meta.get(LAYOUT) == PER_HEAD
        out = []
        for part, head, sel in _pieces(mask, per_head):
            shape = _shape(sel, head, enc.shape[2])
            if not shape[1]:
                continue
            p = _prefix(part, head)
            out.append((part, head, sel, Encoded({k[len(p):]: v for k, v in enc.arrays.items() if k.startswith(p)},
                                                 shape, {k[len(p):]: v for k, v in enc.meta.items()
                                                         if k.startswith(p)})))
        return out

    def decode(self, enc: Encoded) -> np.ndarray:
        out = np.zeros(enc.shape, dtype=np.float32)
        for part, head, sel, penc in self._stored(enc):
            out[sel] = self._codec(part, head).decode(penc).reshape(-1, enc.shape[2])
        return out

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        out = np.ones(enc.shape[:2], dtype=bool)
        restored_all = True
        for part, head, sel, penc in self._stored(enc):
            inner = self._codec(part, head).token_mask(penc)
            if inner is not None:
                out[sel] = np.asarray(inner, dtype=bool).reshape(-1)
                restored_all = False
        return None if restored_all else out

    def report(self, enc: Encoded) -> dict[str, object]:
        """Tokens and stored bits per element of each part (all heads' pieces together)."""
        elements = max(1, int(np.prod(enc.shape)))
        out: dict[str, object] = {"mask_bits_per_element": 8 * enc.arrays[MASK].nbytes / elements}
        for part in PARTS:
            pieces = [penc for p, _, _, penc in self._stored(enc) if p == part]
            tokens = sum(penc.shape[0] * penc.shape[1] for penc in pieces)
            out[f"{part}_tokens"] = int(tokens)
            out[f"{part}_bits_per_element"] = (8.0 * sum(penc.nbytes for penc in pieces) / (tokens * enc.shape[2])
                                               if tokens else 0.0)
        return out

    # -- shared state ----------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, np.ndarray]:
        """Each part's state under ``hi.`` / ``lo.``; in the per-head layout (the fitted mask is ragged, or
        per-head state was loaded) each head copy's under ``hi.<h>.`` / ``lo.<h>.`` — with a fitted mask, only
        of the heads that have rows in the part (a state loaded for another head codes nothing here)."""
        mask = self._mask
        per_head = _ragged(mask) if mask is not None else any(self._heads.values())
        if not per_head:
            return {_prefix(p) + k: v for p in PARTS for k, v in self._parts[p].shared_state().items()}

        def coded(part: str, head: int) -> bool:
            if mask is None:
                return True
            return head < len(mask) and bool((mask[head] if part == "hi" else ~mask[head]).any())

        return {_prefix(p, h) + k: v for p in PARTS for h, c in sorted(self._heads[p].items()) if coded(p, h)
                for k, v in c.shared_state().items()}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        base: dict[str, dict[str, np.ndarray]] = {p: {} for p in PARTS}
        heads: dict[str, dict[int, dict[str, np.ndarray]]] = {p: {} for p in PARTS}
        unknown = []
        for key, value in state.items():
            if (m := _HEAD_KEY.match(key)) is not None:
                heads[m[1]].setdefault(int(m[2]), {})[m[3]] = value
            elif (split := key.partition("."))[0] in PARTS and split[1]:
                base[split[0]][split[2]] = value
            else:
                unknown.append(key)
        if unknown:
            raise CodecError(f"codec 'salient' has no shared state {sorted(unknown)}")
        for part in PARTS:
            self._parts[part].load_shared_state(base[part])
        self._loaded = heads
        for part in PARTS:  # into the copies fit made (they keep what fit bound), else into new copies
            for head, part_state in heads[part].items():
                if head in self._heads[part]:
                    self._heads[part][head].load_shared_state(part_state)
                else:
                    self._heads[part][head] = self._head_copy(part, head)
        return self
