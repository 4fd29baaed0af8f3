"""``heads[spec0|spec1|...]``: one codec per KV head — how a plan gives heads of one tensor different codecs.

Head ``h`` of a ``(heads, tokens, head_dim)`` tensor is fitted, encoded and decoded by its own codec as a
``(1, tokens, head_dim)`` tensor; its arrays, scalars and shared state are stored under the prefix ``h<h>.``.
The stored bytes are the sum of the parts' bytes. Every consumer of codecs (compress, decompress, eval) sees
an ordinary :class:`~kvtool.codecs.base.Codec`, and ``parse_spec(c.spec())`` rebuilds it, so a plan file
needs no format of its own in the HDF5 file.

Each part receives the :class:`~kvtool.codecs.base.LayerContext` cut to its head: arrays of two or more
dimensions whose first axis is the KV heads are cut to ``[h:h+1]``, those whose first axis is the query
heads (``queries``) to that KV head's query group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np

from kvtool.codecs.base import (
    SPEC_FORMS,
    Codec,
    Encoded,
    LayerContext,
    check_input,
    latest_sink,
    most_queries,
    split_top,
)
from kvtool.errors import CodecError

OPEN, CLOSE, SEP = "heads[", "]", "|"


def _prefix(h: int) -> str:
    return f"h{h}."


def _part(mapping: dict, h: int) -> dict:
    p = _prefix(h)
    return {k[len(p):]: v for k, v in mapping.items() if k.startswith(p)}


def head_context(context: LayerContext | None, h: int, kv_heads: int) -> LayerContext | None:
    """``context`` cut to KV head ``h`` (see the module docstring)."""
    if context is None:
        return None
    q = context.queries
    group = q.shape[0] // kv_heads if isinstance(q, np.ndarray) and q.ndim >= 2 else 1
    cut = {}
    for f in fields(context):
        value = getattr(context, f.name)
        if not isinstance(value, np.ndarray) or value.ndim < 2:
            continue
        if f.name == "queries" or (value.shape[0] == kv_heads * group and group > 1):
            cut[f.name] = value[h * group:(h + 1) * group]
        elif value.shape[0] == kv_heads:
            cut[f.name] = value[h:h + 1]
    return replace(context, **cut)


@dataclass
class PerHead(Codec):
    """``heads[spec0|spec1|...]`` — KV head ``h`` coded by ``spec<h>`` (built by the spec parser; not
    registered). Stored arrays: each part's, prefixed ``h<h>.``."""

    parts: tuple[Codec, ...]
    name: ClassVar[str] = "heads"

    def validate(self, head_dim: int | None = None) -> None:
        if not self.parts:
            raise CodecError("heads[...] needs one codec spec per KV head, separated by '|'")
        for part in self.parts:
            if isinstance(part, PerHead):
                raise CodecError("heads[...] cannot be nested")
            part.validate(head_dim)

    def spec(self) -> str:
        return OPEN + SEP.join(p.spec() for p in self.parts) + CLOSE

    def params(self) -> dict[str, object]:
        return {"parts": [p.spec() for p in self.parts]}

    def for_role(self, role: str) -> Codec:
        return PerHead(tuple(p.for_role(role) for p in self.parts))

    def streaming_form(self) -> tuple[int, Codec]:
        """Blocks every part can code: the least common multiple of the parts' blocks."""
        forms = [p.streaming_form() for p in self.parts]
        return math.lcm(*(block for block, _ in forms)), PerHead(tuple(codec for _, codec in forms))

    def uses_queries(self) -> bool:
        return any(p.uses_queries() for p in self.parts)

    def observed_queries(self) -> int | None:
        return most_queries(p.observed_queries() for p in self.parts)

    def query_moments(self) -> int | None:
        return latest_sink(p.query_moments() for p in self.parts)

    def reads_reconstruction(self) -> bool:
        return any(p.reads_reconstruction() for p in self.parts)

    def _check_heads(self, heads: int) -> None:
        if heads != len(self.parts):
            raise CodecError(f"heads[...] holds {len(self.parts)} codec(s) but the tensor has {heads} KV "
                             f"heads; give one spec per head")

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> Codec:
        x = check_input(x)
        self._check_heads(x.shape[0])
        for h, part in enumerate(self.parts):
            part.fit(x[h:h + 1], head_context(context, h, x.shape[0]))
        return self

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        self._check_heads(x.shape[0])
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, int | float | str] = {}
        for h, part in enumerate(self.parts):
            enc = part.encode(x[h:h + 1])
            arrays.update({_prefix(h) + k: v for k, v in enc.arrays.items()})
            meta.update({_prefix(h) + k: v for k, v in enc.meta.items()})
        return Encoded(arrays, x.shape, meta)

    def _head(self, enc: Encoded, h: int) -> Encoded:
        return Encoded(_part(enc.arrays, h), (1, *enc.shape[1:]), _part(enc.meta, h))

    def decode(self, enc: Encoded) -> np.ndarray:
        self._check_heads(enc.shape[0])
        return np.concatenate([p.decode(self._head(enc, h)) for h, p in enumerate(self.parts)], axis=0)

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        masks = [p.token_mask(self._head(enc, h)) for h, p in enumerate(self.parts)]
        if all(m is None for m in masks):
            return None
        return np.concatenate([np.ones((1, enc.shape[1]), bool) if m is None else m for m in masks], axis=0)

    def report(self, enc: Encoded) -> dict[str, object]:
        return {_prefix(h) + k: v for h, p in enumerate(self.parts) for k, v in p.report(self._head(enc, h)).items()}

    def shared_state(self) -> dict[str, np.ndarray]:
        return {_prefix(h) + k: v for h, p in enumerate(self.parts) for k, v in p.shared_state().items()}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        known = tuple(_prefix(h) for h in range(len(self.parts)))
        unknown = [k for k in state if not k.startswith(known)]
        if unknown:
            raise CodecError(f"heads[...] has no shared state {sorted(unknown)}")
        for h, part in enumerate(self.parts):
            part.load_shared_state(_part(state, h))
        return self


def is_heads_spec(text: str) -> bool:
    return text.strip().startswith(OPEN)


def head_specs(text: str) -> list[str]:
    """The per-head parts of ``heads[a|b|...]`` (split outside nested brackets), or ``[text]`` for any other
    spec."""
    text = text.strip()
    if not is_heads_spec(text):
        return [text]
    if not text.endswith(CLOSE):
        raise CodecError(f"a per-head spec is heads[SPEC|SPEC|...], one spec per KV head; got {text!r}")
    return split_top(text[len(OPEN):-len(CLOSE)], SEP)


def parse_heads(text: str, parse_one) -> PerHead:
    """``heads[a|b|...]`` → :class:`PerHead`; ``parse_one`` parses each part (``kvtool.codecs.parse_spec``)."""
    items = head_specs(text)
    if any(not item.strip() for item in items):
        raise CodecError(f"empty codec spec in {text!r}; heads[...] needs one spec per KV head")
    if any(is_heads_spec(item) for item in items):
        raise CodecError("heads[...] cannot be nested")
    return PerHead(tuple(parse_one(item) for item in items))


SPEC_FORMS[OPEN] = parse_heads  # the parser (kvtool.codecs.spec) builds heads[...] specs with it
