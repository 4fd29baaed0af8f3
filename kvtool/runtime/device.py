"""The device-codec contract: one kvtool codec's coding in torch, on the device of the tensors it codes.

A :class:`DeviceCodec` wraps a codec object (a :class:`kvtool.codecs.base.Codec`, which stays the numpy
reference that ``kvtool compress`` runs) and codes torch tensors ``(heads, tokens, head_dim)`` float32
where they are: a GPU model's cache never visits host memory. Its :class:`Encoded` holds torch tensors with
the same names, dtypes, shapes and bytes as the reference's numpy arrays (``tests/test_device_codecs.py``
checks that on CPU, code for code), so ``Encoded.nbytes`` and everything that reads an Encoded work
unchanged, and :func:`to_numpy` turns one into exactly what the reference would have stored.

:class:`HostCodec` runs any other codec through its numpy reference (a host round trip per coded block) so
every codec still works in a :class:`kvtool.CodecCache`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from kvtool.codecs.base import Codec, Encoded, LayerContext

ContextFn = Callable[[], LayerContext]


class DeviceCodec(ABC):
    """Encode/decode one codec's tensors in torch. ``x`` is ``(heads, tokens, head_dim)`` float32."""

    #: True when :meth:`fit` reads the layer context (queries, keys): the cache then builds one.
    needs_context: ClassVar[bool] = False
    #: False for :class:`HostCodec`: its Encoded holds numpy arrays on the host.
    on_device: ClassVar[bool] = True

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def fit(self, x: torch.Tensor, positions: np.ndarray, context: ContextFn | None = None) -> None:
        """Bind ``x`` ``(heads, tokens, head_dim)`` at absolute ``positions`` ``(tokens,)``. The default
        validates the head_dim (data-oblivious codecs)."""
        self.codec.validate(int(x.shape[-1]))

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Encoded:
        """The reference's arrays for ``x``, as torch tensors on ``x``'s device."""

    @abstractmethod
    def decode(self, enc: Encoded) -> torch.Tensor:
        """``enc.shape`` float32 on the device of ``enc``'s arrays."""

    def token_mask(self, enc: Encoded) -> torch.Tensor | None:
        """Bool ``(heads, tokens)``: rows that exist after eviction; None = all."""
        return None

    def shared_bytes(self) -> int:
        """Bytes of the codec's shared state (stored once per coded block)."""
        return sum(int(v.nbytes) for v in self.codec.shared_state().values())


class HostCodec(DeviceCodec):
    """Any codec, through its numpy reference on the host (the fallback)."""

    needs_context = True
    on_device = False

    def fit(self, x: torch.Tensor, positions: np.ndarray, context: ContextFn | None = None) -> None:
        self.codec.fit(_host(x), context() if context is not None else LayerContext(key_positions=positions))

    def encode(self, x: torch.Tensor) -> Encoded:
        return self.codec.encode(_host(x))

    def decode(self, enc: Encoded) -> torch.Tensor:
        return torch.from_numpy(self.codec.decode(enc))

    def token_mask(self, enc: Encoded) -> torch.Tensor | None:
        mask = self.codec.token_mask(enc)
        return None if mask is None else torch.from_numpy(np.asarray(mask, dtype=bool))


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def to_numpy(enc: Encoded) -> Encoded:
    """``enc`` with every torch array moved to the host as numpy (what the reference stores)."""
    return Encoded({k: _np(v) for k, v in enc.arrays.items()}, enc.shape, dict(enc.meta))


def to_device(enc: Encoded, device: torch.device | str) -> Encoded:
    """``enc`` with every array a torch tensor on ``device``."""
    return Encoded({k: _tensor(v).to(device) for k, v in enc.arrays.items()}, enc.shape, dict(enc.meta))


def _np(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    t = v.detach().cpu()
    if t.dtype in (torch.uint16, torch.uint32):  # numpy interop for these goes through a signed view
        signed = torch.int16 if t.dtype == torch.uint16 else torch.int32
        return t.view(signed).numpy().view(np.uint16 if t.dtype == torch.uint16 else np.uint32)
    return t.numpy()


def _tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    a = np.ascontiguousarray(v)
    if a.dtype in (np.uint16, np.uint32):
        signed = np.int16 if a.dtype == np.uint16 else np.int32
        return torch.from_numpy(a.view(signed)).view(torch.uint16 if a.dtype == np.uint16 else torch.uint32)
    return torch.from_numpy(a)
