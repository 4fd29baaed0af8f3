"""One cell of a grid and the code that runs it in a worker.

A :class:`Cell` is plain data (it crosses process and Ray boundaries by pickle). A :class:`Worker` is what
each local process or Ray actor holds: the one model it has loaded, reused while the cells it is given
name the same model (the scheduler gives a worker cells of its model first). :meth:`Worker.run` never
raises for a bad cell: a :class:`~kvtool.errors.KvtoolError` (bad spec, missing text, context too long),
an out-of-memory error or any other exception becomes a ``failed`` row with a one-line error.

Job kinds: :data:`JOBS` maps a cell's ``kind`` to ``job(cell, loaded) -> fields``. ``eval`` is here; a
``task`` kind plugs in with one function registered under ``"task"`` (see :func:`register_job`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from kvtool.errors import InputError, KvtoolError


@dataclass(frozen=True)
class ModelRef:
    """A model of the grid: ``spec`` as written, ``path`` as loaded (a local path resolved beside the file)."""

    spec: str
    path: str
    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False

    @property
    def key(self) -> tuple[str, str, str, bool]:
        """Cells with equal keys share one loaded model."""
        return (self.path, self.dtype, self.device, self.trust_remote_code)


#: The fields of a cell that make its identity (its ``cell_id``): what was asked, as written.
ID_FIELDS = ("kind", "model", "model_dtype", "device", "trust_remote_code", "text", "task", "context", "mode",
             "method", "keys", "values", "plan", "max_tokens")


@dataclass(frozen=True)
class Cell:
    """One job of the grid: a model, a text (or a task), a context, a mode and one method."""

    experiment: str
    kind: str  # "eval" | "task"
    model: ModelRef
    text: str | None
    text_path: str | None
    task: str | None
    context: int
    mode: str
    method: str  # the method's label
    keys: str | None
    values: str | None
    plan: str | None
    plan_path: str | None
    max_tokens: int | None

    def config(self) -> dict[str, Any]:
        """The cell's configuration as a flat dict (the results' configuration columns)."""
        d = asdict(self)
        m = d.pop("model")
        return {"experiment": d.pop("experiment"), "kind": d.pop("kind"), "model": m["spec"],
                "model_path": m["path"], "model_dtype": m["dtype"], "device": m["device"],
                "trust_remote_code": m["trust_remote_code"], **d}

    @property
    def cell_id(self) -> str:
        """A stable id: a hash of :data:`ID_FIELDS` (the same cell of an edited grid keeps its id)."""
        c = self.config()
        blob = json.dumps({k: c[k] for k in ID_FIELDS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        what = f"text {self.text}" if self.kind == "eval" else f"task {self.task}"
        return f"{self.model.spec} · {what} · context {self.context} · {self.mode} · {self.method}"


Job = Callable[[Cell, Any, Any], dict[str, Any]]
Check = Callable[[Cell], Any]


@dataclass(frozen=True)
class JobKind:
    """``check(cell)`` runs before the model loads (bad input fails fast) and returns what ``run`` needs;
    ``run(cell, loaded, checked)`` returns the row's result fields."""

    check: Check
    run: Job


JOBS: dict[str, JobKind] = {}


def register_job(kind: str, check: Check, run: Job) -> None:
    """Make ``kind`` cells runnable (``"task"``: the tasks module registers its runner here)."""
    JOBS[kind] = JobKind(check, run)


def require_kind(kind: str) -> None:
    """InputError when no runner is registered for ``kind``."""
    if kind in JOBS:
        return
    if kind == "task":
        raise InputError("task cells need kvtool.tasks (`kvtool eval --task`), which this kvtool lacks; "
                         "remove 'tasks' from the experiment or install a kvtool that has it")
    raise InputError(f"no runner for cells of kind {kind!r}; kinds: {', '.join(JOBS)}")


# ------------------------------------------------------------------------------------------------ eval


def _eval_check(cell: Cell) -> tuple[Any, str]:
    """The cell's assignment (or plan) and the text's name, checked as `kvtool eval` checks them before
    it loads the model."""
    from kvtool.capture import read_text

    if cell.plan_path is not None:
        from kvtool.codecs.planfile import load_plan

        method: Any = load_plan(cell.plan_path)
        a = method.assignment()
    else:
        from kvtool.codecs import parse_pair
        from kvtool.codecs.assignment import Assignment

        parse_pair(None, cell.keys, cell.values)
        method = a = Assignment.of(cell.keys or "", cell.values or "")
    if cell.mode == "streaming":  # a selector that cannot stream
        for layer in {0, *a.layers}:
            for role in ("keys", "values"):
                a.codec(layer, role).streaming_form()
    return method, read_text(cell.text_path or "").source


def _eval_run(cell: Cell, loaded: Any, checked: tuple[Any, str]) -> dict[str, Any]:
    """The cell's `kvtool eval` report through the same library calls the command makes."""
    from kvtool.evaluate import check_context, evaluate, tokenize_text

    method, source = checked
    tokens = tokenize_text(loaded, _path(cell.text_path), cell.max_tokens)
    check_context(loaded, tokens, cell.context)
    report = evaluate(loaded, tokens, [method], mode=cell.mode, context=cell.context, source=source,
                      labels=[cell.method])
    return eval_fields(report)


def _path(p: str | None) -> Any:
    from pathlib import Path

    return Path(p or "")


#: Per-method numbers of an eval report copied into a row (``kvtool.metrics.summarize_next_token`` plus size).
EVAL_METHOD_FIELDS = (
    "tokens_scored", "ppl_exact", "ppl_exact_stderr", "ppl_compressed", "ppl_compressed_stderr", "ln_ppl_ratio",
    "ln_ppl_ratio_stderr", "delta_ppl_pct", "delta_ppl_pct_stderr", "kld_mean", "kld_stderr", "kld_median",
    "kld_p90", "kld_p99", "kld_max", "top1_agreement", "top1_agreement_stderr", "rms_dp", "rms_dp_stderr",
    "mean_dp", "bits_per_element", "bits_per_element_keys", "bits_per_element_values", "cache_bytes_exact",
    "cache_bytes_compressed", "seconds")
#: Report-level fields copied into a row.
EVAL_REPORT_FIELDS = ("model_source", "model_architecture", "chunks", "tokens_in_text", "scored_per_chunk",
                      "seconds_exact")


def eval_fields(report: dict[str, Any]) -> dict[str, Any]:
    """A row's result fields from an eval report of one method (the whole report is kept as JSON too)."""
    m = report["methods"][0]
    out = {k: m.get(k) for k in EVAL_METHOD_FIELDS}
    out.update({k: report.get(k) for k in EVAL_REPORT_FIELDS})
    out["torch_dtype"] = report.get("model_dtype")
    out["report_json"] = json.dumps(report, sort_keys=True)
    return out


register_job("eval", _eval_check, _eval_run)


# ------------------------------------------------------------------------------------------------ task
# A task cell runs `kvtool eval --task` (kvtool.tasks, /work/notes/task_report_schema.md) with the cell's one
# method; its runner returns task_fields(report). Registered by kvtool.tasks: register_job("task", ...).

#: Headline fields of a task report's (only) method copied into a row; the exact cache's accuracy beside.
TASK_METHOD_FIELDS = ("accuracy", "accuracy_low", "accuracy_high", "agreement", "bits_per_element", "seconds")


def task_fields(report: dict[str, Any]) -> dict[str, Any]:
    """A row's result fields from a task report (``kvtool_report: "task"``) of one method."""
    m = report["methods"][0]
    out = {k: m.get(k) for k in TASK_METHOD_FIELDS}
    out.update(exact_accuracy=report.get("exact", {}).get("accuracy"), model_source=report.get("model_source"),
               model_architecture=report.get("model_architecture"), torch_dtype=report.get("model_dtype"),
               report_json=json.dumps(report, sort_keys=True))
    return out


# ---------------------------------------------------------------------------------------------- worker


def versions() -> dict[str, str]:
    """The versions a row was computed with (the worker's, which on a cluster may differ from the driver's)."""
    from importlib.metadata import PackageNotFoundError, version

    from kvtool import __version__

    out = {"kvtool_version": __version__, "python_version": platform.python_version()}
    for pkg in ("transformers", "torch"):
        try:
            out[f"{pkg}_version"] = version(pkg)
        except PackageNotFoundError:
            out[f"{pkg}_version"] = ""
    return out


def one_line(exc: BaseException) -> str:
    """A one-line description of a cell's failure."""
    text = " ".join(str(exc).split())
    if isinstance(exc, KvtoolError):
        return text
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return f"out of memory ({type(exc).__name__}: {text[:200]})"
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Worker:
    """Runs cells; keeps the last model it loaded (``name``: how rows name this worker)."""

    def __init__(self, name: str = "") -> None:
        self.name = name or f"{socket.gethostname()}:{id(self)}"
        self._key: tuple[Any, ...] | None = None
        self._loaded: Any = None
        self.loads = 0

    def model(self, ref: ModelRef) -> Any:
        """The loaded model of ``ref``: the one held if it is the same, else a fresh load (the old one freed)."""
        if self._key != ref.key:
            from kvtool.models import load_model

            self._loaded, self._key = None, None  # free the old model before the new one loads
            self._loaded = load_model(ref.path, dtype=ref.dtype, device=ref.device,
                                      trust_remote_code=ref.trust_remote_code)
            self._key = ref.key
            self.loads += 1
        return self._loaded

    def run(self, cell: Cell) -> dict[str, Any]:
        """The cell's row: its configuration, ``status`` ok or failed (with ``error``), results, versions."""
        started = time.time()
        row: dict[str, Any] = {"cell_id": cell.cell_id, **cell.config(), "worker": self.name,
                               "hostname": socket.gethostname(), "model_loaded": False, **versions()}
        load_seconds = 0.0
        try:
            require_kind(cell.kind)
            job = JOBS[cell.kind]
            checked = job.check(cell)
            t0, loads = time.perf_counter(), self.loads
            loaded = self.model(cell.model)
            load_seconds = time.perf_counter() - t0
            row["model_loaded"] = self.loads > loads
            row.update(job.run(cell, loaded, checked))
            row.update(status="ok", error=None)
        except Exception as exc:  # a KvtoolError, an out-of-memory error or a bug: the cell fails, not the grid
            row.update(status="failed", error=one_line(exc))
            if type(exc).__name__ == "OutOfMemoryError":
                self._loaded, self._key = None, None  # a model that ran out of memory is reloaded next time
        row.update(model_load_seconds=load_seconds, wall_seconds=time.time() - started,
                   started_at=_iso(started), finished_at=_iso(time.time()))
        return row


def failed_row(cell: Cell, error: str, worker: str = "") -> dict[str, Any]:
    """The row of a cell whose worker died (the process was killed, the Ray actor was lost)."""
    now = time.time()
    return {"cell_id": cell.cell_id, **cell.config(), "worker": worker, "hostname": "", "status": "failed",
            "error": error, "model_load_seconds": 0.0, "wall_seconds": 0.0, "started_at": _iso(now),
            "finished_at": _iso(now), **versions()}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
