"""The results store of a grid: a folder of Parquet files, one per finished cell.

Layout (version :data:`RESULTS_VERSION`)::

    RESULTS/
      _experiment.json          the experiment (its file's table, its cells) and the driver's versions
      cell-<cell_id>.parquet    one row: the cell's configuration, status/error, results, versions

Each part is written to a hidden temporary file beside it and renamed into place, so a cell is either
absent or complete: an interrupted grid keeps every finished row, and ``--resume`` skips them. The
folder reads as one table in pandas (``pd.read_parquet("RESULTS")``), pyarrow (``pq.read_table``) and
duckdb (``SELECT * FROM 'RESULTS/*.parquet'``): every part has :data:`SCHEMA` (names starting with ``_`` or
``.`` are skipped by their readers). The whole eval report of a cell is kept as JSON in ``report_json``.

pyarrow is the optional extra ``kvtool[grid]``; it is imported only here, lazily.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from kvtool.errors import InputError, raise_if_interrupted
from kvtool.grid.cells import EVAL_METHOD_FIELDS, EVAL_REPORT_FIELDS, TASK_METHOD_FIELDS
from kvtool.util import note_output, os_error_reason

RESULTS_VERSION = 1
MANIFEST = "_experiment.json"
PART_PREFIX = "cell-"
PART_SUFFIX = ".parquet"

#: (column, arrow type name) of every row; results columns are null in a failed row.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("cell_id", "string"), ("experiment", "string"), ("kind", "string"), ("status", "string"),
    ("error", "string"), ("model", "string"), ("model_path", "string"), ("model_dtype", "string"),
    ("device", "string"), ("trust_remote_code", "bool_"), ("text", "string"), ("text_path", "string"),
    ("task", "string"), ("context", "int64"), ("mode", "string"), ("method", "string"), ("keys", "string"),
    ("values", "string"), ("plan", "string"), ("plan_path", "string"), ("max_tokens", "int64"),
    *((f, "int64" if f == "tokens_scored" else "float64") for f in EVAL_METHOD_FIELDS),
    ("model_source", "string"), ("model_architecture", "string"), ("chunks", "int64"),
    ("tokens_in_text", "int64"), ("scored_per_chunk", "int64"), ("seconds_exact", "float64"),
    ("accuracy", "float64"), ("accuracy_low", "float64"), ("accuracy_high", "float64"), ("agreement", "float64"),
    ("exact_accuracy", "float64"), ("torch_dtype", "string"), ("worker", "string"), ("hostname", "string"),
    ("model_loaded", "bool_"), ("model_load_seconds", "float64"),
    ("wall_seconds", "float64"), ("started_at", "string"), ("finished_at", "string"),
    ("kvtool_version", "string"), ("transformers_version", "string"), ("torch_version", "string"),
    ("python_version", "string"), ("report_json", "string"),
)
# a field without a column would be dropped silently
assert {f for f, _ in COLUMNS} >= {*EVAL_REPORT_FIELDS, *TASK_METHOD_FIELDS}


def _pa() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("grid results need pyarrow: pip install 'kvtool[grid]'") from None
    return pa, pq


def schema() -> Any:
    pa, _ = _pa()
    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])


class ResultsStore:
    """A results folder: :meth:`finished` cells, :meth:`write` one row atomically, :meth:`rows` to read."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def part(self, cell_id: str) -> Path:
        return self.path / f"{PART_PREFIX}{cell_id}{PART_SUFFIX}"

    def parts(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return sorted(self.path.glob(f"{PART_PREFIX}*{PART_SUFFIX}"))

    def prepare(self, manifest: dict[str, Any], *, resume: bool, force: bool) -> None:
        """Create the folder; refuse to mix with an earlier run's rows unless ``resume`` (keep them) or
        ``force`` (delete them); write the manifest."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a results folder")
        old = self.parts()
        if old and not resume and not force:
            raise InputError(f"{self.path} already holds {len(old)} finished cell(s): pass --resume to skip "
                             f"them, or --force to start over")
        if force:
            for p in old:
                p.unlink()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot create the results folder ({exc.strerror or exc})") from None
        self._write_bytes(self.path / MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())

    def finished(self) -> dict[str, str]:
        """``{cell_id: status}`` of the rows on disk."""
        out = {}
        for p in self.parts():
            for row in self._read(p):
                out[row["cell_id"]] = row["status"]
        return out

    def write(self, row: dict[str, Any]) -> Path:
        """Write one row as its cell's part file (replacing an earlier try of the same cell), atomically."""
        pa, pq = _pa()
        full = {name: row.get(name) for name, _ in COLUMNS}
        table = pa.Table.from_pylist([full], schema=schema())
        target = self.part(row["cell_id"])
        tmp = self.path / f".{target.name}.{os.getpid()}.tmp"
        try:
            pq.write_table(table, tmp)
            raise_if_interrupted()
            os.replace(tmp, target)
            note_output(self.path)  # an interrupted command names the folder: its finished rows are kept
        except OSError as exc:

            raise InputError(f"{target}: cannot write the cell's row ({os_error_reason(exc)})") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return target

    def rows(self) -> list[dict[str, Any]]:
        """Every row on disk, in the order the cells finished."""
        rows = [r for p in self.parts() for r in self._read(p)]
        return sorted(rows, key=lambda r: (r.get("finished_at") or "", r["cell_id"]))

    def manifest(self) -> dict[str, Any]:
        p = self.path / MANIFEST
        return json.loads(p.read_text()) if p.is_file() else {}

    def _read(self, p: Path) -> list[dict[str, Any]]:
        _, pq = _pa()
        try:
            return pq.read_table(p).to_pylist()
        except Exception as exc:  # pyarrow raises its own ArrowInvalid for a damaged file
            raise InputError(f"{p}: not a readable Parquet part ({' '.join(str(exc).split())[:160]}); "
                             f"delete it to run that cell again") from None

    def _write_bytes(self, target: Path, data: bytes) -> None:
        tmp = self.path / f".{target.name}.{os.getpid()}.tmp"
        try:
            tmp.write_bytes(data)
            raise_if_interrupted()
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def read_results(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a results folder, or of one Parquet file (e.g. a merged copy)."""
    p = Path(path)
    if p.is_dir():
        return ResultsStore(p).rows()
    if p.suffix == PART_SUFFIX and p.is_file():
        return ResultsStore(p.parent)._read(p)
    raise InputError(f"{p}: not a grid results folder or Parquet file")
