"""Low-rank and learned codebooks against quantizers on real caches: keys and values measured apart.

For each layer of the target cache (read once) the exact attention of the held-out queries is computed
once (``metrics.reference_attention``); every (role, spec) then codes that one tensor — the other stays
exact — and is compared with it (``metrics.compare_attention``). Every spec sees the first ``--observe``
captured queries of each layer (what ``weight=queries|attention`` fit on) and is scored on the rest, so
no codec is scored on the queries it was fitted to. Bits are ``bits_per_element_with_state``: every stored
byte plus the shared state (bases, codebooks, outlier tables) amortized over this cache.

Three parts, written to ``benchmarks/results/lowrank.md`` (and ``lowrank.png``):

1. bits vs attention-output error, keys and values apart, codebooks and bases fitted on the cache itself;
2. the same for a few specs with the shared state fitted on the other text (``--fit-on``), to see whether
   subspaces and codebooks carry over between sequences (ShadowKV reports key subspaces do not);
3. fit + encode + decode seconds over every layer of the target (keys and values), wall and CPU, with
   TurboQuant as the baseline measured in the same run.

Run: ``python benchmarks/bench_lowrank.py`` (captures with ``kvtool capture --queries last:128
--pre-rope-keys -n 2048`` of samples/gpl-3.0.txt and samples/apache-2.0.txt; ``--target``/``--other``).
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
from kvtool.compress import _context, encode_tensor, split_queries  # noqa: E402
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
         "vq:stages=4,bits=8"]


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
                        c.fit(calib.keys if role == "keys" else calib.values, _context(calib, role, cseen))
                        state = c.shared_state()
                    codec = parse_spec(spec).for_role(role)
                    enc, x_hat = encode_tensor(codec, x, _context(data, role, seen), state)
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
        wall, cpu = [], []
        for _ in range(reps):
            w0, c0 = time.perf_counter(), time.process_time()
            for d in data:
                for role, x in (("keys", d.keys), ("values", d.values)):
                    encode_tensor(parse_spec(spec).for_role(role), x, _context(d, role, None))
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        out.append({"spec": spec, "wall": min(wall), "cpu": min(cpu), "layers": len(data),
                    "tokens": int(data[0].keys.shape[1])})
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


def render(rows: list[dict], times: list[dict], args: argparse.Namespace) -> str:
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
    lines.append("")
    if times:
        base = next(t for t in times if t["spec"].startswith("turboquant"))
        lines += [f"### Fit + encode + decode, keys and values of {base['layers']} layers × {base['tokens']} tokens",
                  "", "Wall and CPU seconds of one pass (the machine is shared: CPU time is the steadier "
                  f"figure); ratios against `{base['spec']}` in the same run.", "",
                  "| spec | wall s | CPU s | CPU ratio |", "|---|---:|---:|---:|"]
        for t in times:
            lines.append(f"| `{t['spec']}` | {t['wall']:.1f} | {t['cpu']:.1f} | {t['cpu'] / base['cpu']:.1f}× |")
        lines.append("")
    lines.append("![bits vs attention-output error](lowrank.png)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=Path, default=Path("/work/data/lowrank/gpl-3.0.h5"))
    p.add_argument("--other", type=Path, default=Path("/work/data/lowrank/apache-2.0.h5"))
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8, 15, 22, 28])
    p.add_argument("--observe", type=int, default=64)
    p.add_argument("--no-timings", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS / "lowrank.md")
    args = p.parse_args()
    rows = measure(args.target, args.other, args.layers, args.observe, ["keys", "values"])
    times = [] if args.no_timings else timings(args.target)
    plot(rows, args.output.with_suffix(".png"))
    args.output.write_text(render(rows, times, args) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
