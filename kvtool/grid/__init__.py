"""Experiments at scale: a TOML grid of models × texts (or tasks) × contexts × modes × methods.

Library first (the ``kvtool grid`` and ``kvtool report`` commands only wire these)::

    from kvtool.grid import LocalExecutor, ResultsStore, load_experiment, run_grid
    exp = load_experiment("experiment.toml")
    summary = run_grid(exp, ResultsStore("experiment.results"), LocalExecutor(2), resume=True)

Modules: :mod:`~kvtool.grid.config` (the file format, validation, cell expansion), :mod:`~kvtool.grid.cells`
(a cell, the per-kind job runners, the worker that keeps its model), :mod:`~kvtool.grid.results` (the Parquet
results folder), :mod:`~kvtool.grid.executors` (inline, local processes, Ray actors), :mod:`~kvtool.grid.run`
(the scheduler), :mod:`~kvtool.grid.html` (the static HTML report).
"""

from __future__ import annotations

from kvtool.grid.cells import JOBS, Cell, ModelRef, Worker, register_job
from kvtool.grid.config import Experiment, Method, load_experiment, parse_experiment
from kvtool.grid.executors import InlineExecutor, LocalExecutor, RayExecutor
from kvtool.grid.results import ResultsStore, read_results
from kvtool.grid.run import GridSummary, dry_run, run_grid

__all__ = ["JOBS", "Cell", "Experiment", "GridSummary", "InlineExecutor", "LocalExecutor", "Method", "ModelRef",
           "RayExecutor", "ResultsStore", "Worker", "dry_run", "load_experiment", "parse_experiment",
           "read_results", "register_job", "run_grid"]
