"""The kvtool command line: parse options, call one library function, render the result.

Errors meant for users (:class:`kvtool.errors.KvtoolError`) become one red line on stderr and exit
code 2 (1 for a failed gate); Ctrl-C exits 2 and leaves no output file. A traceback means a bug.
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
from rich.table import Table

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


# ----------------------------------------------------------------------------------------------- capture


@app.command()
def capture(
    text: Annotated[list[Path] | None, typer.Option("--text", "-t", help="UTF-8 text file; repeat for "
                                                     "several sequences in one file.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text given inline instead of a file.")]
    = None,
    model: Annotated[str, typer.Option("--model", "-m", help="'default' (bundled SmolLM2-135M GGUF), a .gguf "
                                       "file, a Hugging Face model folder, or a hub id.")] = "default",
    output: Annotated[Path, typer.Option("--output", "-o", help="HDF5 file to write.")] = Path("cache.h5"),
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", help="Keep only the first N tokens "
                                                   "of each text (also how to truncate past the model's "
                                                   "context).")] = None,
    queries: Annotated[str, typer.Option("--queries", "-q", help="Post-RoPE queries to record: 'last:N', "
                                         "'all' or 'none'.")] = "last:128",
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype of keys/values/queries: float16 or "
                                       "float32.")] = "float16",
    model_dtype: Annotated[str, typer.Option("--model-dtype", help="Compute dtype of the model: auto "
                                             "(float32 on CPU, bfloat16 on CUDA), float32, float16, "
                                             "bfloat16.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model's own "
                                                    "Python code to run (off unless you pass it).")] = False,
    pre_rope_keys: Annotated[bool, typer.Option("--pre-rope-keys", help="Also store each layer's keys before "
                                                "RoPE (for `analyze`'s pre- vs post-RoPE rank).")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")]
    = False,
) -> None:
    """Run a model over text and store its keys, values and queries in HDF5.

    One forward pass per text; keys and values are read from the model's own cache afterwards, queries
    through transformers' AttentionInterface. The file appears only once complete.
    """

    def work() -> None:
        from kvtool import capture as cap
        from kvtool.errors import InputError
        from kvtool.store import STORAGE_DTYPES, check_output_path

        if dtype not in STORAGE_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        if bool(text) == (prompt is not None):
            raise InputError("give either --text FILE (repeatable) or --prompt STR")
        policy = cap.QueryPolicy.parse(queries)
        check_output_path(output, force)  # before the slow model load
        texts = [cap.read_text(p) for p in text] if text else [cap.prompt_text(prompt or "")]
        result = _capture_with_progress(cap, texts, policy, as_json)
        _render_capture(result, as_json)

    def _capture_with_progress(cap: Any, texts: list[Any], policy: Any, quiet: bool) -> Any:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from kvtool.models import load_model

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=quiet) as bar:
            load = bar.add_task(f"loading model {model}", total=None)
            loaded = load_model(model, dtype=model_dtype, device=device, trust_remote_code=trust_remote_code)
            bar.update(load, total=1, completed=1, visible=False)
            tasks: dict[str, int] = {}

            def on_sequence(j: int, n: int) -> None:
                for t in tasks.values():
                    bar.update(t, visible=False)
                tasks.clear()
                label = f"[{j + 1}/{n}] {texts[j].source}"
                tasks["forward"] = bar.add_task(f"{label}: forward, layer", total=None)
                tasks["write"] = bar.add_task(f"{label}: writing, layer", total=None)

            def progress(stage: str, done: int, total: int) -> None:
                bar.update(tasks[stage], completed=done, total=total)

            return cap.capture(loaded, texts, output, max_tokens=max_tokens, queries=policy, dtype=dtype,
                               force=force, pre_rope_keys=pre_rope_keys, progress=progress,
                               on_sequence=on_sequence)

    run_guarded(work)


def _render_capture(result: Any, as_json: bool) -> None:
    if as_json:
        from dataclasses import asdict

        data = asdict(result)
        data["path"] = str(result.path)
        write_json(data, Path("-"))
        return
    table = Table(title=f"captured {result.architecture} ({result.model}) → {result.path}")
    for col in ("sequence", "source", "tokens", "queries", "note"):
        table.add_column(col, justify="right" if col in ("tokens", "queries") else "left")
    for j, s in enumerate(result.sequences):
        note = f"truncated from {s.truncated_from}" if s.truncated_from else ""
        table.add_row(str(j), s.source, str(s.num_tokens), str(s.num_queries), note)
    console.print(table)
    sliding = sum(t == "sliding" for t in result.layer_types)
    console.print(
        f"{result.num_layers} layers ({sliding} sliding-window), {result.num_q_heads} query heads, "
        f"{result.num_kv_heads} kv heads, head_dim {result.head_dim}; "
        f"{human_bytes(result.file_bytes)} written in {result.seconds:.1f} s"
    )


# ----------------------------------------------------------------------------------------------- inspect


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A kvtool HDF5 file (cache or compressed).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of tables.")] = False,
) -> None:
    """Show what a kvtool file holds: model, texts, per-layer shapes, dtype, bytes on disk vs in memory."""

    def work() -> None:
        from kvtool.info import describe

        data = describe(path)
        if as_json:
            write_json(data, Path("-"))
        else:
            _render_inspect(data)

    run_guarded(work)


def _render_inspect(d: dict[str, Any]) -> None:
    console.print(f"[bold]{d['path']}[/]  kind={d['kind']}  schema={d['schema']}  dtype={d['dtype']}")
    console.print(f"model {d['model']} ({d['model_architecture']}) {d['model_source']}")
    console.print(f"{d['num_layers']} layers, {d['num_q_heads']} query heads, {d['num_kv_heads']} kv heads, "
                  f"head_dim {d['head_dim']}; created {d['created']} by kvtool {d['kvtool_version']}")
    if d.get("codec_keys"):
        console.print(f"codecs: keys {d['codec_keys']}, values {d['codec_values']}")
    seqs = Table(title="sequences")
    for col in ("#", "source", "tokens", "text sha256"):
        seqs.add_column(col)
    for s in d["sequences"]:
        seqs.add_row(str(s["index"]), s["source"], str(s["num_tokens"]), s["text_sha256"][:16])
    console.print(seqs)
    layers = Table(title="layers (sequence 0)")
    for col in ("layer", "type", "keys/values", "queries", "on disk", "in memory"):
        layers.add_column(col, justify="left" if col in ("type",) else "right")
    for layer in d["layers"]:
        shape = f"{d['num_kv_heads']}×{layer['num_tokens'][0]}×{d['head_dim']}"
        window = f" (window {layer['sliding_window']})" if layer["layer_type"] == "sliding" else ""
        q = f"{d['num_q_heads']}×{layer['num_queries'][0]}" if layer["num_queries"][0] else "—"
        layers.add_row(str(layer["index"]), layer["layer_type"] + window, shape, q,
                       human_bytes(layer["bytes_on_disk"]), human_bytes(layer["bytes_in_memory"]))
    console.print(layers)
    t = d["total"]
    console.print(f"total: {human_bytes(t['bytes_on_disk'])} on disk (keys+values+queries), "
                  f"{human_bytes(t['bytes_in_memory'])} in memory; file {human_bytes(d['file_bytes'])}")


# ---------------------------------------------------------------------------------------------- compress


@app.command()
def compress(
    path: Annotated[Path, typer.Argument(help="A kvtool cache file (from `kvtool capture`).")],
    method: Annotated[str | None, typer.Option("--method", help="Codec spec for keys and values, e.g. "
                                               "'kivi:bits=4' (see `kvtool codecs`).")] = None,
    keys: Annotated[str | None, typer.Option("--keys", help="Codec spec for keys (overrides --method).")]
    = None,
    values: Annotated[str | None, typer.Option("--values", help="Codec spec for values (overrides "
                                               "--method).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the compressed HDF5 file "
                                                "here.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report to this file "
                                                   "('-' for stdout, no table).")] = None,
    layers: Annotated[str, typer.Option("--layers", help="Layers to measure, e.g. '0-5,29' (default all; "
                                        "others are stored as fp16 in --output).")] = "all",
    topk: Annotated[int, typer.Option("--topk", help="k of the attention top-k overlap.")] = 8,
    sequence: Annotated[int, typer.Option("--sequence", help="Sequence to measure (all are written to "
                                          "--output).")] = 0,
    require_attention: Annotated[bool, typer.Option("--require-attention", help="Fail when the cache has "
                                                    "no captured queries.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output file.")] = False,
) -> None:
    """Fit and apply codecs to every layer; report stored bits, reconstruction and attention error."""

    def work() -> None:
        from kvtool.codecs import parse_pair
        from kvtool.compress import compress as run
        from kvtool.errors import InputError
        from kvtool.store import read_info
        from kvtool.util import parse_layers

        keys_codec, values_codec = parse_pair(method, keys, values)
        if topk < 1:
            raise InputError(f"--topk must be >= 1, got {topk}")
        chosen = parse_layers(layers, read_info(path).num_layers)
        quiet = json_path is not None and str(json_path) == "-"
        with _layer_progress("compressing", quiet) as progress:
            report = run(path, keys_codec, values_codec, output=output, layers=chosen, progress=progress,
                         force=force, sequence=sequence, require_attention=require_attention, topk=topk)
        write_json(report, json_path)
        if not quiet:
            _render_compress(report)

    run_guarded(work)


@contextlib.contextmanager
def _layer_progress(label: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label + " layer"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=True, disable=quiet) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _render_compress(r: dict[str, Any]) -> None:
    from rich import box

    att = r["attention"]
    table = Table(title=f"keys {r['keys_spec']} | values {r['values_spec']}", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, collapse_padding=True)
    cols = ["layer", "K bits", "V bits", "K mse", "V mse"]
    cols += ["out err", "out cos", "KL", "top-k"] if att else ["K cos", "V cos"]
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True)
    rows = [*r["layers"], {**r["total"], "layer": "total"}]
    for n, row in enumerate(rows):
        k, v = row["keys"], row["values"]
        cells = [str(row["layer"]), f"{k['bits_per_element']:.2f}", f"{v['bits_per_element']:.2f}",
                 f"{k['rel_mse']:.1e}", f"{v['rel_mse']:.1e}"]
        if att:
            cells += [f"{row['attention_output_rel_error']:.4f}", f"{row['attention_output_cosine']:.4f}",
                      f"{row['attention_kl']:.1e}", f"{row['topk_overlap']:.3f}"]
        else:
            cells += [f"{k['cosine']:.4f}", f"{v['cosine']:.4f}"]
        table.add_row(*cells, end_section=n == len(rows) - 2)
    console.print(table)
    console.print("mse: relative MSE of keys/values; out: attention output ‖ô−o‖/‖o‖ and cosine; "
                  "KL(p‖p̂) and top-k overlap of attention" if att else "mse: relative MSE; cos: mean cosine")
    t = r["total"]
    console.print(f"{human_bytes(t['bytes_before'])} as fp16 → {human_bytes(t['bytes_after'])} stored "
                  f"({t['bits_per_element']:.3f} bits/element, {t['ratio']:.2f}× smaller) "
                  f"in {r['seconds']:.1f} s" + (f"; wrote {r['output']}" if r["output"] else ""))
    for note in r["notes"]:
        console.print(f"note: {note}")


@app.command()
def decompress(
    path: Annotated[Path, typer.Argument(help="A compressed kvtool file (from `kvtool compress -o`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Cache file to write.")],
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output file.")] = False,
) -> None:
    """Decode a compressed file back into an ordinary cache file."""

    def work() -> None:
        from kvtool.compress import decompress as run

        with _layer_progress("decompressing", False) as progress:
            result = run(path, output, force=force, progress=progress)
        console.print(f"decoded {result['layers']} layers × {result['sequences']} sequence(s) "
                      f"(keys {result['codec_keys']}, values {result['codec_values']}) → {result['output']}")

    run_guarded(work)


@app.command()
def codecs(
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON instead of a table.")]
    = False,
) -> None:
    """List the registered codecs and their parameters (spec syntax: name:key=value,...)."""
    from kvtool.codecs import REGISTRY, codec_parameters, format_value

    rows = []
    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        # docstrings open with the spec in ``…`` then " — " and what the codec does: keep the prose
        doc = doc.split(" — ", 1)[-1].replace("``", "")
        params = {k: {"type": t, "default": format_value(d)} for k, (t, d) in codec_parameters(cls).items()}
        rows.append({"name": name, "parameters": params, "description": doc})
    if as_json:
        write_json(rows, Path("-"))
        return
    table = Table(title="codecs (compose a token selector with '+')")
    for col in ("name", "parameters (default)", "description"):
        table.add_column(col)
    for row in rows:
        params = ", ".join(f"{k}={p['default']} ({p['type']})" for k, p in row["parameters"].items())
        table.add_row(row["name"], params or "—", row["description"])
    console.print(table)


# ----------------------------------------------------------------------------------------------- analyze


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
        with _layer_progress("analysing", quiet) as progress:
            result = run(path, layers=layers, plots_dir=plots, progress=progress, sequence=sequence)
        write_json(result, json_path)
        if not quiet:
            render_analysis(result, console)

    run_guarded(work)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
