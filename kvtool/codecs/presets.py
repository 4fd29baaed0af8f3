"""Named groups of codec specs for ``kvtool sweep`` and ``kvtool plan``, built from the registry.

* ``quant`` — every registered codec with a ``bits`` parameter at each width 2..8 it accepts (its other
  parameters at their defaults), plus each of the codec's ``sweep_variants`` at the same widths;
* ``default`` — every registered codec at its defaults, plus the ``bits`` codecs (and their variants) at
  2, 3 and 4 bits: a short list whose frontier is worth a plot;
* ``all`` — ``quant`` and ``default``, plus every value of every choice parameter (``axis``, ``format``,
  ``variant`` ...) with the rest at defaults;
* ``plan`` — ``kvtool plan``'s default candidates: every ``bits`` codec in its recommended form (its
  ``sweep_variants`` where it declares some, else its defaults) at 1–6 and 8 bits, plus the half steps
  1.5–3.5 where the codec takes fractional widths (TurboQuant), and ``fp16``: a ladder fine enough for the
  knapsack to trade bits between layers, heads and roles. The half steps matter when keys and values
  need very different widths: on Gemma 3 keys in ``kvquant:bits=4,outliers=0`` with values near 1.5–2
  bits fit 3.0 bits, which whole widths alone cannot reach (docs/FIDELITY.md).

A codec class may name parameter sets worth sweeping beside its defaults in a class attribute
``sweep_variants`` (e.g. TurboQuant's ``center=true,sink=4,norm_bits=8,unbiased=true``); a new codec joins
the presets by registering.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Iterator
from dataclasses import fields, is_dataclass

from kvtool.codecs import REGISTRY, Codec, Composed, codec_parameters, format_value, parse_spec
from kvtool.codecs.compose.heads import CLOSE, OPEN, SEP, PerHead
from kvtool.codecs.structure.crosslayer import PairCodec
from kvtool.errors import CodecError

QUANT_BITS = tuple(range(2, 9))
DEFAULT_BITS = (2, 3, 4)
PLAN_BITS = (1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8)  # a codec that takes whole widths only skips the halves
PRESETS = ("default", "quant", "all", "plan")


def short_spec(codec: Codec) -> str:
    """``name:key=value,...`` with ``bits`` and the parameters that differ from the defaults
    (``turboquant:bits=2``); it parses back to the same codec."""
    if isinstance(codec, PerHead):
        return OPEN + SEP.join(short_spec(p) for p in codec.parts) + CLOSE
    if isinstance(codec, Composed):
        return f"{short_spec(codec.head)}+{short_spec(codec.tail)}"
    if not is_dataclass(codec):
        return codec.spec()
    defaults = {f.name: f.default for f in fields(codec) if f.init}
    items = ",".join(f"{k}={format_value(v)}" for k, v in codec.params().items()
                     if k == "bits" or defaults.get(k) != v)
    return f"{codec.name}:{items}" if items else codec.name


def _canonical(text: str) -> str | None:
    try:
        return short_spec(parse_spec(text))
    except CodecError:  # a width or value this codec does not take
        return None


def _with(name: str, params: str) -> str:
    return f"{name}:{params}" if params else name


def _bits_specs(widths: Iterable[int]) -> Iterator[str | None]:
    for name, cls in sorted(REGISTRY.items()):
        if "bits" not in codec_parameters(cls):
            continue
        for extra in ("", *getattr(cls, "sweep_variants", ())):
            for bits in widths:
                yield _canonical(_with(name, ",".join(filter(None, (f"bits={bits}", extra)))))


def _recommended_specs(widths: Iterable[int]) -> Iterator[str | None]:
    for name, cls in sorted(REGISTRY.items()):
        if "bits" not in codec_parameters(cls):
            continue
        for extra in getattr(cls, "sweep_variants", ()) or ("",):
            for bits in widths:
                yield _canonical(_with(name, ",".join(filter(None, (f"bits={bits}", extra)))))


def _default_specs() -> Iterator[str | None]:
    for name in sorted(REGISTRY):
        if issubclass(REGISTRY[name], PairCodec):  # shares across layers only in compress, not per layer
            continue
        if parse_spec(name).reads_reconstruction():  # runs the model (kvzip): kvtool eval only, not a capture
            continue
        yield _canonical(name)


def _choice_specs() -> Iterator[str | None]:
    for name, cls in sorted(REGISTRY.items()):
        for param, tp in typing.get_type_hints(cls).items():
            if param in codec_parameters(cls) and typing.get_origin(tp) is typing.Literal:
                for value in typing.get_args(tp):
                    yield _canonical(f"{name}:{param}={value}")


def preset(name: str) -> list[str]:
    """The canonical specs of preset ``name`` (one of :data:`PRESETS`), without repeats, in a fixed order."""
    if name not in PRESETS:
        raise CodecError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    groups = {"quant": [_bits_specs(QUANT_BITS)], "default": [_default_specs(), _bits_specs(DEFAULT_BITS)]}
    groups["all"] = [*groups["quant"], *groups["default"], _choice_specs()]
    groups["plan"] = [_recommended_specs(PLAN_BITS), iter(["fp16"])]
    return list(dict.fromkeys(s for g in groups[name] for s in g if s is not None))


def expand(items: Iterable[str]) -> list[str]:
    """Specs and preset names → specs (presets in :func:`short_spec` form), in order, without repeats
    (two texts of the same codec count once).

    A word that is neither a preset nor a registered codec raises CodecError listing both.
    """
    out: list[str] = []
    for item in items:
        text = item.strip()
        if text in PRESETS:
            out += preset(text)
            continue
        bare = text.isidentifier() and text.lower() not in REGISTRY
        if bare:
            raise CodecError(f"unknown preset or codec {text!r}; presets: {', '.join(PRESETS)}; "
                             f"codecs: {', '.join(sorted(REGISTRY))}")
        out.append(text)
    unique: dict[str, str] = {}
    for text in out:
        unique.setdefault(parse_spec(text).spec(), text)
    return list(unique.values())
