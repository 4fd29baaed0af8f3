"""``age``: age-aware precision — bands of token age, each coded by its own codec.

The newest tokens are read most (attention is local: ``analyze``'s local mass) and are cheap to keep
precise, so a cache can spend its bits where the queries look: the last 128 tokens in fp16, the next 1,024
at 4 bits, older ones at 2 bits. KIVI (arXiv 2402.02750, §3.3) keeps a full-precision window of recent
tokens for the same reason; this codec generalises the window to any number of bands.

Syntax (docs/CODECS.md): ``age:bands=[0-128:fp16;128-1152:turboquant:bits=4;1152-:turboquant:bits=2],sink=4``.
A band is ``FROM-TO:SPEC`` over token ages ``FROM <= age < TO``; age 0 is the newest token, and ``FROM-``
(no end) is every older token. Bands must start at 0, touch without overlapping, and end with an
open band. The brackets let a band's spec hold its own ``,`` and ``+`` (``1152-:snapkv:keep=0.5+
turboquant:bits=2`` evicts among the old tokens only). ``sink=n`` stores the first ``n`` tokens (by
position) in fp16 whatever their age (StreamingLLM's attention sinks, arXiv 2309.17453).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from kvtool.codecs.base import Codec, Encoded, LayerContext, check_input, latest_sink, most_queries, register, split_top
from kvtool.codecs.spec import parse_spec
from kvtool.errors import CodecError

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d*)\s*$")
SINK = "sink"
DEFAULT_BANDS = "[0-128:fp16;128-1152:turboquant:bits=4;1152-:turboquant:bits=2]"
EXAMPLE = f"age:bands={DEFAULT_BANDS}"


def _prefix(i: int) -> str:
    return f"band{i}."


@dataclass(frozen=True)
class Band:
    """Token ages ``lo <= age < hi`` (``hi`` None: every older token) and the codec for them."""

    lo: int
    hi: int | None
    codec: Codec

    def text(self) -> str:
        return f"{self.lo}-{'' if self.hi is None else self.hi}:{self.codec.spec()}"

    def tokens(self, total: int, sink: int) -> slice:
        """The token indices of this band in a tensor of ``total`` tokens whose first ``sink`` are sinks."""
        start = sink if self.hi is None else max(total - self.hi, sink)
        return slice(min(start, max(total - self.lo, sink)), max(total - self.lo, sink))


def parse_bands(text: str) -> list[Band]:
    """``[0-128:fp16;128-:turboquant:bits=4]`` → bands sorted by age; CodecError on any overlap or gap."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    items = [b.strip() for b in split_top(body, ";") if b.strip()]
    if not items:
        raise CodecError(f"age needs bands, e.g. {EXAMPLE}")
    bands = []
    for item in items:
        span, colon, spec = item.partition(":")
        m = _RANGE.match(span)
        if not colon or not m:
            raise CodecError(f"age band {item!r}: expected FROM-TO:SPEC or FROM-:SPEC over token ages "
                             f"(0 = the newest token), e.g. {EXAMPLE}")
        lo, hi = int(m.group(1)), int(m.group(2)) if m.group(2) else None
        if hi is not None and hi <= lo:
            raise CodecError(f"age band {span.strip()}: the end must be above the start")
        try:
            codec = parse_spec(spec)
        except CodecError as exc:
            raise CodecError(f"age band {span.strip()}: {exc}") from None
        bands.append(Band(lo, hi, codec))
    bands.sort(key=lambda b: b.lo)
    if bands[0].lo != 0:
        raise CodecError(f"age bands must start at age 0 (the newest token); the first starts at {bands[0].lo}")
    for a, b in zip(bands, bands[1:], strict=False):
        name_a, name_b = a.text().split(":")[0], b.text().split(":")[0]
        if a.hi is None or a.hi > b.lo:
            raise CodecError(f"age bands {name_a} and {name_b} overlap")
        if a.hi < b.lo:
            raise CodecError(f"age bands {name_a} and {name_b} leave ages {a.hi}..{b.lo - 1} without a codec")
    if bands[-1].hi is not None:
        raise CodecError(f"the last age band must be open-ended ({bands[-1].hi}-:SPEC) so every older token "
                         "has a codec")
    return bands


@register
@dataclass
class Age(Codec):
    """``age:bands=[0-128:fp16;128-:turboquant:bits=4],sink=0`` — each band of token age coded by its codec.

    Ages count back from the newest token (age 0); ``FROM-`` is every older token. The default bands are
    the newest 128 tokens in fp16, the next 1,024 at ``turboquant:bits=4``, older ones at ``bits=2``.
    ``sink=n`` keeps the first n positions in fp16 (by position: a sliding-window layer whose held rows
    start later holds fewer or none). Stored arrays: each band's under ``band<i>.``, the sink rows
    as ``sink``.
    """

    name = "age"
    #: Ages change as tokens arrive: a block coded once in a growing cache would keep its first age forever.
    streaming: ClassVar[bool] = False
    bands: str = DEFAULT_BANDS
    sink: int = 0

    def __post_init__(self) -> None:
        if self.sink < 0:
            raise CodecError(f"sink must be at least 0, got {self.sink}")
        self._bands = parse_bands(self.bands)
        self.bands = self._canonical()
        super().__post_init__()

    def _canonical(self) -> str:
        return "[" + ";".join(b.text() for b in self._bands) + "]"

    def validate(self, head_dim: int | None = None) -> None:
        for band in self._bands:
            try:
                band.codec.validate(head_dim)
            except CodecError as exc:
                raise CodecError(f"age band {band.text().split(':')[0]}: {exc}") from None

    def for_role(self, role: str) -> Codec:
        copy = replace(self)
        copy._bands = [Band(b.lo, b.hi, b.codec.for_role(role)) for b in self._bands]
        copy.bands = copy._canonical()
        return copy

    def uses_queries(self) -> bool:
        return any(b.codec.uses_queries() for b in self._bands)

    def observed_queries(self) -> int | None:
        return most_queries(b.codec.observed_queries() for b in self._bands)

    def query_moments(self) -> int | None:
        return latest_sink(b.codec.query_moments() for b in self._bands)

    def reads_reconstruction(self) -> bool:
        return any(b.codec.reads_reconstruction() for b in self._bands)

    # -- coding ----------------------------------------------------------------------------------------
    def _parts(self, tokens: int, sink: int) -> list[tuple[int, Band, slice]]:
        """The bands that hold tokens in a tensor of ``tokens`` tokens whose first ``sink`` rows are sinks,
        with their token slices."""
        sink = min(sink, tokens)
        parts = [(i, b, b.tokens(tokens, sink)) for i, b in enumerate(self._bands)]
        return [(i, b, s) for i, b, s in parts if s.stop > s.start]

    def sink_rows(self, tokens: int, context: LayerContext | None) -> int:
        """How many leading rows hold the first ``sink`` positions: on a sliding-window layer the held rows
        start later than position 0, and hold fewer sinks or none."""
        positions = context.key_positions if context is not None else None
        if positions is None or len(positions) != tokens:
            return min(self.sink, tokens)
        return int((np.asarray(positions) < self.sink).sum())

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> Age:
        x = check_input(x)
        super().fit(x, context)
        self._sink_rows = self.sink_rows(x.shape[1], context)
        for _, band, tokens in self._parts(x.shape[1], self._sink_rows):
            band.codec.fit(x[:, tokens], _slice_context(context, tokens))
        return self

    def _stored_sinks(self, enc: Encoded) -> int:
        return int(enc.arrays[SINK].shape[1]) if SINK in enc.arrays else 0

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, int | float | str] = {}
        sink = min(getattr(self, "_sink_rows", self.sink), x.shape[1])
        if sink:
            arrays[SINK] = x[:, :sink].astype(np.float16)
        for i, band, tokens in self._parts(x.shape[1], sink):
            enc = band.codec.encode(x[:, tokens])
            arrays.update({_prefix(i) + k: v for k, v in enc.arrays.items()})
            meta.update({_prefix(i) + k: v for k, v in enc.meta.items()})
        return Encoded(arrays, x.shape, meta)

    def _band_encoded(self, enc: Encoded, i: int, tokens: slice) -> Encoded:
        p = _prefix(i)
        return Encoded({k[len(p):]: v for k, v in enc.arrays.items() if k.startswith(p)},
                       (enc.shape[0], tokens.stop - tokens.start, enc.shape[2]),
                       {k[len(p):]: v for k, v in enc.meta.items() if k.startswith(p)})

    def decode(self, enc: Encoded) -> np.ndarray:
        out = np.zeros(enc.shape, dtype=np.float32)
        if SINK in enc.arrays:
            sink = enc.arrays[SINK]
            out[:, : sink.shape[1]] = sink.astype(np.float32)
        for i, band, tokens in self._parts(enc.shape[1], self._stored_sinks(enc)):
            out[:, tokens] = band.codec.decode(self._band_encoded(enc, i, tokens))
        return out

    def token_mask(self, enc: Encoded) -> np.ndarray | None:
        masks = [(tokens, band.codec.token_mask(self._band_encoded(enc, i, tokens)))
                 for i, band, tokens in self._parts(enc.shape[1], self._stored_sinks(enc))]
        if all(m is None for _, m in masks):
            return None
        mask = np.ones(enc.shape[:2], dtype=bool)
        for tokens, m in masks:
            if m is not None:
                mask[:, tokens] = m
        return mask

    def report(self, enc: Encoded) -> dict[str, object]:
        """Per band: its ages, tokens and stored bits per element."""
        rows = []
        for i, band, tokens in self._parts(enc.shape[1], self._stored_sinks(enc)):
            part = self._band_encoded(enc, i, tokens)
            rows.append({"ages": band.text().split(":")[0], "tokens": tokens.stop - tokens.start,
                         "bits_per_element": part.bits_per_element()})
        return {"bands": rows}

    # -- shared state ----------------------------------------------------------------------------------
    def shared_state(self) -> dict[str, np.ndarray]:
        return {_prefix(i) + k: v for i, b in enumerate(self._bands) for k, v in b.codec.shared_state().items()}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        for i, band in enumerate(self._bands):
            p = _prefix(i)
            band.codec.load_shared_state({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
        unknown = [k for k in state if not any(k.startswith(_prefix(i)) for i in range(len(self._bands)))]
        if unknown:
            raise CodecError(f"codec 'age' has no shared state {sorted(unknown)}")
        return self


def _slice_context(context: LayerContext | None, tokens: slice) -> LayerContext | None:
    """The context of a band: the layer's keys, values and key positions cut to its tokens."""
    if context is None:
        return None

    def cut(a: np.ndarray | None, axis: int) -> np.ndarray | None:
        return None if a is None else np.take(a, np.arange(tokens.start, tokens.stop), axis=axis)

    return replace(context, keys=cut(context.keys, 1), values=cut(context.values, 1),
                   key_positions=cut(context.key_positions, 0))
