"""`kvtool sweep`: many codec specs over one cache in one pass; the Pareto frontier of bits vs error."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kvtool.cli._app import (
    CacheModelOption,
    DeviceMapOption,
    DeviceOption,
    MaxMemoryOption,
    ModelDtypeOption,
    OffloadFolderOption,
    TrustRemoteCodeOption,
    app,
    console,
    err_console,
    print_table,
    run_guarded,
    write_json,
)

FRONTIER_MARK = "★"

EvalTextOption = Annotated[Path | None, typer.Option("--eval-text", help="Also score every spec inside the "
                                                     "model on this text (kvtool eval, prefill mode, one "
                                                     "exact pass shared by all).")]
EvalTokensOption = Annotated[int, typer.Option("--eval-tokens", help="Use the first N tokens of --eval-text.")]
EvalContextOption = Annotated[int, typer.Option("--eval-context", help="Chunk length of the in-model "
                                                "scoring (as kvtool eval --context).")]


def eval_setup(text: Path | None, tokens: int, context: int, model: str | None, **load: Any) -> Any:
    """The in-model scoring options as a :class:`kvtool.sweep.EvalText` (None without a text); ``load``: the
    model options (``dtype``, ``device``, ``device_map``, ``max_memory``, ``offload_folder``,
    ``trust_remote_code``). The text is read here, so a bad one fails before anything slow."""
    if text is None:
        return None
    from kvtool.capture import read_text
    from kvtool.sweep import EvalText

    read_text(text)
    return EvalText(text, model, tokens, context, **load)


@contextlib.contextmanager
def step_progress(label: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr over ``done/total`` steps (disabled when ``quiet``)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
                  disable=quiet) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command()
def sweep(
    path: Annotated[Path, typer.Argument(help="A kvtool cache file (from `kvtool capture`).")],
    specs: Annotated[list[str] | None, typer.Argument(help="More codec specs or presets (as --methods).",
                                                      show_default=False)] = None,
    methods: Annotated[list[str] | None, typer.Option(
        "--methods", "-m", help="Codec specs or preset names (default, quant, all, plan); repeat the option or "
        "list them after it: --methods SPEC SPEC ... Default: the 'default' preset.")] = None,
    layers: Annotated[str, typer.Option("--layers", help="Layers to measure, e.g. '0-5,29' (default all).")]
    = "all",
    sequence: Annotated[int, typer.Option("--sequence", help="Sequence to measure.")] = 0,
    topk: Annotated[int, typer.Option("--topk", help="k of the attention top-k overlap.")] = 8,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report to this file "
                                                   "('-' for stdout, no table).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of bits vs error with the "
                                              "frontier.")] = None,
    eval_text: EvalTextOption = None,
    eval_tokens: EvalTokensOption = 1024,
    eval_context: EvalContextOption = 512,
    model: CacheModelOption = None,
    model_dtype: ModelDtypeOption = "auto",
    device: DeviceOption = None,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_folder: OffloadFolderOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Measure many codec specs in one pass (each layer read once, its exact attention computed once);
    mark the Pareto frontier of stored bits against attention-output error."""

    def work() -> None:
        from kvtool.errors import InputError
        from kvtool.store import read_info
        from kvtool.sweep import plot_frontier
        from kvtool.sweep import sweep as run
        from kvtool.util import parse_layers

        if topk < 1:
            raise InputError(f"--topk must be >= 1, got {topk}")
        chosen = parse_layers(layers, read_info(path).num_layers)
        items = [*(methods or []), *(specs or [])] or ["default"]
        quiet = json_path is not None and str(json_path) == "-"
        setup = eval_setup(eval_text, eval_tokens, eval_context, model, dtype=model_dtype, device=device,
                           device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                           trust_remote_code=trust_remote_code)
        with step_progress("sweeping (layer × spec), then eval passes", quiet) as progress:
            report = run(path, items, layers=chosen, sequence=sequence, topk=topk, eval_text=setup,
                         progress=progress)
        if plot is not None:
            plot_frontier(report, plot)
        write_json(report, json_path)
        if not quiet:
            render_sweep(report)
            if plot is not None:
                console.print(f"wrote {plot}")

    run_guarded(work)


def render_sweep(r: dict[str, Any]) -> None:
    from rich import box
    from rich.markup import escape

    att = r["attention"]
    table = Table(title=f"sweep of {r['source']}: {len(r['results'])} specs, {len(r['layers'])} layers",
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    ev = "eval" in r
    cols = ["", "spec", "bits", "K mse", "V mse"] + (["out err", "out cos", "KL", "top-k"] if att else [])
    cols += ["", "eval bits", "KLD", "Δppl %"] if ev else []
    for n, col in enumerate(cols):
        table.add_column(col, justify="left" if n < 2 else "right", no_wrap=n != 1,
                         overflow="fold" if n == 1 else "ellipsis")
    for row in r["results"]:
        t = row["total"]
        cells = [FRONTIER_MARK if row["frontier"] else "", escape(row["spec"]), f"{row['stored_bits']:.3f}",
                 f"{t['keys']['rel_mse']:.1e}", f"{t['values']['rel_mse']:.1e}"]
        if att:
            cells += [f"{t['attention_output_rel_error']:.4f}", f"{t['attention_output_cosine']:.4f}",
                      f"{t['attention_kl']:.1e}", f"{t['topk_overlap']:.3f}"]
        if ev:
            e = row["eval"]
            cells += [FRONTIER_MARK if row["frontier_kld"] else "", f"{e['bits_per_element']:.3f}",
                      f"{e['kld_mean']:.2e}", f"{e['delta_ppl_pct']:+.2f}"]
        table.add_row(*cells, style="bold" if row["frontier"] else None)
    print_table(table)
    metric = "attention-output error" if att else "mean keys/values relative MSE"
    console.print(f"{FRONTIER_MARK} Pareto frontier of stored bits (arrays + shared state) against {metric}; "
                  f"errors are means over layers; {r['seconds']:.1f} s")
    if ev:
        e = r["eval"]
        console.print(f"KLD, Δppl: inside the model ({e['model']}) on {e['text']}, {e['chunks']} chunk(s) of "
                      f"{e['context']} tokens (kvtool eval, prefill); eval bits: what each codec stored in the "
                      f"model's cache on those prompts; the second {FRONTIER_MARK} marks the KLD frontier over them")
