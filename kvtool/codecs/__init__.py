"""KV-cache codecs: the registry and the one spec parser.

A spec is ``name`` or ``name:key=value,key=value``; ``+`` composes stages, left to right: every codec but
the last must be a :class:`Stage` (a token selector, a low-rank projection), whose payload the next one
codes — ``snapkv:keep=0.5+kivi:bits=4`` (the kept rows), ``lowrank:rank=24+turboquant:bits=4`` (the rank-24
coefficients, so TurboQuant's head_dim is 24), ``snapkv:keep=0.5+lowrank:rank=32+turboquant:bits=4``.
Every stage's stored bytes are counted. Values are coerced to the codec dataclass's field types. A value
in square brackets is taken whole, so it may hold specs with their own ``,`` and ``+``
(``age:bands=[0-128:fp16;128-:turboquant:bits=3,center=true]``).

Adding a codec: write ``kvtool/codecs/<family>/<module>.py`` (``quant/``, ``select/``, ``structure/`` or
``compose/``; each family's ``__init__`` says what belongs there) with a ``@register``-decorated dataclass subclass of
:class:`Codec`, add the module name to ``_MODULES`` below, and add a row to the table in
``tests/test_codec_contract.py``. Outside kvtool, a package adds codecs through the entry-point group
``kvtool.codecs`` (:data:`PLUGIN_GROUP`; ``examples/kvtool-codec-example``); :data:`ORIGINS` says where
each codec came from, and a plugin that fails to load is skipped with one warning line on stderr.
"""

from __future__ import annotations

import importlib
import sys

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
from kvtool.codecs.spec import codec_parameters, parse_pair, parse_spec, split_top

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
    "split_top",
]

#: Modules imported (in this order) to fill REGISTRY (and SPEC_FORMS: ``heads[...]``), by family. A module
#: that does not exist yet is skipped.
_MODULES = ["compose.heads",
            "quant.none", "quant.fp16", "quant.fp8", "quant.uniform", "quant.kivi", "quant.turboquant", "quant.qjl",
            "quant.polarquant",
            "select.streaming", "select.h2o", "select.snapkv", "select.tova", "select.knorm", "select.expected",
            "select.kvzip", "select.drop",
            "compose.age", "compose.salient",
            "structure.minicache", "structure.lowrank", "structure.pq", "structure.vq",
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
