"""Benchmark `kvtool analyze`: wall time, and peak memory against the size of one layer.

Each measurement runs in a fresh subprocess that imports kvtool, warms every code path up on a tiny
cache, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), then analyses the benchmark
cache. Growth = peak RSS − RSS before the analysis; it is reported in units of one layer as
:class:`~kvtool.store.LayerData` holds it (float32 keys + values + queries). Running the same file
with 3, 10 and 30 layers shows whether memory grows with the number of layers (it should not:
analysis streams one layer at a time and keeps only the previous one).

    python benchmarks/bench_analyze.py                  # synthetic 30 layers × 2048 tokens
    python benchmarks/bench_analyze.py --cache my.h5 --label "what it is"   # a real capture, appended
    python benchmarks/bench_analyze.py --layers 10 --tokens 8192 --append   # 4× bigger layers

Prints a markdown table and writes it to benchmarks/results/analyze.md (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtool.store import CacheReader, CacheWriter, StoreHeader  # noqa: E402

CHILD = r"""
import json, os, sys, time
from pathlib import Path

def rss(field="VmRSS"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

from kvtool.analysis import analyze
path, warm, layers, plots = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None
analyze(warm)  # load every kernel and lazy import on a tiny cache first
base = rss()
try:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
except OSError:
    pass
trace = []
t0, c0 = time.perf_counter(), sum(os.times()[:2])
result = analyze(path, layers=layers, plots_dir=plots, progress=lambda d, n: trace.append(rss()))
wall, cpu = time.perf_counter() - t0, sum(os.times()[:2]) - c0
print(json.dumps({"wall": wall, "cpu": cpu, "base": base, "peak": rss("VmHWM"), "trace": trace,
                  "layers": len(result["layers"]), "text": result["layers"][-1]["recommendation"]["text"]}))
"""


def synthetic_layer(rng: np.random.Generator, layers: int, tokens: int, queries: int, kv: int, q: int,
                    d: int):
    """Yield (keys, values, queries) with structure like a real cache: low-rank keys with two outlier
    channels per head and a sink token, values whose scale varies per token, queries that share the
    sink direction."""
    for _ in range(layers):
        basis = rng.standard_normal((kv, 24, d)) / np.sqrt(24)
        k = np.einsum("htr,hrd->htd", rng.standard_normal((kv, tokens, 24)), basis)
        k += 0.1 * rng.standard_normal((kv, tokens, d))
        k[:, :, rng.choice(d, 2, replace=False)] *= 8.0
        k[:, 0] = 0.0
        k[:, 0, 0] = 12.0
        v = rng.standard_normal((kv, tokens, d)) * rng.lognormal(0.0, 0.5, (kv, tokens, 1))
        qq = rng.standard_normal((q, queries, d))
        qq[:, :, 0] += 3.0
        yield k.astype(np.float32), v.astype(np.float32), qq.astype(np.float32)


def write_synthetic(path: Path, layers: int, tokens: int, queries: int, kv: int = 3, q: int = 9,
                    d: int = 64, seed: int = 0) -> Path:
    header = StoreHeader(model="synthetic", model_architecture="Synthetic", num_layers=layers,
                         num_q_heads=q, num_kv_heads=kv, head_dim=d, attn_scaling=d ** -0.5)
    rng = np.random.default_rng(seed)
    with CacheWriter(path, header, force=True) as w:
        w.add_sequence(np.arange(tokens), source="synthetic", text="synthetic")
        for i, (k, v, qq) in enumerate(synthetic_layer(rng, layers, tokens, queries, kv, q, d)):
            w.write_layer(0, i, k, v, queries=qq, query_positions=np.arange(tokens - queries, tokens))
    return path


def layer_bytes(path: Path) -> tuple[int, dict]:
    """Bytes of one layer as LayerData holds it (float32), and a description of the file."""
    with CacheReader(path) as r:
        info = r.info
        lay = info.sequences[0].layers[0]
        n = 4 * (2 * info.num_kv_heads * lay.num_tokens * info.head_dim
                 + info.num_q_heads * lay.num_queries * info.head_dim)
        desc = {"model": info.model, "layers": info.num_layers, "tokens": lay.num_tokens,
                "queries": lay.num_queries, "kv_heads": info.num_kv_heads, "q_heads": info.num_q_heads,
                "head_dim": info.head_dim, "dtype": info.dtype}
    return n, desc


def measure(path: Path, warm: Path, layers: str, plots: str = "", env_extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(warm), layers, plots],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# Fixing glibc's mmap threshold returns every freed large block to the OS, so RSS tracks live memory
# instead of what the allocator keeps around after the first layers.
LIVE = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[tuple[str, dict]], one_layer: int) -> list[str]:
    lines = ["| run | layers | wall s | CPU s | CPU s / layer | RSS before MiB | peak RSS MiB | growth MiB | "
             "growth ÷ one layer | RSS after 1st → last layer MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, m in rows:
        growth = m["peak"] - m["base"]
        lines.append(f"| {label} | {m['layers']} | {m['wall']:.2f} | {m['cpu']:.2f} | "
                     f"{m['cpu'] / m['layers']:.3f} | "
                     f"{mib(m['base'])} | {mib(m['peak'])} | {mib(growth)} | {growth / one_layer:.1f} | "
                     f"{mib(m['trace'][0])} → {mib(m['trace'][-1])} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, help="analyse this cache instead of a synthetic one")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--label", help="how to describe --cache in the heading (default: its path)")
    ap.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "analyze.md")
    args = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        warm = write_synthetic(tmpd / "warm.h5", 2, 64, 8)
        path = args.cache or write_synthetic(tmpd / "bench.h5", args.layers, args.tokens, args.queries)
        one_layer, desc = layer_bytes(path)
        n = desc["layers"]
        one = {"OMP_NUM_THREADS": "1"}
        runs = [(f"first {k} layers, 1 thread", f"0-{k - 1}", "", one) for k in (3, 10) if k < n]
        runs += [("all layers, 1 thread", "all", "", one),
                 (f"all layers, default threads ({os.cpu_count()})", "all", "", {}),
                 ("all layers, 1 thread, glibc mmap threshold 128 KiB", "all", "", {**one, **LIVE}),
                 ("all layers + --plots, 1 thread", "all", str(tmpd / "plots"), one)]
        rows = [(label, measure(path, warm, spec, plots, env)) for label, spec, plots, env in runs]
        file_mib = mib(path.stat().st_size)
    source = (args.label or str(args.cache)) if args.cache else "synthetic (benchmarks/bench_analyze.py)"
    lines = [f"### `kvtool analyze` — {source}", "",
             f"{desc['layers']} layers × {desc['tokens']} tokens, {desc['kv_heads']} kv / {desc['q_heads']} q "
             f"heads, head_dim {desc['head_dim']}, queries for the last {desc['queries']} positions, "
             f"stored {desc['dtype']} ({file_mib} MiB file). One layer in memory (float32 keys + values + "
             f"queries): {mib(one_layer)} MiB; all layers: {mib(one_layer * n)} MiB.", "",
             *table(rows, one_layer), "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}, torch {_torch_version()}; load average "
             f"{load[0]:.1f} → {os.getloadavg()[0]:.1f} (a shared machine: wall time varies; with other jobs "
             "running, torch's intra-op threads cost more than they gain on these small per-layer matrices). "
             "RSS before = after imports and a warm-up on a tiny cache; peak = VmHWM after resetting it.", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if args.out.exists() and (args.cache or args.append) else "w"
    with args.out.open(mode) as f:
        f.write(text + "\n")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
