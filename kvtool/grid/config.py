"""The experiment file: a TOML table of axes whose product is the grid's cells.

Format (every key but ``models`` and ``texts``/``tasks`` optional)::

    name = "codecs-small"                  # default: the file's stem
    models = ["default", "models/tiny"]    # a spec as `--model` takes it, or a table {spec = "...",
                                           #   dtype = "float32", device = "cpu", trust_remote_code = false}
    texts = ["../samples/gpl-3.0.txt"]     # UTF-8 files; relative paths are relative to this file's folder
    # tasks = ["passkey"]                  # task cells (`kvtool eval --task`), instead of or beside texts
    contexts = [512]                       # `--context` of each cell (default [512])
    modes = ["prefill"]                    # prefill | streaming (default ["prefill"])
    methods = ["turboquant:bits=3",        # a codec spec for keys and values, or a table
               {keys = "turboquant:bits=4", values = "kivi:bits=2"}]
    plans = ["plans/p3.json"]              # plan files from `kvtool plan`, scored like methods
    max_tokens = 2048                      # `--max-tokens` of every text cell
    model_dtype = "auto"                   # default dtype/device/trust_remote_code of every model
    device = "cpu"

The cells are models × (texts + tasks) × contexts × modes × (methods + plans). Structure errors (a wrong
type, an unknown key, an empty axis) are one :class:`~kvtool.errors.InputError` line here, before anything
runs; a codec spec or a text file that turns out unusable is a *cell* failure, recorded in the results
with its one-line error while the other cells run.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.grid.cells import Cell, ModelRef

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

KEYS = ("name", "models", "texts", "tasks", "contexts", "modes", "methods", "plans", "max_tokens",
        "model_dtype", "device", "trust_remote_code")
MODEL_KEYS = ("spec", "dtype", "device", "trust_remote_code")
METHOD_KEYS = ("keys", "values", "method", "label")
MODES = ("prefill", "streaming")
DEFAULT_CONTEXTS = (512,)


@dataclass(frozen=True)
class Method:
    """One point of the methods axis: codec specs for keys and values, or a plan file."""

    label: str
    keys: str | None = None
    values: str | None = None
    plan: str | None = None  # as written in the experiment file
    plan_path: str | None = None  # resolved


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment file. :meth:`cells` expands it; the order is the file's order, models outermost."""

    name: str
    models: tuple[ModelRef, ...]
    texts: tuple[tuple[str, str], ...]  # (as written, resolved path)
    tasks: tuple[str, ...]
    contexts: tuple[int, ...]
    modes: tuple[str, ...]
    methods: tuple[Method, ...]
    max_tokens: int | None = None
    source: str = ""  # the experiment file
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # the file's table, for the manifest

    def cells(self) -> list[Cell]:
        inputs = [("eval", t, None) for t in self.texts] + [("task", None, k) for k in self.tasks]
        out = []
        for model, (kind, text, task), context, mode, method in itertools.product(
                self.models, inputs, self.contexts, self.modes, self.methods):
            out.append(Cell(
                experiment=self.name, kind=kind, model=model, text=text[0] if text else None,
                text_path=text[1] if text else None, task=task, context=context, mode=mode, method=method.label,
                keys=method.keys, values=method.values, plan=method.plan, plan_path=method.plan_path,
                max_tokens=self.max_tokens))
        return out


def load_experiment(path: Path | str) -> Experiment:
    """Read and validate an experiment file; one-line :class:`InputError` for anything malformed."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such experiment file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{p}: not valid TOML ({' '.join(str(exc).split())})") from None
    return parse_experiment(data, base=p.parent, name=p.stem, source=str(p))


def parse_experiment(data: dict[str, Any], *, base: Path | str = ".", name: str = "experiment",
                     source: str = "") -> Experiment:
    """An :class:`Experiment` from the TOML table ``data``; relative paths are taken from ``base``."""
    where = source or "experiment"
    base = Path(base)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(KEYS)}")
    defaults = {"dtype": _str(data, "model_dtype", where, "auto"), "device": _str(data, "device", where, "cpu"),
                "trust_remote_code": _bool(data, "trust_remote_code", where, False)}
    models = tuple(_model(m, base, defaults, where) for m in _list(data, "models", where, required=True))
    texts = tuple((str(t), str(_resolve(base, t))) for t in _strings(data, "texts", where))
    tasks = tuple(_strings(data, "tasks", where))
    if not texts and not tasks:
        raise InputError(f"{where}: give 'texts' (files to score) or 'tasks' (task names), or both")
    contexts = tuple(_ints(data, "contexts", where)) or DEFAULT_CONTEXTS
    modes = tuple(_strings(data, "modes", where)) or ("prefill",)
    for mode in modes:
        if mode not in MODES:
            raise InputError(f"{where}: modes: each must be one of {', '.join(MODES)}, got {mode!r}")
    methods = [_method(m, where) for m in _list(data, "methods", where)]
    methods += [Method(label=f"plan {p}", plan=p, plan_path=str(_resolve(base, p)))
                for p in _strings(data, "plans", where)]
    if not methods:
        raise InputError(f"{where}: give 'methods' (codec specs) or 'plans' (plan files), or both")
    labels = [m.label for m in methods]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise InputError(f"{where}: method {dup!r} appears twice")
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise InputError(f"{where}: max_tokens must be a whole number >= 1, got {max_tokens!r}")
    return Experiment(name=_str(data, "name", where, name), models=models, texts=texts, tasks=tasks,
                      contexts=contexts, modes=modes, methods=tuple(methods), max_tokens=max_tokens,
                      source=source, raw=dict(data))


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _list(data: dict[str, Any], key: str, where: str, required: bool = False) -> list[Any]:
    value = data.get(key, [])
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise InputError(f"{where}: {key} must be a list, got {type(value).__name__}")
    if required and not value:
        raise InputError(f"{where}: {key} must list at least one entry")
    return value


def _strings(data: dict[str, Any], key: str, where: str) -> list[str]:
    out = _list(data, key, where)
    for x in out:
        if not isinstance(x, str) or not x.strip():
            raise InputError(f"{where}: {key}: each entry must be a non-empty string, got {x!r}")
    return out


def _ints(data: dict[str, Any], key: str, where: str) -> list[int]:
    value = data.get(key, [])
    out = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(out, list) or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in out):
        raise InputError(f"{where}: {key} must be a list of whole numbers >= 1, got {value!r}")
    return out


def _str(data: dict[str, Any], key: str, where: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _bool(data: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise InputError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _model(m: Any, base: Path, defaults: dict[str, Any], where: str) -> ModelRef:
    if isinstance(m, str):
        m = {"spec": m}
    if not isinstance(m, dict):
        raise InputError(f"{where}: models: each entry must be a spec string or a table, got {m!r}")
    unknown = sorted(set(m) - set(MODEL_KEYS))
    if unknown:
        raise InputError(f"{where}: models: unknown key {unknown[0]!r}; allowed: {', '.join(MODEL_KEYS)}")
    spec = m.get("spec")
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"{where}: models: each table needs spec = \"...\" (a model spec), got {spec!r}")
    local = _resolve(base, spec)  # a folder or .gguf beside the experiment file
    path = str(local) if spec != "default" and local.exists() else spec
    sub = {**defaults, **{k: v for k, v in m.items() if k != "spec"}}
    return ModelRef(spec=spec, path=path, dtype=_str(sub, "dtype", where, "auto"),
                    device=_str(sub, "device", where, "cpu"),
                    trust_remote_code=_bool(sub, "trust_remote_code", where, False))


def _method(m: Any, where: str) -> Method:
    if isinstance(m, str):
        if not m.strip():
            raise InputError(f"{where}: methods: an entry is empty")
        return Method(label=m.strip(), keys=m.strip(), values=m.strip())
    if not isinstance(m, dict):
        raise InputError(f"{where}: methods: each entry must be a codec spec or a table, got {m!r}")
    unknown = sorted(set(m) - set(METHOD_KEYS))
    if unknown:
        raise InputError(f"{where}: methods: unknown key {unknown[0]!r}; allowed: {', '.join(METHOD_KEYS)}")
    if any(not isinstance(v, str) or not v.strip() for v in m.values()):
        raise InputError(f"{where}: methods: every value must be a non-empty string, got {m!r}")
    keys = (m.get("keys") or m.get("method") or "").strip()
    values = (m.get("values") or m.get("method") or "").strip()
    if not keys or not values:
        raise InputError(f"{where}: methods: a table needs method = SPEC, or keys = SPEC and values = SPEC")
    label = m.get("label") or (keys if keys == values else f"K {keys} | V {values}")
    return Method(label=label, keys=keys, values=values)
