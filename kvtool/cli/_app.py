"""Shared pieces of the kvtool command line: the Typer app, consoles, the error guard, JSON output.

Errors meant for users (:class:`kvtool.errors.KvtoolError`) become one red line on stderr and their exit
code (2 bad input, 1 a failed gate); Ctrl-C exits 2. A traceback means a bug. Each command lives in its own
module of :mod:`kvtool.cli` and registers itself on :data:`app` when imported.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from kvtool.errors import KvtoolError

app = typer.Typer(
    name="kvtool",
    help="Capture, analyse and compress the KV cache of causal language models, offline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

T = TypeVar("T")

# Model placement options, shared by every command that loads a model (pass them to
# kvtool.models.load_model(device=..., device_map=..., max_memory=..., offload_folder=...) as they are:
# it parses and checks the text).
DeviceOption = Annotated[str | None, typer.Option(
    "--device", help="Put the whole model on cpu (the default), cuda, or auto (cuda when torch sees it). "
    "Not with --device-map.")]
DeviceMapOption = Annotated[str | None, typer.Option(
    "--device-map", help="Spread the model over GPUs, CPU and disk through accelerate: auto, balanced, "
    "balanced_low_0, sequential, MODULE=DEVICE[,...] (device: GPU index, cpu or disk), or a .json map.")]
MaxMemoryOption = Annotated[str | None, typer.Option(
    "--max-memory", help="With --device-map: memory per device, e.g. '0=20GiB,cpu=60GiB'; what does not fit "
    "is offloaded to the next device, finally to disk.")]
OffloadFolderOption = Annotated[Path | None, typer.Option(
    "--offload-folder", help="With --device-map: where disk-offloaded weights go when they cannot be read "
    "in place (default: a temporary folder, removed at exit).")]


def _version_callback(value: bool) -> None:
    if value:
        from kvtool import __version__

        console.print(f"kvtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Capture, analyse and compress the KV cache of causal language models, offline."""


def run_guarded(fn: Callable[[], T]) -> T:
    """Call ``fn``; turn user errors and Ctrl-C into one line on stderr and an exit code."""
    try:
        return fn()
    except KvtoolError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted:[/] stopped by the user; no output file was written")
        raise typer.Exit(2) from None


def write_json(data: Any, target: Path | None) -> None:
    """JSON to a file, or to stdout when ``target`` is "-"."""
    text = json.dumps(data, indent=2, allow_nan=False)
    if target is None:
        return
    if str(target) == "-":
        sys.stdout.write(text + "\n")
        return
    from kvtool.errors import InputError

    try:
        target.write_text(text + "\n")
    except OSError as exc:
        raise InputError(f"{target}: cannot write JSON ({exc.strerror or exc})") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@contextlib.contextmanager
def layer_progress(label: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label + " layer"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=True, disable=quiet) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
