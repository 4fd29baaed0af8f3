"""Running a grid: cells to free workers, grouped by model, each row written as soon as it arrives."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvtool.errors import KvtoolError
from kvtool.grid.cells import JOBS, Cell, require_kind, versions
from kvtool.grid.config import Experiment
from kvtool.grid.results import RESULTS_VERSION, ResultsStore


class Executor(Protocol):
    size: int

    def start(self) -> None: ...
    def submit(self, slot: int, cell: Cell) -> None: ...
    def next_result(self) -> tuple[int, dict[str, Any]]: ...
    def close(self) -> None: ...


#: ``progress(row, done, total)`` after each finished cell.
Progress = Callable[[dict[str, Any], int, int], None]


@dataclass
class GridSummary:
    results: str
    cells: int
    skipped: int  # finished before (--resume)
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)


def plan_cells(experiment: Experiment, store: ResultsStore, *, resume: bool,
               retry_failed: bool = False) -> tuple[list[Cell], list[Cell]]:
    """(cells to run, cells skipped as finished). Refuses kinds without a runner before anything runs."""
    cells = experiment.cells()
    for kind in sorted({c.kind for c in cells}):
        require_kind(kind)
    done = store.finished() if resume else {}
    skipped = [c for c in cells if c.cell_id in done and (done[c.cell_id] == "ok" or not retry_failed)]
    skip = {c.cell_id for c in skipped}
    return [c for c in cells if c.cell_id not in skip], skipped


def manifest(experiment: Experiment) -> dict[str, Any]:
    return {"kvtool_results": "grid", "version": RESULTS_VERSION, "experiment": experiment.name,
            "source": experiment.source, "config": experiment.raw, "driver_versions": versions(),
            "cells": [{"cell_id": c.cell_id, **c.config()} for c in experiment.cells()],
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_grid(experiment: Experiment, store: ResultsStore, executor: Executor, *, resume: bool = False,
             force: bool = False, retry_failed: bool = False, progress: Progress | None = None) -> GridSummary:
    """Run every cell not finished yet and append its row to ``store`` as it finishes.

    A model is loaded once per worker while that worker has cells of it: a free worker takes the next cell
    of the model it holds, else of the model with most cells left that no other worker holds, else of the
    one with most cells left. Ctrl-C (or SIGTERM in the CLI) stops the workers; finished rows stay.
    """
    todo, skipped = plan_cells(experiment, store, resume=resume, retry_failed=retry_failed)
    store.prepare(manifest(experiment), resume=resume, force=force)
    summary = GridSummary(results=str(store.path), cells=len(todo) + len(skipped), skipped=len(skipped))
    started = time.perf_counter()
    if not todo:
        return summary
    queues: dict[Any, list[Cell]] = {}
    for c in todo:
        queues.setdefault(c.model.key, []).append(c)
    holding: dict[int, Any] = {}
    busy: set[int] = set()

    def assign(slot: int) -> None:
        key = holding.get(slot)
        if not queues.get(key):
            left = {k: len(q) for k, q in queues.items() if q}
            if not left:
                return
            held = {holding[s] for s in busy}
            key = max(left, key=lambda k: (k not in held, left[k]))
        executor.submit(slot, queues[key].pop(0))
        holding[slot] = key
        busy.add(slot)

    executor.start()
    try:
        for slot in range(executor.size):
            assign(slot)
        while busy:
            slot, row = executor.next_result()
            busy.discard(slot)
            store.write(row)
            if row["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append({"cell_id": row["cell_id"], "error": row["error"] or ""})
            if progress is not None:
                progress(row, summary.ok + summary.failed, len(todo))
            assign(slot)
    finally:
        executor.close()
    summary.seconds = time.perf_counter() - started
    return summary


def dry_run(experiment: Experiment, store: ResultsStore | None = None) -> list[dict[str, Any]]:
    """The cells, each with its state: ``finished ok`` / ``finished failed`` (in ``store``) or ``to run``,
    and ``problem`` when its input already fails the checks made before a model loads."""
    done = store.finished() if store is not None else {}
    out = []
    for c in experiment.cells():
        problem = None
        try:
            require_kind(c.kind)
            JOBS[c.kind].check(c)
        except KvtoolError as exc:
            problem = " ".join(str(exc).split())
        state = f"finished {done[c.cell_id]}" if c.cell_id in done else "to run"
        out.append({"cell_id": c.cell_id, **c.config(), "state": state, "problem": problem})
    return out
