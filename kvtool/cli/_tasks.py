"""`kvtool eval --task NAME`: option checks, the run with a progress bar, the rich table (eval.py wires it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from kvtool.cli._app import console, err_console, print_table, run_guarded, write_json


def task_command(*, task: str, text: Path | None, methods: list[str] | None, keys: str | None,
                 values: str | None, plans: list[Path] | None, mode: str, lengths: str, depths: str, samples: int,
                 seed: int, template: str, max_new_tokens: int | None, plot: Path | None, json_path: Path | None,
                 model: str, load_options: dict[str, Any]) -> None:
    def work() -> None:
        from kvtool.capture import read_text
        from kvtool.cli._app import assignments_from_options
        from kvtool.codecs.planfile import load_plan
        from kvtool.errors import InputError
        from kvtool.tasks import parse_depths, parse_lengths, parse_task
        from kvtool.tasks.core import TEMPLATES, check_grid

        if mode != "prefill":
            raise InputError(f"--task codes the whole prompt as in prefill mode; --mode {mode} is not supported "
                             "with --task")
        if text is None:
            raise InputError("--task needs --text: the haystack text the prompts are drawn from")
        if template not in TEMPLATES:
            raise InputError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        the_task = parse_task(task)
        grid = parse_lengths(lengths), parse_depths(depths)
        check_grid(*grid, samples)
        loaded_plans = [load_plan(p) for p in plans or []]
        assignments, labels = (assignments_from_options(methods, keys, values) if methods or keys or values
                               else ([], []))
        for path, p in zip(plans or [], loaded_plans, strict=True):
            assignments.append(p)
            labels.append(f"plan {path.name} ({p.budget_bits:g} bits)")
        read_text(text)  # a bad text fails before the slow model load
        quiet = json_path is not None and str(json_path) == "-"
        report = _run(the_task, assignments, labels, grid, quiet)
        write_json(report, json_path)
        if plot is not None:
            from kvtool.tasks.plot import heatmap

            heatmap(report, plot)
        if not quiet:
            render(report)
            if plot is not None:
                console.print(f"heatmap: {plot}", highlight=False)

    def _run(the_task: Any, assignments: list[Any], labels: list[str], grid: Any, quiet: bool) -> Any:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from kvtool.models import load_model
        from kvtool.tasks.run import run_tasks

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=quiet) as bar:
            job = bar.add_task(f"loading model {model}", total=None)
            loaded = load_model(model, **load_options)
            bar.update(job, description=f"{the_task.name}: prefill, then one answer per method and exact",
                       completed=0)
            return run_tasks(loaded, the_task, text, assignments, lengths=grid[0], depths=grid[1],
                             samples=samples, seed=seed, labels=labels, template=template,
                             max_new_tokens=max_new_tokens,
                             progress=lambda done, total: bar.update(job, completed=done, total=total))

    run_guarded(work)


def _pct(p: float | None, low: float | None = None, high: float | None = None) -> str:
    if p is None:
        return "-"
    return f"{100 * p:.0f}" if low is None else f"{100 * p:.0f} [{100 * low:.0f}, {100 * high:.0f}]"


def render(r: dict[str, Any]) -> None:
    """Accuracy per length (all depths) and overall per method, with Wilson 95 % intervals."""
    from rich import box

    console.print(f"{r['task']} on {r['haystack']}: {r['prompts']} prompts ({len(r['lengths'])} lengths x "
                  f"{len(r['depths'])} depths x {r['samples']} sample(s)), seed {r['seed']}, {r['template']} "
                  f"template", highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("method", no_wrap=True)
    table.add_column("bits", justify="right")
    for n in r["lengths"]:
        table.add_column(f"{n} acc %", justify="right")
    table.add_column("acc % [95% CI]", justify="right", no_wrap=True)
    table.add_column("agree % [95% CI]", justify="right", no_wrap=True)
    for m in [r["exact"], *r["methods"]]:
        per_length = []
        for n in r["lengths"]:
            cells = [c for c in m["cells"] if c["length"] == n]
            k, total = sum(c["correct"] for c in cells), sum(c["n"] for c in cells)
            per_length.append(_pct(k / total if total else None))
        bits = m.get("bits_per_element")
        table.add_row(m["label"], "-" if bits is None else f"{bits:.2f}", *per_length,
                      _pct(m["accuracy"], m["accuracy_low"], m["accuracy_high"]),
                      _pct(m.get("agreement"), m.get("agreement_low"), m.get("agreement_high"))
                      if "agreement" in m else "-")
    print_table(table)
    console.print(f"exact match of the reply's first words (normalised); {r['seconds']:.1f} s", highlight=False)
