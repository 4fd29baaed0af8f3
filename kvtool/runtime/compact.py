"""The compact track: one cache layer's keys or values held as coded blocks plus a precise window.

A :class:`kvtool.CodecCache` built with ``compact=True`` gives each layer two of these (keys, values) instead
of the decoded working copy. Between forward passes a track holds only

* its :class:`Segment` s: per coded block and batch row, the codec's :class:`~kvtool.codecs.base.Encoded`
  (torch tensors on the model's device for codecs with a device form, :mod:`kvtool.runtime.backends`),
* the precise window ``(B, H, P, D)``: tokens not coded yet (streaming's open block, or everything after the
  prompt in prefill mode), in the model's dtype (a streaming window is rounded to 16 bits, as the decoded
  track does).

:meth:`CompactTrack.view` decodes what the layer's attention call reads — every held token, in the model's
dtype — into a fresh tensor that the attention call owns; when that call returns, nothing keeps it. So a
forward pass holds one layer's working tensors at a time on top of the coded cache. Each block is decoded
with the same device form and cast to the same dtype as the decoded track writes it, so compact and decoded
caches give the model identical keys and values (``tests/test_compact_cache.py``).

The class has the interface of :class:`kvtool.cache._Track` that :class:`kvtool.cache.CodecLayer` uses
(append, code, store, span, rows, keep_last, reorder, footprint, view); ``buffer`` is the precise window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtool.codecs.base import Codec, Encoded, LayerContext
from kvtool.runtime.backends import device_codec
from kvtool.runtime.device import DeviceCodec

ContextFor = Callable[[int, np.ndarray], LayerContext]


@dataclass
class Segment:
    """One coded block: ``rows[b]`` is batch row b's Encoded; tokens ``start .. start + length``."""

    start: int
    length: int
    rows: list[Encoded]
    shared_bytes: int

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.rows) + self.shared_bytes

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class CompactTrack:
    """Keys or values of one layer: coded segments, then the precise window (``buffer``)."""

    codec: Codec
    block: int  # streaming block (0 in prefill mode)
    buffer: torch.Tensor | None = None  # (B, H, P, D) precise tokens, model dtype
    start: int = 0  # absolute position of the first token held (coded or precise)
    window_start: int = 0  # absolute position of buffer[..., 0, :]
    window_dtype: torch.dtype | None = None
    segments: list[Segment] = field(default_factory=list)
    dtype: torch.dtype | None = None  # the model's dtype: what view() returns
    _coder: DeviceCodec | None = None

    @property
    def coder(self) -> DeviceCodec:
        if self._coder is None or self._coder.codec is not self.codec:
            self._coder = device_codec(self.codec)
        return self._coder

    @property
    def precise(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.shape[2])

    @property
    def held(self) -> int:
        return self.end - self.start

    @property
    def end(self) -> int:
        return self.window_start + self.precise

    # -- growing ------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        if self.buffer is None:
            self.buffer = x.detach().clone()
            self.dtype = x.dtype
            self.window_start = self.start
            if self.block:
                self.window_dtype = torch.float16 if x.dtype.itemsize > 2 else x.dtype
        else:
            self.buffer = torch.cat([self.buffer, x.detach()], dim=2)

    def round_window(self, newest: int) -> None:
        """Streaming: hold the ``newest`` precise tokens in the 16-bit window dtype (as the decoded track)."""
        n = min(newest, self.precise)
        if n and self.window_dtype is not None and self.window_dtype != self.buffer.dtype:
            self.buffer[:, :, -n:] = self.buffer[:, :, -n:].to(self.window_dtype).to(self.buffer.dtype)

    # -- coding -------------------------------------------------------------------------------------
    def span(self, n: int) -> tuple[int, int, np.ndarray]:
        """Window indices of the oldest ``n`` precise tokens, and their absolute positions."""
        return 0, n, np.arange(self.window_start, self.window_start + n)

    def rows(self, a: int, b: int) -> list[np.ndarray]:
        """Per batch row, window tokens ``a..b`` as float32 numpy ``(H, b - a, D)`` (cross-layer codecs)."""
        return [self.buffer[r, :, a:b, :].float().cpu().numpy() for r in range(self.buffer.shape[0])]

    def code(self, n: int, context: ContextFor) -> None:
        """Code the oldest ``n`` precise tokens as one segment (on the model's device)."""
        a, b, positions = self.span(n)
        coder, coded = self.coder, []
        for r in range(self.buffer.shape[0]):
            x = self.buffer[r, :, a:b, :].float()
            coder.fit(x, positions, (lambda r=r: context(r, positions)) if coder.needs_context else None)
            coded.append((coder.encode(x), None, coder.shared_bytes()))
        self.store(a, b, coded)

    def store(self, a: int, b: int, coded: list[tuple[Encoded, object, int]]) -> None:
        """Keep the Encoded of each batch row for window tokens ``a..b`` (``a`` is 0: the oldest); the
        decodings are not kept."""
        self.segments.append(Segment(self.window_start + a, b - a, [c[0] for c in coded], sum(c[2] for c in coded)))
        self.buffer = self.buffer[:, :, b:].clone()  # a slice would keep the coded tokens' storage alive
        self.window_start += b - a

    # -- reading ------------------------------------------------------------------------------------
    def _decode(self, segment: Segment) -> torch.Tensor:
        """``(B, H, length, D)`` in the model's dtype on the window's device."""
        coder = self.coder
        rows = [coder.decode(e).to(device=self.buffer.device, dtype=self.dtype) for e in segment.rows]
        return torch.stack(rows) if len(rows) > 1 else rows[0][None]

    def view(self) -> torch.Tensor:
        """Every held token ``(B, H, held, D)``, model dtype: a fresh tensor (decoded segments + window)."""
        parts = [self._decode(s) for s in self.segments]
        if parts and self.segments[0].start < self.start:  # a sliding window cut into the oldest block
            parts[0] = parts[0][:, :, self.start - self.segments[0].start:]
        parts.append(self.buffer)
        return torch.cat(parts, dim=2) if len(parts) > 1 else self.buffer

    @property
    def mask(self) -> torch.Tensor | None:
        """``(B, H, held)`` bool keep mask (None = every row exists), rebuilt from the stored selections."""
        masks = []
        for s in self.segments:
            rows = [self.coder.token_mask(e) for e in s.rows]
            masks.append(None if all(m is None for m in rows) else rows)
        if all(m is None for m in masks):
            return None
        batch, heads = self.buffer.shape[:2]
        parts = []
        for s, rows in zip(self.segments, masks, strict=True):
            full = torch.ones(batch, heads, s.length, dtype=torch.bool, device=self.buffer.device)
            for r, m in enumerate(rows or []):
                if m is not None:
                    full[r] = m.to(full.device)
            parts.append(full)
        if parts and self.segments[0].start < self.start:
            parts[0] = parts[0][:, :, self.start - self.segments[0].start:]
        parts.append(torch.ones(batch, heads, self.precise, dtype=torch.bool, device=self.buffer.device))
        return torch.cat(parts, dim=2)

    def tokens(self, row: int, first: int, n: int) -> torch.Tensor:
        """Batch row ``row``'s tokens at absolute positions ``first .. first + n`` ``(H, n, D)`` as attention
        reads them (for a codec's LayerContext)."""
        if first >= self.window_start:
            return self.buffer[row, :, first - self.window_start:first - self.window_start + n]
        return self.view()[row, :, first - self.start:first - self.start + n]

    def snapshot(self) -> CompactTrack:
        """A shallow copy of what the track holds now (segments list, window, start): what an attention call
        reads from codes after the layer has already cut a sliding window for the next step."""
        return CompactTrack(self.codec, self.block, self.buffer, self.start, self.window_start, self.window_dtype,
                            list(self.segments), self.dtype, self.coder)

    # -- housekeeping -------------------------------------------------------------------------------
    def keep_last(self, n: int) -> None:
        """Sliding window: hold only the newest ``n`` tokens; drop segments that are entirely older."""
        drop = self.held - n
        if drop <= 0:
            return
        self.start += drop
        if self.start > self.window_start:
            self.buffer = self.buffer[:, :, self.start - self.window_start:].clone()
            self.window_start = self.start
        self.segments = [s for s in self.segments if s.end > self.start]

    def footprint(self) -> dict[str, int]:
        """``stored_bytes`` (coded blocks + shared state + precise tokens) and ``elements`` held."""
        if self.buffer is None:
            return {"stored_bytes": 0, "elements": 0, "precise_tokens": 0}
        batch, heads, _, dim = self.buffer.shape
        itemsize = (self.window_dtype or self.buffer.dtype).itemsize
        coded = sum(s.nbytes for s in self.segments)
        return {"stored_bytes": coded + self.precise * batch * heads * dim * itemsize,
                "elements": self.held * batch * heads * dim, "precise_tokens": self.precise}

    def reorder(self, index: torch.Tensor) -> None:
        """Batch rows in the order ``index`` (beam search): the window is gathered, each segment's row list
        reordered (the coded arrays are shared, not copied, when a row is repeated)."""
        if self.buffer is None:
            return
        self.buffer = self.buffer.index_select(0, index.to(self.buffer.device))
        rows = index.tolist()
        for s in self.segments:
            s.rows = [s.rows[i] for i in rows]
