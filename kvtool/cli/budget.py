"""`kvtool budget`: weight memory against KV-cache memory from a model's config (no weights loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kvtool.cli._app import TrustRemoteCodeOption, app, console, run_guarded, write_json


@app.command()
def budget(
    model: Annotated[str, typer.Option("--model", help="'default' (the bundled SmolLM2), a folder with "
                                       "config.json, a config.json, a .gguf file, a hub id (its config only), "
                                       "or a preset: bitnet-b1.58-2b-4t, bonsai-1.7b, bonsai-8b.")] = "default",
    context: Annotated[str, typer.Option("--context", help="Context lengths in tokens (k = 1024).")]
    = "4k,32k,128k",
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes (sequences held at once).")] = "1",
    weight_bits: Annotated[str, typer.Option("--weight-bits", help="Weight widths in bits per parameter.")]
    = "16,8,4,1.58,1.125",
    kv: Annotated[list[str] | None, typer.Option(
        "--kv", help="KV codec spec (repeat for several; default fp16, fp8, kivi:bits=4, kivi:bits=2, "
        "turboquant:bits=3). Bytes are measured by encoding a tensor of the model's head_dim.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report to this file ('-' "
                                                   "for stdout, no table).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG (or .svg/.pdf) of memory against "
                                              "context.")] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Weights vs KV-cache memory per context, batch and codec, and where the cache outgrows the weights."""

    def work() -> None:
        from kvtool.budget import budget as run
        from kvtool.budget import parse_batches, parse_bits, parse_tokens

        contexts, batches, bits = parse_tokens(context), parse_batches(batch), parse_bits(weight_bits)
        report = run(model, contexts, batches, bits, kv, plot=plot, trust_remote_code=trust_remote_code)
        write_json(report, json_path)
        if json_path is None or str(json_path) != "-":
            _render(report)

    run_guarded(work)


def _gib(n: float) -> str:
    gib = n / 1024**3
    return f"{gib:,.0f}" if gib >= 100 else f"{gib:.2f}" if gib >= 1 else f"{gib:.3g}"


def _render(r: dict[str, Any]) -> None:
    from rich import box

    g = r["geometry"]
    shapes = " + ".join(f"{t['name']} {t['heads']}×{t['dim']}" for t in g["tensors"])
    capped = ", ".join(f"{n} capped at {c}" for c, n in g["layers_capped"].items())
    console.print(f"[bold]{r['model']}[/] ({r['model_architecture'] or r['model_type']}): {g['num_layers']} "
                  f"layers ({g['layers_full']} full" + (f", {capped}" if capped else "")
                  + (f", {g['layers_without_kv']} without KV" if g["layers_without_kv"] else "")
                  + f"), cache per token and layer {shapes}; max context "
                  f"{g['max_context'] or '?'}; {g['parameters'] / 1e9:.3g}B parameters "
                  f"({g['parameters_non_embedding'] / 1e9:.3g}B non-embedding)")
    weights = Table(title="weights", box=box.SIMPLE_HEAD, show_edge=False)
    weights.add_column("bits/param", justify="right")
    weights.add_column("GiB", justify="right")
    for w in r["weights"]:
        weights.add_row(f"{w['bits']:g}", _gib(w["bytes"]))
    console.print(weights)

    specs = [c["spec"] for c in r["kv_codecs"]]

    def table(title: str, first: list[str]) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
        for col in first:
            t.add_column(col, justify="right", no_wrap=True)
        for s in specs:
            t.add_column(s, justify="right", overflow="fold")
        return t

    kv = table("KV cache, GiB", ["context", "batch"])
    for row in r["rows"]:
        mark = "*" if row["beyond_max_context"] else ""
        kv.add_row(f"{row['context']:,}{mark}", str(row["batch"]), *(_gib(c["bytes"]) for c in row["kv"]))
    console.print(kv)
    bits = table("KV bits per element actually stored (fp16 windows, scales and norms included)", ["context"])
    for t in sorted({row["context"] for row in r["rows"]}):
        bits.add_row(f"{t:,}", *(f"{c['stored_bits_per_element'][str(t)]:.3f}" for c in r["kv_codecs"]))
    console.print(bits)

    cross = Table(title="context where the KV cache outgrows the weights", box=box.SIMPLE_HEAD, show_edge=False)
    cross.add_column("KV codec", overflow="fold")
    cross.add_column("batch", justify="right")
    widths = [w["bits"] for w in r["weights"]]
    for b in widths:
        cross.add_column(f"{b:g}-bit weights", justify="right", overflow="fold")
    by_key = {(c["spec"], c["batch"], c["weight_bits"]): c for c in r["crossover"]}
    for s in specs:
        for b in sorted({c["batch"] for c in r["crossover"]}):
            cells = []
            for wb in widths:
                c = by_key[(s, b, wb)]
                cells.append("never" if c["context"] is None else
                             f"{c['context']:,}" + ("*" if c["beyond_max_context"] else ""))
            cross.add_row(s, str(b), *cells)
    console.print(cross)
    console.print("* beyond the model's maximum context")
    for note in r["notes"]:
        console.print(f"note: {note}")
    if r.get("plot"):
        console.print(f"wrote {r['plot']}")
