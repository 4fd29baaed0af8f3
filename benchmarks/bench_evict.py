"""Eviction, age bands and cross-layer sharing on real caches, scored on held-out queries.

Every token selector at keep 0.25 / 0.5 / 0.75, alone and chained with ``turboquant:bits=3``, with
``per_head`` off and on (AdaKV; not for ``streaming``, which keeps the same tokens in every head), a few
age-band specs and plain TurboQuant for reference, over every layer of two 2,048-token SmolLM2 captures
(GPL-3 and Apache-2.0, last 128 queries). Selectors see the first 64 captured queries of each layer; every
spec is scored on the other 64 (``kvtool sweep``, which uses compress's functions and one split for all
specs). Keys and values use the same spec. Then ``minicache`` from the middle layer at several thresholds
through ``compress`` (its pairs are coded only there), and the scoring time and peak memory of each selector
on 30 layers × 2,048 tokens (one subprocess per selector; ratios against reading the layers and against
fitting ``turboquant:bits=3`` in the same run).

Everything runs on one torch thread: on the shared 2-core machine two threads made the same sweep 7.6×
slower (38.5 s against 5.1 s for 3 specs × 2 layers while other jobs ran).

Run (captures the caches into out/ first if they are missing; about an hour on 2 shared cores)::

    .venv/bin/python benchmarks/bench_evict.py [--caches GPL.h5 APACHE.h5] [--quick]

Writes benchmarks/results/evict.md, evict.png and evict.json (every total; ``--render`` rewrites the .md and
.png from it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import ensure_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEXTS = ("gpl-3.0", "apache-2.0")
DEFAULT_CACHES = [ROOT / "out" / "gpl2048.h5", ROOT / "out" / "apache2048.h5"]
SELECTORS = ["streaming", "h2o", "snapkv", "tova", "knorm", "expected"]
KEEPS = (0.25, 0.5, 0.75)
TAIL = "turboquant:bits=3"
OBSERVE = 64
BASELINES = ["turboquant:bits=3", "turboquant:bits=4", "turboquant:bits=2"]
AGE = [
    "age:bands=[0-128:fp16;128-1152:turboquant:bits=4;1152-:turboquant:bits=2]",
    "age:bands=[0-128:fp16;128-1152:turboquant:bits=4;1152-:turboquant:bits=2],sink=4",
    "age:bands=[0-128:fp16;128-:turboquant:bits=3],sink=4",
    "age:bands=[0-256:fp16;256-:turboquant:bits=2],sink=4",
    "age:bands=[0-128:fp16;128-:snapkv:keep=0.5+turboquant:bits=3],sink=4",
]
MINICACHE = ["minicache:threshold=0.1", "minicache:threshold=0.45", "minicache:threshold=1"]


def selector_specs(quick: bool) -> list[str]:
    specs = []
    for name in SELECTORS:
        for keep in (0.5,) if quick else KEEPS:
            for per_head in (False,) if name == "streaming" else (False, True):
                base = f"{name}:keep={keep}" + (",per_head=true" if per_head else "")
                specs += [base, f"{base}+{TAIL}"]
    return specs


def run_sweep(cache: Path, specs: list[str]) -> dict[str, dict]:
    """{spec as given: its sweep result} (one pass over the cache for every spec)."""
    from kvtool.codecs import parse_spec
    from kvtool.sweep import sweep

    report = sweep(cache, specs)
    assert report["query_split"]["observe"] == OBSERVE, report["query_split"]
    by_canonical = {r["keys_spec"]: r for r in report["results"]}
    return {s: by_canonical[parse_spec(s).for_role("keys").spec()] for s in specs}


def pair_distances(cache: Path) -> dict[str, dict[str, float]]:
    """Angular distance arccos(cos)/π between the same token's vectors in the layers minicache pairs (from
    the middle layer on), per role: median and the share of token rows within 0.1 and 0.25."""
    import numpy as np

    from kvtool.codecs import parse_spec
    from kvtool.store import CacheReader

    codec = parse_spec("minicache")
    out: dict[str, list] = {"keys": [], "values": []}
    with CacheReader(cache) as reader:
        n = reader.info.num_layers
        for first in range(n):
            if codec.pair_of(first, n) != first + 1:  # type: ignore[attr-defined]
                continue
            a, b = reader.layer(first, queries=False), reader.layer(first + 1, queries=False)
            for role in out:
                x, y = getattr(a, role).astype(np.float64), getattr(b, role).astype(np.float64)
                cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
                out[role].append(np.arccos(np.clip(cos, -1, 1)).ravel() / np.pi)
    return {role: {"median": float(np.median(np.concatenate(d))),
                   "within_0.1": float((np.concatenate(d) <= 0.1).mean()),
                   "within_0.25": float((np.concatenate(d) <= 0.25).mean())} for role, d in out.items()}


def run_minicache(cache: Path) -> dict[str, dict]:
    from kvtool.codecs.assignment import Assignment
    from kvtool.compress import compress

    out: dict[str, dict] = {"distances": pair_distances(cache)}
    for spec in MINICACHE:
        report = compress(cache, assignment=Assignment.of(spec, spec), observe=OBSERVE)
        paired = [r for r in report["layers"] if r["layer"] >= 15]
        out[spec] = {"total": report["total"], "cross_layer": report["cross_layer"],
                     "paired_error": sum(r["attention_output_rel_error"] for r in paired) / len(paired)}
    return out


#: Runs in a child process: argv = cache, spec ("read" = only read the layers). Prints JSON seconds, peak RSS.
SPEED_SCRIPT = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from kvtool.codecs import parse_spec
from kvtool.measure import layer_context, split_queries
from kvtool.store import CacheReader
cache, spec = sys.argv[1], sys.argv[2]
seconds = 0.0
with CacheReader(cache) as reader:
    for i in range(reader.info.num_layers):
        data = reader.layer(i)
        if spec == "read":
            continue
        seen, _ = split_queries(data, 64)
        codec = parse_spec(spec).for_role("keys")
        start = time.perf_counter()
        codec.fit(data.keys, layer_context(data, "keys", seen))
        if spec.startswith("turboquant"):
            codec.decode(codec.encode(data.keys))
        else:
            codec.keep_mask(data.keys)
        seconds += time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_speed(cache: Path, rounds: int) -> dict[str, dict]:
    """Per selector (fit = score + select, keys of every layer): median seconds and peak RSS over rounds."""
    specs = ["read", "turboquant:bits=3", *[f"{s}:keep=0.5" for s in SELECTORS], "snapkv:keep=0.5,per_head=true"]
    runs: dict[str, list[dict]] = {s: [] for s in specs}
    for _ in range(rounds):
        for spec in specs:  # interleaved, so load on the shared machine hits every spec alike
            out = subprocess.run([sys.executable, "-c", SPEED_SCRIPT, str(cache), spec], check=True,
                                 capture_output=True, text=True, cwd=ROOT).stdout
            runs[spec].append(json.loads(out.strip().splitlines()[-1]))
    result = {}
    for spec, rs in runs.items():
        secs = sorted(r["seconds"] for r in rs)
        result[spec] = {"seconds": secs[len(secs) // 2], "peak_mib": max(r["peak_kib"] for r in rs) / 1024}
    return result


# ------------------------------------------------------------------------------------------------- output


def _row(spec: str, per_text: list[dict]) -> str:
    t0 = per_text[0]["total"]
    kept = t0.get("kept_fraction")
    cells = [f"`{spec}`", f"{t0['bits_per_element']:.3f}", f"{t0['ratio']:.2f}",
             "" if kept is None else f"{kept:.3f}"]
    for r in per_text:
        t = r["total"]
        cells += [f"{t['attention_output_rel_error']:.4f}", f"{t['attention_output_cosine']:.4f}"]
    return "| " + " | ".join(cells) + " |"


def write_markdown(path: Path, caches: list[Path], sweeps: list[dict], minis: list[dict], speed: dict,
                   seconds: float, quick: bool) -> None:
    head = ("| spec | stored bits | ratio vs fp16 | kept | GPL-3 out err | GPL-3 out cos | Apache out err | "
            "Apache out cos |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [
        f"Every layer of `{caches[0].name}` (GPL-3) and `{caches[1].name}` (Apache-2.0): SmolLM2-135M, 2,048 "
        "tokens, the last 128 queries captured. Selectors saw the first 64 queries of each layer; every spec "
        "is scored on the other 64 (positions 1984–2047), keys and values with the same spec. *out err* is "
        "the attention-output error ‖ô−o‖/‖o‖, *out cos* its cosine, both averaged over the 30 layers; "
        "*stored bits* per element count every stored byte (kept indices included) on GPL-3 (Apache is the "
        "same within 0.001 for fixed budgets); *kept* is the share of token rows kept."
        + (" Quick run: keep 0.5 only." if quick else ""), "",
        "### Selectors alone and chained with `turboquant:bits=3`", "", head, rule]
    order = list(sweeps[0])
    for spec in order:
        if spec in BASELINES or spec in AGE:
            continue
        lines.append(_row(spec, [s[spec] for s in sweeps]))
    lines += ["", "### Plain TurboQuant and age bands (the same held-out queries)", "", head, rule]
    for spec in BASELINES + AGE:
        if spec in sweeps[0]:
            lines.append(_row(spec, [s[spec] for s in sweeps]))
    lines += ["", "### minicache from the middle layer (15), `compress --observe 64`", ""]
    if all("distances" in m for m in minis):
        lines += ["Angular distance arccos(cos)/π between a token's vectors in the two layers of each pair "
                  "(0: the same direction, 0.5: orthogonal): " + "; ".join(
                      f"{text} {role}: median {m['distances'][role]['median']:.3f}, within 0.1: "
                      f"{m['distances'][role]['within_0.1']:.4f}, within 0.25: "
                      f"{m['distances'][role]['within_0.25']:.4f}"
                      for text, m in zip(TEXTS, minis, strict=True) for role in ("keys", "values")) + ".", ""]
    lines += ["| spec | merged token rows (pairs) | bytes saved vs fp16 | stored bits (all layers) | "
              "GPL-3 out err, layers 15–29 | Apache out err, layers 15–29 |", "|---|---:|---:|---:|---:|---:|"]
    for spec in MINICACHE:
        a, b = minis[0][spec], minis[1][spec]
        pairs = a["cross_layer"]["pairs"]
        merged = sum(p["merged_fraction"] for p in pairs) / len(pairs)
        lines.append(f"| `{spec}` | {merged:.4f} | {a['cross_layer']['bytes_saved']:,} | "
                     f"{a['total']['bits_per_element']:.3f} | {a['paired_error']:.4f} | {b['paired_error']:.4f} |")
    base_read, base_tq = speed["read"], speed["turboquant:bits=3"]
    lines += ["", "### Selector scoring time and peak memory (keys of 30 layers × 2,048 tokens, GPL-3)", "",
              "Fit = score + select on the observed 64 queries, summed over layers; median of the rounds, each "
              "spec in its own process, one torch thread. The machine was shared: compare the ratios, measured "
              f"in the same run. Reading the 30 layers took a process {base_read['peak_mib']:.0f} MiB at peak "
              "(torch, h5py and one layer); a selector's temporaries — the observed queries' attention, "
              "9 × 64 × 2,048 float32 = 4.5 MiB per layer, freed before the next — stay under that peak. "
              f"`turboquant:bits=3` fit + encode + decode of the same keys took {base_tq['seconds']:.2f} s.", "",
              "| spec | fit seconds | × turboquant:bits=3 | peak RSS MiB | over reading alone |",
              "|---|---:|---:|---:|---:|"]
    for spec, r in speed.items():
        if spec == "read":
            continue
        lines.append(f"| `{spec}` | {r['seconds']:.2f} | {r['seconds'] / base_tq['seconds']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] - base_read['peak_mib']:+.0f} |")
    lines += ["", f"Whole run: {seconds / 60:.1f} min.", "",
              "![attention-output error against the compression ratio vs fp16](evict.png)", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, sweeps: list[dict]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), layout="constrained")
    for n, (text, results) in enumerate(zip(TEXTS, sweeps, strict=True)):
        ax = fig.add_subplot(1, 2, n + 1)
        for c, name in enumerate(SELECTORS):
            for per_head in (False, True):
                for chained in (False, True):
                    specs = [f"{name}:keep={k}" + (",per_head=true" if per_head else "") + (f"+{TAIL}" if chained
                             else "") for k in KEEPS]
                    pts = [results[s]["total"] for s in specs if s in results]
                    if not pts:
                        continue
                    ax.plot([p["ratio"] for p in pts], [p["attention_output_rel_error"] for p in pts],
                            marker="s" if chained else "o", ls="--" if per_head else "-", color=f"C{c}",
                            mfc="white" if per_head else f"C{c}", ms=5, lw=1,
                            label=name if not per_head and not chained else None)
        for spec, marker in ((BASELINES[0], "x"), (BASELINES[1], "x"), (BASELINES[2], "x")):
            if spec in results:
                t = results[spec]["total"]
                ax.scatter([t["ratio"]], [t["attention_output_rel_error"]], marker=marker, color="black", zorder=3)
                ax.annotate(spec.replace("turboquant:", "tq "), (t["ratio"], t["attention_output_rel_error"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ages = [results[s]["total"] for s in AGE if s in results]
        ax.scatter([t["ratio"] for t in ages], [t["attention_output_rel_error"] for t in ages], marker="^",
                   color="grey", zorder=3, label="age bands")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1.3, 2, 3, 4, 6, 9, 18], labels=["1.3", "2", "3", "4", "6", "9", "18"])
        ax.minorticks_off()
        ax.set_xlabel("compression ratio vs fp16 (every stored byte)")
        ax.set_ylabel("attention-output error ‖ô−o‖/‖o‖, mean over 30 layers")
        ax.set_title(f"{text}: held-out queries 1984–2047", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if n == 0:
            ax.legend(fontsize=7, title="o alone, ■ + tq 3 bits; dashed hollow: per_head", title_fontsize=7)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", nargs=2, type=Path, default=DEFAULT_CACHES, metavar=("GPL", "APACHE"))
    parser.add_argument("--quick", action="store_true", help="keep 0.5 only, one speed round")
    parser.add_argument("--rounds", type=int, default=3, help="speed rounds")
    parser.add_argument("--output", type=Path, default=RESULTS / "evict.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the .json "
                        "of an earlier run")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.output.with_suffix(".json").read_text())
        write_markdown(args.output, args.caches, saved["sweeps"], saved["minicache"], saved["speed"],
                       saved["seconds"], saved["quick"])
        plot(args.output.with_suffix(".png"), saved["sweeps"])
        return
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    for cache, text in zip(args.caches, TEXTS, strict=True):
        ensure_cache(cache, text)
    specs = selector_specs(args.quick) + BASELINES + AGE
    sweeps, minis = [], []
    for cache in args.caches:
        print(f"sweep {cache.name}: {len(specs)} specs", flush=True)
        sweeps.append(run_sweep(cache, specs))
        print(f"minicache {cache.name}", flush=True)
        minis.append(run_minicache(cache))
    print("speed", flush=True)
    speed = run_speed(args.caches[0], 1 if args.quick else args.rounds)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - started
    write_markdown(args.output, args.caches, sweeps, minis, speed, seconds, args.quick)
    plot(args.output.with_suffix(".png"), sweeps)
    (args.output.with_suffix(".json")).write_text(json.dumps(
        {"sweeps": [{s: {"total": r["total"]} for s, r in sw.items()} for sw in sweeps],
         "minicache": minis, "speed": speed, "seconds": seconds, "quick": args.quick}))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
