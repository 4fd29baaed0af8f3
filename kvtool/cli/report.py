"""`kvtool report`: a static HTML page from grid results, eval and compress reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvtool.cli._app import app, console, run_guarded, write_json


@app.command("report")
def report_command(
    inputs: Annotated[list[Path], typer.Argument(help="Grid results folders (or their .parquet files), eval "
                                                 "JSON reports, compress JSON reports, in any mix.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML page to write (self-contained: "
                                         "plotly.js is inlined, it opens offline).")] = Path("report.html"),
    title: Annotated[str, typer.Option("--title", help="The page's title.")] = "kvtool report",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write what the page shows (rows, models, "
                                                   "reports) to this file ('-' for stdout).")] = None,
) -> None:
    """Render results as one static HTML page: per model a table and the KLD-vs-stored-bits frontier, task
    heatmaps (depth × length) when task rows are present, the per-layer error profile of each compress
    report, and the failed cells with their errors. Needs kvtool\\[grid] (plotly, pyarrow)."""

    def work() -> None:
        from kvtool.grid.html import write_report

        summary = write_report(inputs, output, title)
        write_json(summary, json_path)
        if json_path is None or str(json_path) != "-":
            console.print(f"{output}: {summary['ok']} row(s) ok, {summary['failed']} failed, "
                          f"{len(summary['models'])} model(s), {summary['compress_reports']} compress report(s)",
                          highlight=False)

    run_guarded(work)
