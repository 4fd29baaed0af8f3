"""`kvtool analyze`: where the cache is redundant, per layer and head."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvtool.cli._app import app, console, layer_progress, run_guarded, write_json


@app.command()
def analyze(
    path: Annotated[Path, typer.Argument(help="A kvtool cache file (from `kvtool capture`).")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every figure as JSON to this file "
                                                   "('-' for stdout, no table).")] = None,
    plots: Annotated[Path | None, typer.Option("--plots", help="Write PNG figures into this directory "
                                               "(created if missing).")] = None,
    layers: Annotated[str, typer.Option("--layers", help="Layers to analyse, e.g. '0-5,29' (default all).")]
    = "all",
    sequence: Annotated[int, typer.Option("--sequence", help="Which captured sequence to analyse.")] = 0,
) -> None:
    """Where the cache is redundant — rank, outlier channels, attention sinks/locality, cross-layer
    similarity — with a compression recommendation per layer."""

    def work() -> None:
        from kvtool.analysis import analyze as run
        from kvtool.analysis.render import render_analysis

        quiet = json_path is not None and str(json_path) == "-"
        with layer_progress("analysing", quiet) as progress:
            result = run(path, layers=layers, plots_dir=plots, progress=progress, sequence=sequence)
        write_json(result, json_path)
        if not quiet:
            render_analysis(result, console)

    run_guarded(work)
