"""Low-rank and learned codebooks against quantizers on real caches: keys and values measured apart.

For each layer of the target cache (read once) the exact attention of the held-out queries is computed
once (``metrics.reference_attention``); every (role, spec) then codes that one tensor — the other stays
exact — and is compared with it (``metrics.compare_attention``). Every spec sees the first ``--observe``
captured queries of each layer (what ``weight=queries|attention`` fit on) and is scored on the rest, so
no codec is scored on the queries it was fitted to. Bits are ``bits_per_element_with_state``: every stored
byte plus the shared state (bases, codebooks, outlier tables) amortized over this cache.

Parts (``--parts``, all by default), written to ``benchmarks/results/lowrank.md`` (and ``lowrank.png``):

``measure``
    1. bits vs attention-output error, keys and values apart, codebooks and bases fitted on the cache itself;
    2. the same for a few specs with the shared state fitted on the other text (``--fit-on``), to see whether
       subspaces and codebooks carry over between sequences (ShadowKV reports key subspaces do not);
``timings``
    3. fit + encode + decode seconds over every layer of the target (keys and values), wall and CPU, with
       TurboQuant as the baseline measured in the same run;
``iters``
    4. the learned codecs' Lloyd iterations (``iters``): fit + encode + decode seconds over every layer
       against the attention-output error and relative MSE (what ``learned.DEFAULT_ITERS`` is chosen from).

A run of some parts rewrites only their sections of ``lowrank.md``; the other sections are kept as they
were (the intro and the plot go with ``measure``).

Run: ``python benchmarks/bench_lowrank.py`` (captures with ``kvtool capture --queries last:128
--pre-rope-keys -n 2048`` of samples/gpl-3.0.txt and samples/apache-2.0.txt; ``--target``/``--other``);
``python benchmarks/bench_lowrank.py --parts timings iters --target /work/data/gpl-2048.h5`` for the speed
parts alone (they read only the target).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtool import metrics  # noqa: E402
from kvtool.codecs import parse_spec  # noqa: E402
from kvtool.codecs.structure.learned import DEFAULT_ITERS, available_cores  # noqa: E402
from kvtool.measure import encode_tensor, layer_context, split_queries  # noqa: E402
from kvtool.store import CacheReader  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

QUANT = ["turboquant:bits=2", "turboquant:bits=2.5", "turboquant:bits=3", "turboquant:bits=4",
         "turboquant:bits=3,center=true,sink=1",
         "kivi:bits=2", "kivi:bits=4", "kivi:bits=8"]
LEARNED = ["pq:m=16,bits=4", "pq:m=16,bits=8", "pq:m=32,bits=8", "pq:m=16,bits=8,rotation=random",
           "vq:stages=4,bits=8", "vq:stages=8,bits=8"]
LOWRANK_BOTH = ["lowrank:rank=16", "lowrank:rank=32", "lowrank:rank=48", "lowrank:rank=32,sink=0",
                "lowrank:rank=96,group=all", "lowrank:rank=32+turboquant:bits=4",
                "lowrank:rank=48+turboquant:bits=4", "lowrank:rank=24+turboquant:bits=4"]
LOWRANK_KEYS = ["lowrank:rank=16,prerope=true", "lowrank:rank=32,prerope=true", "lowrank:rank=48,prerope=true",
                "lowrank:rank=32,prerope=true+turboquant:bits=4", "lowrank:rank=32,weight=queries",
                "lowrank:rank=48,weight=queries"]
LOWRANK_VALUES = ["lowrank:rank=32,weight=attention", "lowrank:rank=48,weight=attention"]
FIT_OTHER = {"keys": ["lowrank:rank=32", "lowrank:rank=32,prerope=true", "lowrank:rank=48,weight=queries",
                      "pq:m=16,bits=8", "vq:stages=8,bits=8", "turboquant:bits=2.5"],
             "values": ["lowrank:rank=32", "lowrank:rank=48", "pq:m=16,bits=8", "vq:stages=8,bits=8"]}
TIMED = ["turboquant:bits=4", "lowrank:rank=32", "lowrank:rank=32+turboquant:bits=4", "pq:m=16,bits=8",
         "pq:m=32,bits=8", "vq:stages=4,bits=8"]
ITERS_SPECS = ["pq:m=16,bits=8", "pq:m=32,bits=8", "vq:stages=4,bits=8"]
ITERS = [4, 8, 25]  # 25: faiss's default, what the codecs ran before ``iters``
PARTS = ("measure", "timings", "iters")


def specs_for(role: str) -> list[str]:
    extra = LOWRANK_KEYS if role == "keys" else LOWRANK_VALUES
    return QUANT + LEARNED + LOWRANK_BOTH + extra


def family(spec: str) -> str:
    head = spec.split(":")[0]
    if head == "lowrank":
        return "lowrank+quant" if "+" in spec else ("lowrank pre-RoPE" if "prerope=true" in spec else "lowrank")
    return head


def measure(target: Path, other: Path, layers: list[int], observe: int, roles: list[str]) -> list[dict]:
    """Per (role, spec, fitted_on): bits with state and the error figures, averaged over ``layers``."""
    rows: dict[tuple[str, str, str], dict] = {}
    with CacheReader(target) as reader, CacheReader(other) as calib_reader:
        for n, i in enumerate(layers):
            data = reader.layer(i)
            calib = calib_reader.layer(i)
            seen, held = split_queries(data, observe)
            ref = metrics.reference_attention(held[0], data.keys, data.values, held[1], data.key_positions,
                                              scaling=data.scaling, sliding_window=data.sliding_window)
            cseen = (calib.queries, calib.query_positions)
            for role in roles:
                x = data.keys if role == "keys" else data.values
                jobs = [(s, "self") for s in specs_for(role)] + [(s, "other") for s in FIT_OTHER[role]]
                for spec, fitted in jobs:
                    state = None
                    if fitted == "other":
                        c = parse_spec(spec).for_role(role)
                        c.fit(calib.keys if role == "keys" else calib.values, layer_context(calib, role, cseen))
                        state = c.shared_state()
                    codec = parse_spec(spec).for_role(role)
                    enc, x_hat = encode_tensor(codec, x, layer_context(data, role, seen), state)
                    att = metrics.compare_attention(ref, x_hat if role == "keys" else None,
                                                    x_hat if role == "values" else None)
                    st = sum(a.nbytes for a in codec.shared_state().values())
                    row = rows.setdefault((role, spec, fitted), {"role": role, "spec": spec, "fitted_on": fitted,
                                                                 "bytes": 0, "state": 0, "elements": 0,
                                                                 "err": [], "kl": [], "mse": []})
                    row["bytes"] += enc.nbytes
                    row["state"] += st
                    row["elements"] += x.size
                    row["err"].append(att["attention_output_rel_error"])
                    row["kl"].append(att["attention_kl"])
                    row["mse"].append(float(((x - x_hat) ** 2).sum() / (x**2).sum()))
            print(f"layer {i} done ({n + 1}/{len(layers)})", file=sys.stderr, flush=True)
    out = []
    for row in rows.values():
        out.append({"role": row["role"], "spec": row["spec"], "fitted_on": row["fitted_on"],
                    "bits": 8 * row["bytes"] / row["elements"],
                    "bits_with_state": 8 * (row["bytes"] + row["state"]) / row["elements"],
                    "out_err": float(np.mean(row["err"])), "kl": float(np.mean(row["kl"])),
                    "rel_mse": float(np.mean(row["mse"]))})
    return out


def timings(target: Path, reps: int = 1) -> list[dict]:
    """Fit + encode + decode of keys and values over every layer, wall and CPU seconds per spec."""
    with CacheReader(target) as reader:
        data = [reader.layer(i) for i in range(reader.info.num_layers)]
    out = []
    for spec in TIMED:
        warm_up(spec, data[0])
        wall, cpu = [], []
        for _ in range(reps):
            w0, c0 = time.perf_counter(), time.process_time()
            for d in data:
                for role, x in (("keys", d.keys), ("values", d.values)):
                    encode_tensor(parse_spec(spec).for_role(role), x, layer_context(d, role, None))
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        out.append({"spec": spec, "wall": min(wall), "cpu": min(cpu), "layers": len(data),
                    "tokens": int(data[0].keys.shape[1])})
    return out


def warm_up(spec: str, d) -> None:
    """One untimed coding of a layer's keys: imports (torch, faiss) and first-call set-up off the clock."""
    encode_tensor(parse_spec(spec).for_role("keys"), d.keys, layer_context(d, "keys", None))


def iterations(target: Path, observe: int) -> list[dict]:
    """Per (spec, iters): fit + encode + decode seconds of keys and values over every layer (wall, CPU; the
    scoring is outside the clock) and the mean over layers of the attention-output error (held-out queries,
    the other tensor exact) and the relative MSE, keys and values apart."""
    with CacheReader(target) as reader:
        data = [reader.layer(i) for i in range(reader.info.num_layers)]
    refs = []
    for d in data:
        held = split_queries(d, observe)[1]
        refs.append(metrics.reference_attention(held[0], d.keys, d.values, held[1], d.key_positions,
                                                scaling=d.scaling, sliding_window=d.sliding_window))
    out = []
    for spec in ITERS_SPECS:
        for iters in ITERS:
            full = f"{spec},iters={iters}"
            warm_up(full, data[0])
            wall = cpu = 0.0
            err: dict[str, list[float]] = {"keys": [], "values": []}
            mse: dict[str, list[float]] = {"keys": [], "values": []}
            for d, ref in zip(data, refs, strict=True):
                for role, x in (("keys", d.keys), ("values", d.values)):
                    w0, c0 = time.perf_counter(), time.process_time()
                    _, x_hat = encode_tensor(parse_spec(full).for_role(role), x, layer_context(d, role, None))
                    wall += time.perf_counter() - w0
                    cpu += time.process_time() - c0
                    att = metrics.compare_attention(ref, x_hat if role == "keys" else None,
                                                    x_hat if role == "values" else None)
                    err[role].append(att["attention_output_rel_error"])
                    mse[role].append(float(((x - x_hat) ** 2).sum() / (x**2).sum()))
            out.append({"spec": spec, "iters": iters, "wall": wall, "cpu": cpu, "layers": len(data),
                        "tokens": int(data[0].keys.shape[1]),
                        **{f"err_{r}": float(np.mean(v)) for r, v in err.items()},
                        **{f"mse_{r}": float(np.mean(v)) for r, v in mse.items()}})
            print(f"{full}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"turboquant": "o", "kivi": "s", "pq": "^", "vq": "v", "lowrank": "D", "lowrank pre-RoPE": "P",
               "lowrank+quant": "X"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, role in zip(axes, ("keys", "values"), strict=True):
        for fam, marker in markers.items():
            pts = [r for r in rows if r["role"] == role and r["fitted_on"] == "self" and family(r["spec"]) == fam]
            if pts:
                ax.scatter([r["bits_with_state"] for r in pts], [r["out_err"] for r in pts], marker=marker,
                           label=fam, s=36)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("stored bits per element (shared state amortized)")
        ax.set_title(f"{role} coded, {'values' if role == 'keys' else 'keys'} exact")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("attention-output relative error (held-out queries)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render_measure(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Target `{args.target.name}`, other text `{args.other.name}` (SmolLM2-135M, 2,048 tokens, 3 kv heads,"
             f" head_dim 64); layers {', '.join(map(str, args.layers))}; codecs fitted with the first "
             f"{args.observe} of the 128 captured queries of each layer, attention scored on the other "
             f"{128 - args.observe}. One tensor coded, the other exact. Bits: every stored byte, and "
             "`+state` with the bases/codebooks amortized over this cache (30 layers would amortize the same "
             "way: the state is per layer). Errors: mean over the layers of the attention-output relative "
             "error `‖ô − o‖/‖o‖`, KL(p‖p̂) and the tensor's relative MSE.", ""]
    for role in ("keys", "values"):
        kl = role == "keys"  # values do not move the attention distribution
        lines += [f"### {role.capitalize()} (fitted on the cache itself)", "",
                  "| spec | bits | bits +state | out err |" + (" KL |" if kl else "") + " rel MSE |",
                  "|---|---:|---:|---:|" + ("---:|" if kl else "") + "---:|"]
        pts = sorted((r for r in rows if r["role"] == role and r["fitted_on"] == "self"),
                     key=lambda r: r["bits_with_state"])
        for r in pts:
            lines.append(f"| `{r['spec']}` | {r['bits']:.3f} | {r['bits_with_state']:.3f} | {r['out_err']:.4f} | "
                         + (f"{r['kl']:.2e} | " if kl else "") + f"{r['rel_mse']:.4f} |")
        lines.append("")
    lines += ["### Fit on self vs fit on the other text (`--fit-on`)", "",
              "| tensor | spec | out err, self | out err, other | rel MSE, self | rel MSE, other |",
              "|---|---|---:|---:|---:|---:|"]
    by = {(r["role"], r["spec"], r["fitted_on"]): r for r in rows}
    for role, specs in FIT_OTHER.items():
        for spec in specs:
            a, b = by.get((role, spec, "self")), by.get((role, spec, "other"))
            if a and b:
                lines.append(f"| {role} | `{spec}` | {a['out_err']:.4f} | {b['out_err']:.4f} | {a['rel_mse']:.4f} | "
                             f"{b['rel_mse']:.4f} |")
    return "\n".join(lines)


def render_timings(times: list[dict], args: argparse.Namespace) -> str:
    base = next(t for t in times if t["spec"].startswith("turboquant"))
    lines = [f"### Fit + encode + decode, keys and values of {base['layers']} layers × {base['tokens']} tokens", "",
             f"`{args.target.name}`, {available_cores()} cores available. Wall and CPU seconds of one pass (the "
             "machine is shared: CPU time is the steadier figure); ratios against "
             f"`{base['spec']}` in the same run.", "",
             "| spec | wall s | CPU s | CPU ratio |", "|---|---:|---:|---:|"]
    for t in times:
        lines.append(f"| `{t['spec']}` | {t['wall']:.1f} | {t['cpu']:.1f} | {t['cpu'] / base['cpu']:.1f}× |")
    return "\n".join(lines)


def render_iters(rows: list[dict], args: argparse.Namespace) -> str:
    r0 = rows[0]
    lines = [f"### Lloyd iterations (`iters`) of the learned codecs: time against error, {r0['layers']} layers × "
             f"{r0['tokens']} tokens", "",
             f"`{args.target.name}`, {available_cores()} cores available. Seconds: fit + encode + decode of keys "
             f"and values over every layer, one pass (scoring outside the clock). Errors: mean over the layers of "
             f"the attention-output relative error (the last {128 - args.observe} captured queries, the other "
             f"tensor exact) and the relative MSE. The default is `iters={DEFAULT_ITERS}`; 25 is faiss's default "
             "and what the codecs ran before.", "",
             "| spec | iters | wall s | CPU s | keys out err | values out err | keys rel MSE | values rel MSE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['spec']}` | {r['iters']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['err_keys']:.4f} | "
                     f"{r['err_values']:.4f} | {r['mse_keys']:.4f} | {r['mse_values']:.4f} |")
    return "\n".join(lines)


PLOT_LINE = "![bits vs attention-output error](lowrank.png)"


def part_of(heading: str) -> str:
    """The part a ``### `` section of lowrank.md belongs to."""
    if heading.startswith("### Fit + encode"):
        return "timings"
    if heading.startswith("### Lloyd iterations"):
        return "iters"
    return "measure"


def existing_parts(path: Path) -> dict[str, str]:
    """The sections of an earlier lowrank.md, by part (the intro before the first heading is ``measure``'s)."""
    if not path.exists():
        return {}
    parts: dict[str, list[str]] = {}
    current = "measure"
    for line in path.read_text().splitlines():
        if line.strip() == PLOT_LINE:
            continue
        if line.startswith("### "):
            current = part_of(line)
        parts.setdefault(current, []).append(line)
    return {k: "\n".join(v).strip() for k, v in parts.items()}


def merge(new: dict[str, str], path: Path) -> str:
    """lowrank.md with the parts just run replaced and the others kept from ``path``, in ``PARTS`` order."""
    sections = {**existing_parts(path), **new}
    body = [sections[p] for p in PARTS if sections.get(p)]
    return "\n\n".join(body + [PLOT_LINE]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=Path, default=Path("/work/data/lowrank/gpl-3.0.h5"))
    p.add_argument("--other", type=Path, default=Path("/work/data/lowrank/apache-2.0.h5"))
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8, 15, 22, 28])
    p.add_argument("--observe", type=int, default=64)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="which parts to run; the other sections of --output are kept")
    p.add_argument("--no-timings", action="store_true", help="the same as leaving timings out of --parts")
    p.add_argument("--output", type=Path, default=RESULTS / "lowrank.md")
    args = p.parse_args()
    parts = [x for x in args.parts if not (args.no_timings and x == "timings")]
    new = {}
    if "measure" in parts:
        rows = measure(args.target, args.other, args.layers, args.observe, ["keys", "values"])
        plot(rows, args.output.with_suffix(".png"))
        new["measure"] = render_measure(rows, args)
    if "timings" in parts:
        new["timings"] = render_timings(timings(args.target), args)
    if "iters" in parts:
        new["iters"] = render_iters(iterations(args.target, args.observe), args)
    args.output.write_text(merge(new, args.output))
    print(f"wrote {args.output} ({', '.join(parts)})")


if __name__ == "__main__":
    main()
