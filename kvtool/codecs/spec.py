"""The codec spec grammar: ``name:key=value,...``, stages joined by ``+``, ``[...]`` kept whole, and
``heads[a|b|...]`` (one codec per KV head). :func:`parse_spec` turns a spec into a fresh codec instance
from the registry (:data:`kvtool.codecs.base.REGISTRY`, filled by :mod:`kvtool.codecs`); the package
re-exports everything here, so ``from kvtool.codecs import parse_spec`` is the usual spelling.

Wrappers that hold other specs (``age``, ``heads``) parse them with :func:`parse_spec` too; the bracket
splitter they share is :func:`kvtool.codecs.base.split_top`. A form that is not ``name:params``
(``heads[...]``) registers its builder in :data:`kvtool.codecs.base.SPEC_FORMS`, so this module imports no
wrapper.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields

from kvtool.codecs.base import REGISTRY, SPEC_FORMS, Codec, Composed, split_top
from kvtool.errors import CodecError

__all__ = ["codec_parameters", "parse_pair", "parse_spec", "split_top"]


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
    for opening, build in SPEC_FORMS.items():  # heads[a|b|...]: one codec per KV head (codecs/compose/heads.py)
        if spec.strip().startswith(opening):
            return build(spec, parse_spec)
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
