"""Which device form runs a codec: :func:`device_codec`.

Adding a device form = one module beside this one + one line in :data:`TABLE` + the codec's row in
``tests/test_device_codecs.py``. Everything else runs through its numpy reference (:class:`HostCodec`).
"""

from __future__ import annotations

from collections.abc import Callable

from kvtool.codecs.base import Codec, Composed, Selector
from kvtool.codecs.quant.fp8 import FP8
from kvtool.codecs.quant.kivi import Kivi
from kvtool.codecs.quant.turboquant import TurboQuant
from kvtool.codecs.quant.uniform import Uniform
from kvtool.runtime import turboquant
from kvtool.runtime.device import DeviceCodec, HostCodec
from kvtool.runtime.fp8 import FP8Device
from kvtool.runtime.group import GroupDevice
from kvtool.runtime.select import ComposedDevice, SelectorDevice

#: codec class → (its device form, whether that form covers this codec object)
TABLE: dict[type[Codec], tuple[type[DeviceCodec], Callable[[Codec], bool]]] = {
    TurboQuant: (turboquant.TurboQuantDevice, turboquant.supported),
    Uniform: (GroupDevice, lambda c: True),
    Kivi: (GroupDevice, lambda c: True),
    FP8: (FP8Device, lambda c: True),
}


def device_codec(codec: Codec) -> DeviceCodec:
    """The torch form of ``codec`` when it has one (TurboQuant mse, uniform, KIVI, fp8, token selectors and
    ``selector+`` any of these), else its numpy reference behind :class:`HostCodec`."""
    if _plain_selector(codec):
        return SelectorDevice(codec)
    if isinstance(codec, Composed) and _plain_selector(codec.head):
        tail = device_codec(codec.tail)
        if tail.on_device:
            return ComposedDevice(codec, SelectorDevice(codec.head), tail)
        return HostCodec(codec)
    entry = TABLE.get(type(codec))
    if entry is not None and entry[1](codec):
        return entry[0](codec)
    return HostCodec(codec)


def _plain_selector(codec: Codec) -> bool:
    """A selector that stores what the base :class:`Selector` stores (its own ``split``/``merge`` would add
    arrays or meta the device form does not know, as ``expected``'s rope flag)."""
    cls = type(codec)
    return isinstance(codec, Selector) and all(getattr(cls, m) is getattr(Selector, m) for m in
                                               ("split", "merge", "payload_shape", "payload_mask", "token_mask"))


def has_device_form(codec: Codec) -> bool:
    return device_codec(codec).on_device
