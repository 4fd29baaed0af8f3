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
position order, gathered into ``(heads, n, head_dim)`` (``(1, Σ n_h, head_dim)`` when heads keep different
numbers, ``per_head=true``), without the layer's context (the rows of different heads sit at different
positions); a codec that needs the context (pre-RoPE keys) cannot be a part. Stored: the selection as a
bit mask ``mask`` ``(heads, ⌈tokens / 8⌉)`` uint8 — one bit per token and head, cheaper than indices as soon
as more than one token in 16 is kept — and each part's arrays under ``hi.`` / ``lo.``.
"""

from __future__ import annotations

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
EXAMPLE = "salient:select=[expected:keep=0.4],hi=[turboquant:bits=3],lo=[turboquant:bits=1]"


def _unwrap(text: str) -> str:
    body = text.strip()
    return body[1:-1] if body.startswith("[") and body.endswith("]") else body


def _prefix(part: str) -> str:
    return f"{part}."


def _rows_shape(mask: np.ndarray, head_dim: int) -> tuple[int, int, int]:
    """Shape of the rows ``mask`` ``(heads, tokens)`` picks: ``(heads, n, d)`` if every head picks ``n``,
    else one sequence ``(1, Σ n_h, d)``."""
    counts = mask.sum(axis=1)
    if mask.shape[0] == 0 or (counts == counts[0]).all():
        return mask.shape[0], int(counts[0]) if mask.shape[0] else 0, head_dim
    return 1, int(counts.sum()), head_dim


@register
@dataclass
class Salient(Codec):
    """``salient:select=[SELECTOR],hi=[SPEC],lo=[SPEC]`` — selected tokens coded by ``hi``, the rest by ``lo``.

    Stored arrays: ``mask`` (the selection, one bit per token and head) and each part's arrays prefixed
    ``hi.`` / ``lo.``; shared state likewise. Every row is restored (``lo`` may itself evict: its mask then
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
    def _split(self, x: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of each part, ``(heads, n, d)`` or ``(1, Σ n_h, d)``, head-major in position order."""
        return {"hi": x[mask].reshape(_rows_shape(mask, x.shape[2])),
                "lo": x[~mask].reshape(_rows_shape(~mask, x.shape[2]))}

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> Salient:
        x = check_input(x)
        super().fit(x, context)
        self._selector.fit(x, context)
        self._mask = self._selector.keep_mask(x)  # (heads, T) bool
        part_context = None if context is None else LayerContext(layer=context.layer, role=context.role)
        for part, rows in self._split(x, self._mask).items():
            if rows.shape[1]:
                self._parts[part].fit(rows, part_context)
        return self

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        mask = self._mask if self._mask is not None and self._mask.shape == x.shape[:2] else None
        if mask is None:  # no context: only selectors that need no queries get here without an error
            self.fit(x)
            mask = self._mask
        arrays: dict[str, np.ndarray] = {MASK: np.packbits(mask, axis=1)}  # type: ignore[arg-type]
        meta: dict[str, int | float | str] = {}
        for part, rows in self._split(x, mask).items():  # type: ignore[arg-type]
            if not rows.shape[1]:
                continue
            enc = self._parts[part].encode(rows)
            arrays.update({_prefix(part) + k: v for k, v in enc.arrays.items()})
            meta.update({_prefix(part) + k: v for k, v in enc.meta.items()})
        return Encoded(arrays, x.shape, meta)

    def _mask_of(self, enc: Encoded) -> np.ndarray:
        return np.unpackbits(enc.arrays[MASK], axis=1, count=enc.shape[1]).astype(bool)

    def _part_encoded(self, enc: Encoded, part: str, mask: np.ndarray) -> Encoded | None:
        sel = mask if part == "hi" else ~mask
        shape = _rows_shape(sel, enc.shape[2])
        if not shape[1]:
            return None
        p = _prefix(part)
        return Encoded({k[len(p):]: v for k, v in enc.arrays.items() if k.startswith(p)}, shape,
                       {k[len(p):]: v for k, v in enc.meta.items() if k.startswith(p)})

    def decode(self, enc: Encoded) -> np.ndarray:
        mask = self._mask_of(enc)
        out = np.zeros(enc.shape, dtype=np.float32)
        for part, sel in (("hi", mask), ("lo", ~mask)):
            penc = self._part_encoded(enc, part, mask)
            if penc is not None:
                out[sel] = self._parts[part].decode(penc).reshape(-1, enc.shape[2])
        return out

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        mask = self._mask_of(enc)
        out = np.ones(enc.shape[:2], dtype=bool)
        restored_all = True
        for part, sel in (("hi", mask), ("lo", ~mask)):
            penc = self._part_encoded(enc, part, mask)
            inner = None if penc is None else self._parts[part].token_mask(penc)
            if inner is not None:
                out[sel] = np.asarray(inner, dtype=bool).reshape(-1)
                restored_all = False
        return None if restored_all else out

    def report(self, enc: Encoded) -> dict[str, object]:
        """Tokens and stored bits per element of each part."""
        mask = self._mask_of(enc)
        elements = max(1, int(np.prod(enc.shape)))
        out: dict[str, object] = {"mask_bits_per_element": 8 * enc.arrays[MASK].nbytes / elements}
        for part in PARTS:
            penc = self._part_encoded(enc, part, mask)
            out[f"{part}_tokens"] = 0 if penc is None else int(penc.shape[0] * penc.shape[1])
            out[f"{part}_bits_per_element"] = 0.0 if penc is None else penc.bits_per_element()
        return out

    # -- shared state ----------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, np.ndarray]:
        return {_prefix(p) + k: v for p in PARTS for k, v in self._parts[p].shared_state().items()}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        for part in PARTS:
            p = _prefix(part)
            self._parts[part].load_shared_state({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
        unknown = [k for k in state if not k.startswith(tuple(_prefix(p) for p in PARTS))]
        if unknown:
            raise CodecError(f"codec 'salient' has no shared state {sorted(unknown)}")
        return self
