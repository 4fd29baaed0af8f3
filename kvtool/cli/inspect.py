"""`kvtool inspect`: what a kvtool file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvtool.cli._app import app, console, human_bytes, run_guarded, write_json


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A kvtool HDF5 file (cache or compressed).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of tables.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Read every chunk: checksums (Fletcher-32) and "
                                         "finite keys/values/queries; exit 2 naming what is damaged.")] = False,
) -> None:
    """Show what a kvtool file holds: model, texts, per-layer shapes, dtype, bytes on disk vs in memory,
    whether its data carries checksums."""

    def work() -> None:
        from kvtool.errors import StoreError
        from kvtool.info import describe

        data = describe(path)
        if verify:
            from kvtool.store import verify as read_all

            result = read_all(path)
            if result["problems"]:
                n = len(result["problems"])
                raise StoreError(f"{path}: {n} damaged dataset{'s' if n > 1 else ''}: "
                                 + "; ".join(result["problems"][:3]) + ("; ..." if n > 3 else ""))
            data["verify"] = result
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
        console.print(f"codecs: keys {escape(str(d['codec_keys']))}, values {escape(str(d['codec_values']))}")
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
    console.print({
        "fletcher32": f"checksums: Fletcher-32 on all {d['datasets']} datasets",
        "none": "checksums: none (a file written before kvtool checksummed its data: damage inside a chunk "
                "cannot be detected)",
    }.get(d["checksums"], f"checksums: Fletcher-32 on {d['checksummed_datasets']} of {d['datasets']} datasets"))
    v = d.get("verify")
    if v:
        what = "every checksum matches" if v["checksummed"] else "read without error (no checksums to compare)"
        console.print(f"verified: {v['chunks']} chunks of {v['datasets']} datasets, "
                      f"{human_bytes(v['bytes'])}; {what}; keys, values and queries are finite")
