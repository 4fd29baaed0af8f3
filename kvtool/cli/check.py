"""`kvtool check`: a CI gate on any kvtool JSON report (exit 0 pass, 1 a check failed, 2 bad input)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kvtool.cli._app import app, console, run_guarded, write_json


@app.command()
def check(
    report: Annotated[Path, typer.Argument(help="A kvtool JSON report (compress, analyze, eval, sweep, plan, "
                                           "budget --json).")],
    maxima: Annotated[list[str] | None, typer.Option(
        "--max", help="KEY=NUMBER: fail when the value at KEY is above NUMBER. KEY is a dotted path; '*' takes "
        "every list item (layers.*.attention_output_rel_error). KEY alone compares with --baseline.")] = None,
    minima: Annotated[list[str] | None, typer.Option(
        "--min", help="KEY=NUMBER: fail when the value at KEY is below NUMBER (KEY alone: vs --baseline).")]
    = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="A report of the same kind and model to compare with (bare --max/--min keys; "
        "without any, a default set per kind).")] = None,
    tolerance: Annotated[str | None, typer.Option(
        "--tolerance", help="How much worse than the baseline a value may be: '5%' (relative) or '0.002' "
        "(absolute).")] = None,
    significance: Annotated[float | None, typer.Option(
        "--significance", help="One-tailed test level (e.g. 0.05) for keys with a KEY_stderr beside them "
        "(eval): fail only when the change exceeds the measurement noise.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here (one testcase per "
                                               "check).")] = None,
    summary: Annotated[Path | None, typer.Option(
        "--summary", help="Append a Markdown summary to this file (e.g. \"$GITHUB_STEP_SUMMARY\").")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the outcome as JSON to this file "
                                                   "('-' for stdout, no table).")] = None,
) -> None:
    """Gate a report on thresholds or a baseline: exit 0 when every check holds, 1 when any fails."""

    def work() -> None:
        from kvtool.check import gate, junit_xml, markdown_summary
        from kvtool.errors import GateFailed, InputError
        from kvtool.util import write_text_atomic

        result = gate(report, maxima, minima, baseline_path=baseline, tolerance=tolerance,
                      significance=significance)
        if junit is not None:
            write_text_atomic(junit, junit_xml(result))
        if summary is not None:
            try:  # appended, as GitHub's step summary file expects; one write of the whole section
                with summary.open("a", encoding="utf-8") as f:
                    f.write(markdown_summary(result))
            except OSError as exc:
                raise InputError(f"{summary}: cannot append the summary ({exc.strerror or exc})") from None
        write_json(result.to_dict(), json_path)
        if json_path is None or str(json_path) != "-":
            _render(result)
        if not result.passed:
            raise GateFailed(result.summary_line())

    run_guarded(work)


def _render(result) -> None:  # result: kvtool.check.GateResult
    from rich import box

    title = f"{result.kind} report {result.report_path}" + (f" vs {result.baseline_path}"
                                                              if result.baseline_path else "")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("")
    table.add_column("check", overflow="fold")
    table.add_column("value (worst)", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("values", justify="right", no_wrap=True)
    for r in result.results:
        w = r.worst
        value = "null" if w.value is None else f"{w.value:.6g}"
        if len(r.items) > 1 and w.where:
            value += f" ({w.where})"
        count = f"{len(r.failures)}/{len(r.items)} fail" if r.failures else f"{len(r.items)} pass"
        table.add_row("[green]PASS[/]" if r.passed else "[bold red]FAIL[/]", r.name, value,
                      "—" if w.limit is None else f"{w.limit:.6g}", count)
    console.print(table)
    for r in result.failed:
        console.print(f"[red]✗[/] {r.name}: {r.message()}")
    if result.passed:
        console.print(f"[green]✓[/] {result.summary_line()}")
