"""`kvtool compress`, `kvtool decompress` and `kvtool codecs`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kvtool.cli._app import app, console, human_bytes, layer_progress, run_guarded, write_json


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
    observe: Annotated[int | None, typer.Option("--observe", metavar="N", help="Give codecs (token "
                                                "selectors) only the first N captured queries of each layer "
                                                "and score attention on the rest. Default: half of them "
                                                "when a codec uses queries, else none.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output file.")] = False,
    plan: Annotated[Path | None, typer.Option("--plan", help="A plan file from `kvtool plan` (a codec per "
                                              "layer, head and role) instead of --method/--keys/--values.")]
    = None,
    fit_on: Annotated[Path | None, typer.Option("--fit-on", help="Fit the codecs' shared state (bases, "
                                                "codebooks) on this other cache of the same model, then "
                                                "apply it here (default: fit on the cache itself).")] = None,
) -> None:
    """Fit and apply codecs to every layer; report stored bits, reconstruction and attention error."""

    def work() -> None:
        from kvtool.codecs import parse_pair
        from kvtool.compress import compress as run
        from kvtool.errors import InputError
        from kvtool.store import read_info
        from kvtool.util import parse_layers

        if plan is not None and (method or keys or values):
            raise InputError("give --plan or --method/--keys/--values, not both")
        keys_codec, values_codec = parse_pair(method, keys, values) if plan is None else (None, None)
        if topk < 1:
            raise InputError(f"--topk must be >= 1, got {topk}")
        if observe is not None and observe < 0:
            raise InputError(f"--observe must be >= 0, got {observe}")
        chosen = parse_layers(layers, read_info(path).num_layers)
        quiet = json_path is not None and str(json_path) == "-"
        with layer_progress("compressing", quiet) as progress:
            report = run(path, keys_codec, values_codec, output=output, layers=chosen, progress=progress,
                         force=force, sequence=sequence, require_attention=require_attention, topk=topk,
                         observe=observe, plan=plan, fit_on=fit_on)
        write_json(report, json_path)
        if not quiet:
            _render_compress(report)

    run_guarded(work)


def _resolved_text(tensor: dict[str, Any]) -> str:
    """The scalar items a codec resolved (``rank=24``), for the table."""
    items = tensor.get("resolved", {}).items()
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in items
                    if isinstance(v, (int, float, str)) and not isinstance(v, bool))


def _render_compress(r: dict[str, Any]) -> None:
    from rich import box

    att = r["attention"]
    t = r["total"]
    state = t.get("shared_state_bytes", 0) > 0
    resolved = any(_resolved_text(row[role]) for row in r["layers"] for role in ("keys", "values"))
    title = f"keys {r['keys_spec']} | values {r['values_spec']}"
    if r.get("plan"):
        title = (f"plan at {r['plan']['budget_bits']:g} bits: mostly {title}, "
                 f"{len(r['assignment']['layers'])} layer(s) otherwise")
    table = Table(title=title, box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, collapse_padding=True)
    kept = "kept_fraction" in t
    cols = ["layer", "K bits", "V bits"] + (["K b+st", "V b+st"] if state else []) + ["K mse", "V mse"]
    cols += ["kept"] if kept else []
    cols += ["out err", "out cos", "KL", "top-k"] if att else ["K cos", "V cos"]
    cols += ["K resolved", "V resolved"] if resolved else []
    for col in cols:
        table.add_column(col, justify="left" if "resolved" in col else "right", no_wrap=True)
    rows = [*r["layers"], {**t, "layer": "total"}]
    for n, row in enumerate(rows):
        k, v = row["keys"], row["values"]
        cells = [str(row["layer"]), f"{k['bits_per_element']:.2f}", f"{v['bits_per_element']:.2f}"]
        if state:
            cells += [f"{k['bits_per_element_with_state']:.2f}", f"{v['bits_per_element_with_state']:.2f}"]
        cells += [f"{k['rel_mse']:.1e}", f"{v['rel_mse']:.1e}"]
        if kept:
            cells.append(f"{row.get('kept_fraction', 1.0):.3f}")
        if att:
            cells += [f"{row['attention_output_rel_error']:.4f}", f"{row['attention_output_cosine']:.4f}",
                      f"{row['attention_kl']:.1e}", f"{row['topk_overlap']:.3f}"]
        else:
            cells += [f"{k['cosine']:.4f}", f"{v['cosine']:.4f}"]
        if resolved:
            cells += [_resolved_text(k), _resolved_text(v)]
        table.add_row(*cells, end_section=n == len(rows) - 2)
    console.print(table)
    console.print("mse: relative MSE of keys/values; out: attention output ‖ô−o‖/‖o‖ and cosine; "
                  "KL(p‖p̂) and top-k overlap of attention" if att else "mse: relative MSE; cos: mean cosine")
    if state:
        console.print("b+st: bits per element with the shared state (bases, codebooks) amortized over this cache")
    if kept:
        console.print("kept: fraction of token rows kept by the selector (evicted rows count as lost in "
                      "mse and get no attention)")
    with_state = (f"; {t['bits_per_element_with_state']:.3f} with {human_bytes(t['shared_state_bytes'])} of "
                  "shared state" if state else "")
    console.print(f"{human_bytes(t['bytes_before'])} as fp16 → {human_bytes(t['bytes_after'])} stored "
                  f"({t['bits_per_element']:.3f} bits/element{with_state}, {t['ratio']:.2f}× smaller) "
                  f"in {r['seconds']:.1f} s" + (f"; wrote {r['output']}" if r["output"] else ""))
    fitted = r.get("fitted_on", "self")
    if isinstance(fitted, dict):
        console.print(f"shared state fitted on {fitted['file']} (sequence {fitted['sequence']}, text sha256 "
                      f"{fitted['text_sha256'][:12]}…)")
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

        with layer_progress("decompressing", False) as progress:
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
    from kvtool.codecs import ORIGINS, REGISTRY, codec_parameters, format_value

    rows = []
    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        # docstrings open with the spec in ``…`` then " — " and what the codec does: keep the prose
        doc = doc.split(" — ", 1)[-1].replace("``", "")
        params = {k: {"type": t, "default": format_value(d)} for k, (t, d) in codec_parameters(cls).items()}
        rows.append({"name": name, "parameters": params, "description": doc,
                     "origin": ORIGINS.get(name, "kvtool")})
    if as_json:
        write_json(rows, Path("-"))
        return
    table = Table(title="codecs (chain stages with '+': a selector or lowrank, then any codec)")
    for col in ("name", "parameters (default)", "description", "origin"):
        table.add_column(col)
    for row in rows:
        params = ", ".join(f"{k}={p['default']} ({p['type']})" for k, p in row["parameters"].items())
        table.add_row(row["name"], params or "—", row["description"], row["origin"])
    console.print(table)
