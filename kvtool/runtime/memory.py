"""The outside count of what an object holds: every torch tensor and numpy array reachable from it.

:func:`held_bytes` walks attributes, containers and dataclass fields from a root object (a cache), and sums
the bytes of every distinct storage it reaches — a tensor's whole underlying storage (a slice that keeps
a large buffer alive is charged the buffer), a numpy view its base's buffer — deduplicated by address, so
shared blocks (beam search rows, a numpy view of a tensor) count once. It knows nothing of kvtool's
classes: the same walk measures a ``DynamicCache`` or a ``QuantizedCache`` (tensor subclasses such as
quanto's packed tensors are opened through ``__tensor_flatten__``).
"""

from __future__ import annotations

import types
import weakref
from collections import Counter
from typing import Any

import numpy as np
import torch

_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
         weakref.ref, torch.device, torch.dtype, torch.nn.Module, str, bytes, int, float, bool, complex,
         type(None))


def held_bytes(root: Any, *, by_device: bool = False) -> int | dict[str, int]:
    """Bytes of every distinct tensor/array storage reachable from ``root`` (or ``{device: bytes}``)."""
    seen_objects: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, _SKIP) or id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            _tensor(obj, storages, stack)
        elif isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            key = ("cpu", base.__array_interface__["data"][0])
            storages[key] = max(storages.get(key, 0), base.nbytes)
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            if hasattr(obj, "__dict__"):
                stack.append(vars(obj))
            for slot in getattr(type(obj), "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    if not by_device:
        return sum(storages.values())
    out: Counter[str] = Counter()
    for (device, _), n in storages.items():
        out[device] += n
    return dict(out)


def _tensor(t: torch.Tensor, storages: dict[tuple[str, int], int], stack: list[Any]) -> None:
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = flatten()
        stack.extend(getattr(t, n) for n in names)
        return
    if t.device.type == "meta":
        return
    storage = t.untyped_storage()
    key = (str(t.device), storage.data_ptr())
    storages[key] = max(storages.get(key, 0), storage.nbytes())
