"""Which codec encodes which tensor: a map from (layer, role) to a codec spec.

Every consumer of codecs — :func:`kvtool.compress.compress`, ``kvtool eval`` and ``kvtool.CodecCache``,
``sweep`` and ``plan`` — asks an :class:`Assignment` for the codec of one layer's keys or values, so a
single spec pair and a per-layer plan go through the same code. :meth:`Assignment.codec` returns a *fresh*
instance each call: fitted state (a basis, a codebook, outlier channels) belongs to one layer.

>>> a = Assignment.of("turboquant:bits=3", "kivi:bits=2")          # one spec per role, every layer
>>> a = Assignment("uniform:bits=4", "uniform:bits=4", {0: {"keys": "fp16"}})   # layer 0 keys in fp16
>>> codec = a.codec(layer=5, role="keys")                             # a new, unfitted Codec
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvtool.codecs.base import ROLES, Codec
from kvtool.codecs.spec import parse_spec
from kvtool.errors import CodecError


def _spec_text(codec: Codec | str) -> str:
    return codec if isinstance(codec, str) else codec.spec()


@dataclass(frozen=True)
class Assignment:
    """Default ``keys``/``values`` specs and per-layer overrides ``{layer: {"keys"|"values": spec}}``."""

    keys: str
    values: str
    layers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer, roles in self.layers.items():
            unknown = set(roles) - set(ROLES)
            if unknown:
                raise CodecError(f"layer {layer}: unknown role(s) {sorted(unknown)}; roles are keys, values")

    @classmethod
    def of(cls, keys: Codec | str, values: Codec | str) -> Assignment:
        """The same keys codec and values codec for every layer (codec instances or spec strings)."""
        return cls(_spec_text(keys), _spec_text(values))

    @property
    def uniform(self) -> bool:
        """True when every layer uses the default specs."""
        return not any(self.layers.values())

    def spec(self, layer: int, role: str) -> str:
        """The spec text for ``role`` (``"keys"`` or ``"values"``) of ``layer``."""
        if role not in ROLES:
            raise CodecError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return self.layers.get(layer, {}).get(role, self.keys if role == "keys" else self.values)

    def codec(self, layer: int, role: str) -> Codec:
        """A fresh codec for ``role`` of ``layer``, configured for its role (KIVI picks its axis)."""
        return parse_spec(self.spec(layer, role)).for_role(role)

    def validate(self, head_dim: int, num_layers: int) -> None:
        """Parse every spec and check it against ``head_dim``; reject overrides of layers that do not exist."""
        for layer in self.layers:
            if not 0 <= int(layer) < num_layers:
                raise CodecError(f"the assignment names layer {layer}, but the model has layers "
                                 f"0..{num_layers - 1}")
        for layer in sorted({0, *self.layers}):
            for role in ROLES:
                self.codec(layer, role).validate(head_dim)

    def describe(self) -> dict[str, Any]:
        """JSON-ready form: the default specs and the overrides (layer keys as strings)."""
        return {"keys": self.keys, "values": self.values,
                "layers": {str(k): dict(v) for k, v in sorted(self.layers.items()) if v}}
