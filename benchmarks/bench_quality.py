"""Codec quality on a real cache: stored bits against attention error, one layer, same queries.

The issue's protocol: SmolLM2 (the bundled model), 2048 tokens of samples/gpl-3.0.txt, layer 15, the last
128 queries. Every spec is applied to keys and values (``--method``), measured with kvtool.metrics, and
one row is written per spec: stored bits per element, keys/values rel MSE, attention-output cosine
(mean over heads and queries) and relative error, mean KL and top-8 overlap.

Run (captures the cache first if it is missing)::

    .venv/bin/python benchmarks/bench_quality.py [--cache out/gpl2048.h5] [--layer 15] [SPEC ...]

Writes benchmarks/results/quality.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = [
    "fp8", "kivi:bits=4", "kivi:bits=2", "uniform:bits=4,group=64", "uniform:bits=3,group=32",
    "turboquant:bits=4", "turboquant:bits=3", "turboquant:bits=2.5",
    "turboquant:bits=4,center=true,sink=1", "turboquant:bits=3,center=true,sink=1",
    "turboquant:bits=4,variant=prod", "turboquant:bits=3,variant=prod", "polarquant", "qjl",
]


def ensure_cache(path: Path, text: str = "gpl-3.0") -> None:
    """Capture 2048 tokens of ``samples/<text>.txt`` with the last 128 queries into ``path`` if missing."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).parent / "kvtool"), "capture", "--text",
                    str(ROOT / "samples" / f"{text}.txt"), "--max-tokens", "2048", "--queries", "last:128",
                    "--output", str(path)], check=True)


def main() -> None:
    from kvtool.codecs import parse_pair
    from kvtool.compress import compress
    from kvtool.errors import KvtoolError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=SPECS)
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "gpl2048.h5")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "quality.md")
    args = parser.parse_args()
    ensure_cache(args.cache)
    lines = [f"Quality at layer {args.layer} of `{args.cache.name}` (keys and values with the same spec; "
             "attention over the captured queries, causal, the model's scaling).", "",
             "| spec | stored bits/elem | K rel MSE | V rel MSE | attn-out cosine | attn-out rel err | KL | top-8 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in args.specs:
        try:
            keys, values = parse_pair(method=spec)
            r = compress(args.cache, keys, values, layers=[args.layer], require_attention=True)
        except KvtoolError as exc:
            print(f"{spec}: {exc}", file=sys.stderr)
            continue
        row = r["layers"][0]
        bits = r["total"]["bits_per_element"]
        lines.append(f"| `{spec}` | {bits:.3f} | {row['keys']['rel_mse']:.4f} | {row['values']['rel_mse']:.4f} | "
                     f"{row['attention_output_cosine']:.4f} | {row['attention_output_rel_error']:.4f} | "
                     f"{row['attention_kl']:.2e} | {row['topk_overlap']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
