"""Codec throughput: encode and decode speed of every registered codec beside a plain copy.

Protocol (issue 3): 1M vectors of head_dim 64 (float32, standard normal, seed 0, as (8 heads, 131072
tokens, 64)), torch and numpy limited to 2 threads, each codec fitted once (not timed), then encode and
decode each timed REPEATS times; the median is reported in vectors/s and MB/s of float32 input. The
yardstick is ``numpy.copy`` of the same array. Stored bits per element and rel MSE on the same data are
shown for context (Gaussian data, so they are not a quality ranking). The machine's load average is
printed: other processes on a 2-core machine change every wall-clock figure.

With ``--public-python PY`` the same protocol is run, in the same invocation, on public packages installed
in a separate environment (see ``bench_public.py``), and the speed ratios kvtool / public are printed:
TurboQuant b = 3 vs polarquant nbits = 3, KIVI vs tiny-turboquant's KIVI path at equal bits and role.

Run: ``.venv/bin/python benchmarks/bench_codecs.py [--vectors N] [--only SPEC ...] [--public-python PY]``
(writes benchmarks/results/codecs.md).
"""

from __future__ import annotations

import os

THREADS = 2
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(THREADS))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvtool.codecs import REGISTRY, Codec, parse_pair, parse_spec  # noqa: E402
from kvtool.metrics import reconstruction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
HEAD_DIM = 64
HEADS = 8

#: Specs benchmarked per registered codec; a codec missing here is run with its defaults.
#: "kivi" entries name the role, since KIVI quantizes keys per channel and values per token.
SPECS: dict[str, list[str]] = {
    "fp16": ["fp16"],
    "fp8": ["fp8:format=e4m3", "fp8:format=e5m2"],
    "uniform": ["uniform:bits=4", "uniform:bits=2,group=32", "uniform:bits=8,axis=channel,group=128"],
    "kivi": ["kivi:bits=4@keys", "kivi:bits=4@values", "kivi:bits=2@keys", "kivi:bits=2@values",
             # the layout of tiny-turboquant's KIVI path (keys: 128-token blocks; values: whole head_dim)
             "kivi:bits=4,group=128,residual=0@keys", "kivi:bits=4,group=64,residual=0@values",
             "kivi:bits=2,group=128,residual=0@keys", "kivi:bits=2,group=64,residual=0@values"],
    "turboquant": ["turboquant:bits=3", "turboquant:bits=4", "turboquant:bits=2.5",
                   "turboquant:bits=3,variant=prod"],
    "qjl": ["qjl"],
    "polarquant": ["polarquant"],
}


def build(label: str) -> Codec:
    spec, _, role = label.partition("@")
    if role:
        keys, values = parse_pair(method=spec)
        return keys if role == "keys" else values
    return parse_spec(spec)


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(label: str, x: np.ndarray, repeats: int) -> dict[str, object]:
    codec = build(label).fit(x)
    t_enc, enc = median_seconds(lambda: codec.encode(x), repeats)
    t_dec, x_hat = median_seconds(lambda: codec.decode(enc), repeats)
    return {"label": label, "spec": codec.spec(), "enc": t_enc, "dec": t_dec,
            "bits": enc.bits_per_element(), "rel_mse": reconstruction(x, x_hat)["rel_mse"]}


def row(name: str, bits: str, rel: str, t_enc: float, t_dec: float, vectors: int, mbytes: float) -> str:
    return (f"| `{name}` | {bits} | {rel} | {vectors / t_enc / 1e6:.2f} | {mbytes / t_enc:.0f} | "
            f"{vectors / t_dec / 1e6:.2f} | {mbytes / t_dec:.0f} |")


#: (kvtool label, public row name) pairs compared side by side when --public-python is given.
PAIRS = [
    ("turboquant:bits=3", "polarquant 0.6.0 PolarKVQuantizer nbits=3"),
    ("turboquant:bits=4", "polarquant 0.6.0 PolarKVQuantizer nbits=4"),
    ("kivi:bits=4,group=128,residual=0@keys", "tiny-turboquant 0.18.0 KIVI keys bits=4"),
    ("kivi:bits=4,group=64,residual=0@values", "tiny-turboquant 0.18.0 KIVI values bits=4"),
    ("kivi:bits=2,group=128,residual=0@keys", "tiny-turboquant 0.18.0 KIVI keys bits=2"),
    ("kivi:bits=2,group=64,residual=0@values", "tiny-turboquant 0.18.0 KIVI values bits=2"),
]


def public_rows(python: str, vectors: int) -> list[dict[str, object]]:
    script = ROOT / "benchmarks" / "bench_public.py"
    out = subprocess.run([python, str(script), str(vectors)], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        if "error" in row:
            print(f"public benchmark: {row['error']}", file=sys.stderr)
    return [r for r in rows if "error" not in r]


def ratios(results: list[dict[str, object]], public: list[dict[str, object]]) -> str:
    ours = {r["label"]: r for r in results}
    theirs = {r["name"]: r for r in public}
    lines = ["", "| kvtool | public | bits (kvtool / public) | encode speed ratio | decode speed ratio |",
             "|---|---|---:|---:|---:|"]
    for mine, other in PAIRS:
        if mine in ours and other in theirs:
            a, b = ours[mine], theirs[other]
            lines.append(f"| `{mine}` | {other} | {a['bits']:.3f} / {b['bits']:.3f} | "
                         f"{b['enc'] / a['enc']:.2f}× | {b['dec'] / a['dec']:.2f}× |")
    return "\n".join(lines) + "\n" if len(lines) > 3 else ""


def table(results: list[dict[str, object]], copy_s: float, vectors: int, load: tuple[float, ...],
          public: list[dict[str, object]] | None = None) -> str:
    mbytes = vectors * HEAD_DIM * 4 / 1e6
    lines = [
        f"Codec throughput — {vectors:,} vectors × d={HEAD_DIM} float32 ({mbytes:.0f} MB), "
        f"{THREADS} threads (torch {torch.__version__}, numpy {np.__version__}, {platform.machine()}), "
        f"median of {REPEATS}; load average before/after: {load[0]:.2f} / {load[1]:.2f}.",
        "",
        "| codec | stored bits/elem | rel MSE (Gaussian) | encode M vec/s | encode MB/s | decode M vec/s | "
        "decode MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("numpy.copy (yardstick)", "32", "0", copy_s, copy_s, vectors, mbytes),
    ]
    for r in results:
        name = r["spec"] + (f" ({r['label'].partition('@')[2]})" if "@" in r["label"] else "")
        lines.append(row(name, f"{r['bits']:.3f}", f"{r['rel_mse']:.2e}", r["enc"], r["dec"], vectors, mbytes))
    for r in public or []:
        lines.append(row(f"[public] {r['name']}", f"{r['bits']:.3f}", "—", r["enc"], r["dec"], vectors, mbytes)
                     .replace("`", ""))
    return "\n".join(lines) + "\n" + (ratios(results, public) if public else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1 << 20)
    parser.add_argument("--only", nargs="*", help="benchmark only these labels (spec, or spec@keys|values)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "codecs.md")
    parser.add_argument("--public-python", help="python of a separate venv with polarquant/tiny-turboquant")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    x = np.random.default_rng(0).standard_normal((HEADS, args.vectors // HEADS, HEAD_DIM)).astype(np.float32)
    labels = args.only or [s for name in REGISTRY for s in SPECS.get(name, [name])]
    load_before = os.getloadavg()[0]
    copy_s, _ = median_seconds(lambda: np.copy(x), REPEATS)
    results = []
    for label in labels:
        results.append(bench(label, x, REPEATS))
        r = results[-1]
        print(f"{label:40s} enc {x.shape[0] * x.shape[1] / r['enc'] / 1e6:6.2f} M vec/s   "
              f"dec {x.shape[0] * x.shape[1] / r['dec'] / 1e6:6.2f} M vec/s", flush=True)
    public = public_rows(args.public_python, x.shape[0] * x.shape[1]) if args.public_python else None
    text = table(results, copy_s, x.shape[0] * x.shape[1], (load_before, os.getloadavg()[0]), public)
    print()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
