"""Token selectors and compositions in torch: the kept rows are split and merged on the device.

A selector *chooses* with its numpy reference (:meth:`kvtool.codecs.base.Selector.keep_mask`: scores from
the prompt's last queries, once per coded block — in prefill mode once per prompt, never per decoding
step); the rows it keeps, the stored indices (``kept``, ``kept_counts``, in the reference's dtypes) and the
tail codec's coding of the rows stay on the device. ``selector+quantizer`` runs the quantizer's device form
on the kept rows.
"""

from __future__ import annotations

import numpy as np
import torch

from kvtool.codecs.base import INNER, Composed, Encoded, Selector, _own, _strip
from kvtool.runtime.device import ContextFn, DeviceCodec, _host, _tensor

_INDEX = {1 << 8: torch.uint8, 1 << 16: torch.uint16, 1 << 32: torch.uint32}


def _index_dtype(tokens: int) -> torch.dtype:
    return next(dt for limit, dt in _INDEX.items() if tokens <= limit)


def pack_selection(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`kvtool.codecs.base.pack_selection` in torch: ``kept`` (and ``kept_counts`` when heads differ)."""
    heads, tokens = mask.shape
    counts = mask.sum(dim=1)
    flat = torch.nonzero(mask)[:, 1]  # head-major, ascending within a head
    if heads == 0 or bool((counts == counts[0]).all()):
        return {"kept": flat.view(heads, -1).to(_index_dtype(tokens))}
    return {"kept": flat.to(_index_dtype(tokens)), "kept_counts": counts.to(_index_dtype(tokens + 1))}


def selection_mask(arrays: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The bool ``(heads, tokens)`` mask of stored ``kept`` indices."""
    kept = arrays["kept"].long()
    mask = torch.zeros(shape[:2], dtype=torch.bool, device=kept.device)
    if "kept_counts" not in arrays:
        return mask.scatter_(1, kept, True)
    heads = torch.repeat_interleave(torch.arange(shape[0], device=kept.device), arrays["kept_counts"].long())
    mask[heads, kept] = True
    return mask


def payload_shape(own: dict[str, torch.Tensor], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    kept = own["kept"]
    if "kept_counts" in own:
        return 1, int(kept.shape[0]), shape[2]
    return shape[0], int(kept.shape[1]), shape[2]


class SelectorDevice(DeviceCodec):
    """A token selector alone: the kept rows stored in fp16 (``rows``), as the reference stores them."""

    needs_context = True
    codec: Selector

    def fit(self, x: torch.Tensor, positions: np.ndarray, context: ContextFn | None = None) -> None:
        host = _host(x)
        self.codec.fit(host, context() if context is not None else None)
        self.mask = _tensor(self.codec.keep_mask(host)).to(x.device)

    def split(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        own = pack_selection(self.mask)
        return own, x[self.mask].reshape(payload_shape(own, tuple(x.shape)))

    def merge(self, own: dict[str, torch.Tensor], shape: tuple[int, int, int], payload: torch.Tensor) -> torch.Tensor:
        mask = selection_mask(own, shape)
        out = torch.zeros(shape, device=payload.device)
        out[mask] = payload.reshape(-1, shape[2])
        return out

    def encode(self, x: torch.Tensor) -> Encoded:
        own, rows = self.split(x)
        return Encoded({**own, "rows": rows.half()}, tuple(x.shape))

    def decode(self, enc: Encoded) -> torch.Tensor:
        own = {k: v for k, v in enc.arrays.items() if k != "rows"}
        return self.merge(own, enc.shape, enc.arrays["rows"].float())

    def token_mask(self, enc: Encoded) -> torch.Tensor | None:
        return selection_mask(enc.arrays, enc.shape)


class ComposedDevice(DeviceCodec):
    """``selector+codec``: the selector's device form, then the tail's device form on the kept rows."""

    needs_context = True
    codec: Composed

    def __init__(self, codec: Composed, head: SelectorDevice, tail: DeviceCodec) -> None:
        super().__init__(codec)
        self.head, self.tail = head, tail

    def fit(self, x: torch.Tensor, positions: np.ndarray, context: ContextFn | None = None) -> None:
        self.head.fit(x, positions, context)
        self.tail.fit(self.head.split(x)[1], positions, context)  # as the reference: the block's positions

    def encode(self, x: torch.Tensor) -> Encoded:
        own, rows = self.head.split(x)
        inner = self.tail.encode(rows)
        arrays = {**own, **{INNER + k: v for k, v in inner.arrays.items()}}
        return Encoded(arrays, tuple(x.shape), {INNER + k: v for k, v in inner.meta.items()})

    def _parts(self, enc: Encoded) -> tuple[dict[str, torch.Tensor], Encoded]:
        own = _own(enc.arrays)
        return own, Encoded(_strip(enc.arrays), payload_shape(own, enc.shape), _strip(enc.meta))

    def decode(self, enc: Encoded) -> torch.Tensor:
        own, inner = self._parts(enc)
        return self.head.merge(own, enc.shape, self.tail.decode(inner))

    def token_mask(self, enc: Encoded) -> torch.Tensor | None:
        return selection_mask(_own(enc.arrays), enc.shape)

    def shared_bytes(self) -> int:
        return self.head.shared_bytes() + self.tail.shared_bytes()
