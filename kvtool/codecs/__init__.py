"""KV-cache codecs: the registry and the one spec parser.

A spec is ``name`` or ``name:key=value,key=value``; ``+`` composes stages, left to right: every codec but
the last must be a :class:`Stage` (a token selector, a low-rank projection), whose payload the next one
codes — ``snapkv:keep=0.5+kivi:bits=4`` (the kept rows), ``lowrank:rank=24+turboquant:bits=4`` (the rank-24
coefficients, so TurboQuant's head_dim is 24), ``snapkv:keep=0.5+lowrank:rank=32+turboquant:bits=4``.
Every stage's stored bytes are counted. Values are coerced to the codec dataclass's field types. A value
in square brackets is taken whole, so it may hold specs with their own ``,`` and ``+``
(``age:bands=[0-128:fp16;128-:turboquant:bits=3,center=true]``).

Adding a codec: write ``kvtool/codecs/<module>.py`` with a ``@register``-decorated dataclass subclass of
:class:`Codec`, add the module name to ``_MODULES`` below, and add a row to the table in
``tests/test_codec_contract.py``. Outside kvtool, a package adds codecs through the entry-point group
``kvtool.codecs`` (:data:`PLUGIN_GROUP`; ``examples/kvtool-codec-example``); :data:`ORIGINS` says where
each codec came from, and a plugin that fails to load is skipped with one warning line on stderr.
"""

from __future__ import annotations

import importlib
import sys
import types
import typing
from dataclasses import fields

from kvtool.codecs.base import (
    REGISTRY,
    Codec,
    Composed,
    Encoded,
    LayerContext,
    Selector,
    Stage,
    format_value,
    register,
)
from kvtool.errors import CodecError

__all__ = [
    "REGISTRY",
    "Codec",
    "Composed",
    "Encoded",
    "LayerContext",
    "Selector",
    "Stage",
    "ORIGINS",
    "PLUGIN_GROUP",
    "codec_parameters",
    "format_value",
    "parse_pair",
    "parse_spec",
    "register",
]

#: Codec modules imported (in this order) to fill REGISTRY. A module that does not exist yet is skipped.
_MODULES = ["none", "fp16", "fp8", "uniform", "kivi", "turboquant", "qjl", "polarquant", "streaming", "h2o",
            "snapkv", "tova", "knorm", "expected", "age", "minicache", "lowrank", "pq", "vq",
            "quant.kvquant", "quant.outliers", "quant.smooth"]


def _load_modules() -> None:
    for module in _MODULES:
        qualified = f"{__name__}.{module}"
        try:
            importlib.import_module(qualified)
        except ModuleNotFoundError as exc:
            if exc.name != qualified:  # a missing dependency inside an existing module is a real error
                raise


_load_modules()

#: The entry-point group through which installed packages add codecs (``[project.entry-points."kvtool.codecs"]``;
#: an entry names a Codec subclass, ``pkg.module:Class``, or a module whose ``@register`` runs on import).
PLUGIN_GROUP = "kvtool.codecs"
#: Where each registered codec comes from: ``"kvtool"`` or ``"plugin <distribution> <version>"``.
ORIGINS: dict[str, str] = dict.fromkeys(REGISTRY, "kvtool")
#: One line per plugin that failed to load (also printed once, as a warning, on stderr).
PLUGIN_ERRORS: list[str] = []


def _load_plugins() -> None:
    """Register the codecs of installed plugins. A plugin that fails costs one warning line, not kvtool."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"plugin {dist.name} {dist.version}" if dist is not None else f"plugin {ep.value}"
        before = dict(REGISTRY)
        try:
            obj = ep.load()
            if isinstance(obj, type):
                if not issubclass(obj, Codec):
                    raise TypeError(f"{ep.value} is not a kvtool Codec subclass")
                if REGISTRY.get(getattr(obj, "name", None)) is not obj:
                    register(obj)
            elif set(REGISTRY) == set(before):
                raise TypeError(f"{ep.value} registered no codec")
        except Exception as exc:  # noqa: BLE001 — any failure of third-party code is reported, not raised
            REGISTRY.clear()
            REGISTRY.update(before)  # nothing half-registered stays behind
            line = (f"warning: codec plugin {ep.name!r} ({origin.removeprefix('plugin ')}) was not loaded: "
                    f"{type(exc).__name__}: {exc}").replace("\n", " ")
            PLUGIN_ERRORS.append(line)
            print(line, file=sys.stderr)
            continue
        for name in set(REGISTRY) - set(before):
            ORIGINS[name] = origin


_load_plugins()


def _field_types(cls: type[Codec]) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}  # type: ignore[arg-type]


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def codec_parameters(cls: type[Codec]) -> dict[str, tuple[str, object]]:
    """``{parameter: (type name, default)}`` of a codec class, in field order (for ``kvtool codecs``)."""
    defaults = {f.name: f.default for f in fields(cls) if f.init}  # type: ignore[arg-type]
    return {k: (_type_name(tp), defaults[k]) for k, tp in _field_types(cls).items()}


def _coerce(key: str, text: str, tp: object) -> object:
    if typing.get_origin(tp) is typing.Literal:
        allowed = typing.get_args(tp)
        if text not in allowed:
            raise CodecError(f"{key} must be one of {', '.join(map(str, allowed))}, got {text}")
        return text
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise CodecError(f"{key} must be one of true, false, got {text}")
        return text.lower() in ("true", "1", "yes")
    try:
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        kind = "an integer" if tp is int else "a number"
        raise CodecError(f"{key} must be {kind}, got {text}") from None
    return text


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` outside square brackets: a parameter value in ``[...]`` may hold whole specs
    (``age:bands=[0-128:fp16;128-:turboquant:bits=4,center=true]``) with their own ``,`` and ``+``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise CodecError(f"unbalanced ']' in codec spec {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise CodecError(f"unbalanced '[' in codec spec {text!r}")
    return [*parts, text[start:]]


def _parse_stage(text: str) -> Codec:
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise CodecError(f"unknown codec {name!r}; registered codecs: {known}")
    cls = REGISTRY[name]
    types_ = _field_types(cls)
    values: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in split_top(rest, ","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in types_:
            allowed = ", ".join(types_) or "none"
            raise CodecError(f"codec {name!r} has no parameter {key!r}; its parameters: {allowed}")
        if not eq or not value:
            raise CodecError(f"parameter {key!r} of {name!r} needs a value: {key}=VALUE")
        if key in values:
            raise CodecError(f"parameter {key!r} of {name!r} is given twice")
        values[key] = _coerce(key, value, types_[key])
    return cls(**values)


def parse_spec(spec: str) -> Codec:
    """Parse ``name:key=value,...`` (stages joined by ``+``) into a fresh codec instance.

    Raises CodecError for an unknown codec or parameter, or a value the codec cannot honour.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError("empty codec spec; expected name:key=value,... e.g. uniform:bits=4")
    from kvtool.codecs.heads import is_heads_spec, parse_heads

    if is_heads_spec(spec):  # heads[a|b|...]: one codec per KV head (kvtool.codecs.heads)
        return parse_heads(spec, parse_spec)
    stages = [_parse_stage(part) for part in split_top(spec, "+")]
    codec = stages[-1]
    for stage in reversed(stages[:-1]):
        codec = Composed(stage, codec)
    return codec


def parse_pair(
    method: str | None = None, keys: str | None = None, values: str | None = None
) -> tuple[Codec, Codec]:
    """Codecs for (keys, values): ``method`` for both, or ``keys``/``values`` each (overriding ``method``).

    Each is configured for its role (KIVI quantizes keys per channel and values per token).
    """
    keys, values = keys or method, values or method
    if not keys or not values:
        raise CodecError("give --method SPEC for both keys and values, or both --keys SPEC and --values SPEC")
    return parse_spec(keys).for_role("keys"), parse_spec(values).for_role("values")

