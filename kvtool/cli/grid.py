"""`kvtool grid`: run a TOML experiment (models × texts/tasks × contexts × modes × methods) into one results
folder, with local worker processes or Ray actors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kvtool.cli._app import app, console, err_console, print_table, run_guarded, write_json


@app.command("grid")
def grid_command(
    experiment: Annotated[Path, typer.Argument(help="The experiment file (TOML; format in docs/GRID.md).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Results folder: one Parquet file per "
                                                "finished cell (default: EXPERIMENT with suffix .results).")]
    = None,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Cells run at once: 1 runs them in this "
                                         "process; N > 1 starts N local worker processes (or N Ray actors "
                                         "with --ray). Each keeps its model loaded between cells.")] = 1,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads per local worker (default: "
                                                "torch's choice with 1 worker, CPUs / N with N). On a machine "
                                                "shared with other jobs, 1 thread can be much faster.")] = None,
    ray: Annotated[str | None, typer.Option("--ray", help="Run the cells as Ray actors: 'local' starts a Ray "
                                            "instance here, 'auto' joins this machine's cluster (RAY_ADDRESS "
                                            "or `ray start`), or a cluster ADDRESS (ray://head:10001). Needs "
                                            "kvtool\\[ray].")] = None,
    ray_cpus: Annotated[float, typer.Option("--ray-cpus", help="CPUs each Ray actor reserves.")] = 1.0,
    ray_gpus: Annotated[float, typer.Option("--ray-gpus", help="GPUs each Ray actor reserves (0.5 shares a "
                                            "GPU between two actors). Set the models' device = \"cuda\" "
                                            "in the experiment to use it.")] = 0.0,
    ray_memory: Annotated[str | None, typer.Option("--ray-memory", help="Memory each Ray actor reserves, "
                                                   "e.g. 4GiB (Ray places actors where it fits).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells (and the ones already finished "
                                          "in the results folder) without running anything.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip the cells already finished in the results "
                                         "folder (ok or failed) and run the rest.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="With --resume: run the failed cells "
                                               "again too.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete the rows of an earlier run in the results "
                                        "folder and start over.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write a summary (cells run, failed, "
                                                   "errors) to this file ('-' for stdout).")] = None,
) -> None:
    """Run every cell of an experiment; each finished cell's row is appended to the results at once.

    A failed cell (bad spec, missing text, out of memory, model error) is recorded with its one-line error
    and the others go on; the command then exits 1. Ctrl-C keeps every finished row: run it again with
    --resume. Read the results with pandas (pd.read_parquet(RESULTS)) or render them with `kvtool report`.
    """

    def work() -> None:
        from kvtool.errors import InputError
        from kvtool.grid import ResultsStore, load_experiment, run_grid
        from kvtool.grid import dry_run as list_cells

        if retry_failed and not resume:
            raise InputError("--retry-failed goes with --resume")
        if resume and force:
            raise InputError("--resume keeps the earlier rows and --force deletes them: give one")
        executor = None if dry_run else _executor(workers, threads, ray, ray_cpus, ray_gpus, ray_memory)
        exp = load_experiment(experiment)
        store = ResultsStore(output or experiment.with_suffix(".results"))
        quiet = json_path is not None and str(json_path) == "-"
        if dry_run:
            cells = list_cells(exp, store)
            write_json({"kvtool_grid": "dry-run", "experiment": exp.name, "cells": cells}, json_path)
            if not quiet:
                _render_cells(cells)
            return
        summary = run_grid(exp, store, executor, resume=resume, force=force, retry_failed=retry_failed,
                           progress=None if quiet else _progress)
        write_json(vars(summary), json_path)
        if not quiet:
            console.print(f"{summary.results}: {summary.ok} cell(s) ok, {summary.failed} failed, "
                          f"{summary.skipped} finished before; {summary.seconds:.1f} s", highlight=False)
            for f in summary.failures:
                err_console.print(f"failed {f['cell_id']}: {f['error']}")
        if summary.failed:
            raise typer.Exit(1)

    run_guarded(work)


def _executor(workers: int, threads: int | None, ray: str | None, cpus: float, gpus: float,
              memory: str | None) -> Any:
    from kvtool.errors import InputError
    from kvtool.grid import InlineExecutor, LocalExecutor, RayExecutor

    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    if ray is None:
        if gpus or memory or cpus != 1.0:
            raise InputError("--ray-cpus, --ray-gpus and --ray-memory go with --ray")
        return InlineExecutor(threads) if workers == 1 else LocalExecutor(workers, threads)
    if threads is not None:
        raise InputError("--threads is for local workers; a Ray actor uses its --ray-cpus")
    if cpus <= 0 or gpus < 0:
        raise InputError(f"--ray-cpus must be > 0 and --ray-gpus >= 0, got {cpus:g} and {gpus:g}")
    from kvtool.grid.executors import parse_memory

    mem = parse_memory(memory) if memory is not None else None
    return RayExecutor(workers, ray, num_cpus=cpus, num_gpus=gpus, memory=mem)


def _progress(row: dict[str, Any], done: int, total: int) -> None:
    what = row["text"] if row["kind"] == "eval" else row["task"]
    tail = (f"KLD {row['kld_mean']:.5f} at {row['bits_per_element']:.3f} bits, {row['wall_seconds']:.1f} s"
            if row["status"] == "ok" else f"failed: {row['error']}")
    err_console.print(f"[{done}/{total}] {row['model']} · {what} · {row['context']} · {row['mode']} · "
                      f"{row['method']}: {tail}")


def _render_cells(cells: list[dict[str, Any]]) -> None:
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for col in ("cell", "model", "text/task", "context", "mode", "method", "state"):
        table.add_column(col, no_wrap=col != "state")
    for c in cells:
        state = c["state"] + (f" — will fail: {c['problem']}" if c["problem"] else "")
        table.add_row(c["cell_id"], c["model"], c["text"] or c["task"], str(c["context"]), c["mode"],
                      c["method"], state)
    print_table(table)
    todo = sum(c["state"] == "to run" for c in cells)
    console.print(f"{len(cells)} cell(s), {todo} to run", highlight=False)
