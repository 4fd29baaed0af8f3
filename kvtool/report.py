"""What every JSON report kvtool writes has in common: a header naming its kind and its model, and
plain JSON values (never NaN or Infinity).

Each command that writes a report (``compress``, ``analyze``, ``eval``, ``sweep``, ``plan``, ``budget``)
starts it with :func:`header`; ``kvtool check`` reads ``kvtool_report`` to know what it is looking at and
``model``/``model_source`` to refuse a baseline of another model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kvtool._version import __version__

#: The field naming a report's kind, and the kinds kvtool writes.
KIND_FIELD = "kvtool_report"
REPORT_KINDS = ("compress", "analyze", "eval", "sweep", "plan", "budget", "check", "task", "lmeval")


def header(kind: str, *, model: str = "", model_source: str = "", model_architecture: str = "",
           **extra: Any) -> dict[str, Any]:
    """The first fields of a report of ``kind``: kind, kvtool version, model identity, then ``extra``."""
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown report kind {kind!r}; kinds: {', '.join(REPORT_KINDS)}")
    return {KIND_FIELD: kind, "kvtool_version": __version__, "model": model, "model_source": model_source,
            "model_architecture": model_architecture, **extra}


def store_header(kind: str, info: Any, **extra: Any) -> dict[str, Any]:
    """:func:`header` for a report about a kvtool file (``info``: a :class:`kvtool.store.StoreInfo`)."""
    return header(kind, model=info.model, model_source=info.model_source,
                  model_architecture=info.model_architecture, **extra)


def json_safe(obj: Any, digits: int | None = None) -> Any:
    """Plain-Python copy of ``obj`` for json.dump: numpy/torch scalars and arrays become numbers and lists,
    non-finite floats become None; with ``digits``, floats keep that many significant digits."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, digits) for v in obj]
    if isinstance(obj, np.ndarray) or type(obj).__name__ == "Tensor":
        return json_safe(obj.tolist(), digits)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if not math.isfinite(x):
            return None
        return float(f"{x:.{digits}g}") if digits is not None else x
    return obj
