"""TurboQuant on real caches, every layer, several seeds: does an option help beyond one layer and one draw?

One layer and one rotation seed are too noisy to rank variants: at layer 15 of the GPL-3 capture,
``turboquant:bits=3`` gives attention-output cosines from 0.948 to 0.970 over eight seeds. This script
applies each spec to keys and values (``--method``) of every layer of two 2048-token SmolLM2 captures
(GPL-3 and Apache-2.0, last 128 queries), for ``--seeds`` rotation seeds, and reports the stored bits,
the attention-output cosine averaged over layers (mean over seeds, and the range of the per-seed
means), the worst layer, and in how many layers the spec beats plain ``turboquant`` at the same ``bits``.

With ``--public-python PY`` (a separate venv holding ``polarquant`` 0.6.0, see bench_public.py) the
public package's ``PolarKVQuantizer`` (Walsh-Hadamard rotation, Gaussian Lloyd-Max codes, bf16 norm;
deterministic, so one run) is applied to the same keys and values in that interpreter, and its
reconstructions are measured here with the same metrics.

Run (captures the caches into out/ first if they are missing; about 2 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_quality_layers.py [--seeds 3] [--layers 15] [--public-python PY] [SPEC ...]

Writes benchmarks/results/quality_layers.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import ensure_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {"gpl-3.0": ROOT / "out" / "gpl2048.h5", "apache-2.0": ROOT / "out" / "apache2048.h5"}
SPECS = [
    "turboquant:bits=3", "turboquant:bits=3,sink=1", "turboquant:bits=3,center=true",
    "turboquant:bits=3,center=true,sink=1", "turboquant:bits=4", "turboquant:bits=4,center=true,sink=1",
]


def per_layer_cosine(cache: Path, spec: str, seed: int, layers: list[int] | None) -> tuple[np.ndarray, float]:
    """Attention-output cosine per layer ``(layers,)`` (all layers by default) and the stored bits."""
    from kvtool.codecs import parse_pair
    from kvtool.compress import compress

    keys, values = parse_pair(method=f"{spec},seed={seed}")
    report = compress(cache, keys, values, layers=layers, require_attention=True)
    cos = np.array([layer["attention_output_cosine"] for layer in report["layers"]])
    return cos, report["total"]["bits_per_element"]


#: Runs in the public package's interpreter: argv[1] an .npz of (layers, heads, tokens, d) float32 tensors,
#: argv[2] the .npz to write with each tensor's reconstruction per bit width and its stored bytes.
PUBLIC_SCRIPT = """
import sys, numpy as np, torch
from polarengine_vllm.kv_cache.cache import PolarKVQuantizer
out = {}
for name, x in np.load(sys.argv[1]).items():
    for bits in (3, 4):
        q = PolarKVQuantizer(x.shape[-1], nbits=bits, device="cpu")
        packed, norms = q.quantize(torch.from_numpy(x))
        out[f"{name}.{bits}"] = q.dequantize(packed, norms, x.shape).float().numpy()
        stored = packed.numel() * packed.element_size() + norms.numel() * norms.element_size()
        out[f"{name}.{bits}.bytes"] = np.array(stored)
np.savez(sys.argv[2], **out)
"""


def public_cosine(cache: Path, python: str, layers: list[int] | None) -> dict[int, tuple[np.ndarray, float]]:
    """polarquant 0.6.0 at 3 and 4 bits: per-layer attention-output cosine and stored bits, by bit width."""
    from kvtool.metrics import attention
    from kvtool.store import CacheReader

    reader = CacheReader(cache)
    data = [reader.layer(i) for i in (layers or range(reader.info.num_layers))]
    keys = np.stack([d.keys for d in data]).astype(np.float32)  # (layers, heads, tokens, d)
    values = np.stack([d.values for d in data]).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/in.npz", keys=keys, values=values)
        subprocess.run([python, "-c", PUBLIC_SCRIPT, f"{tmp}/in.npz", f"{tmp}/out.npz"], check=True)
        out = dict(np.load(f"{tmp}/out.npz"))
    results = {}
    for bits in (3, 4):
        k_hat, v_hat = out[f"keys.{bits}"], out[f"values.{bits}"]
        cos = np.array([attention(d.queries, d.keys, d.values, k_hat[j], v_hat[j], d.query_positions,
                                  d.key_positions, scaling=d.scaling)["attention_output_cosine"]
                        for j, d in enumerate(data)])
        stored = int(out[f"keys.{bits}.bytes"]) + int(out[f"values.{bits}.bytes"])
        results[bits] = (cos, 8 * stored / (keys.size + values.size))
    return results


def baseline_of(spec: str) -> str:
    """``turboquant:bits=B`` for a ``turboquant:bits=B,...`` spec."""
    return spec.split(",")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=SPECS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="+", help="only these layers (default: all)")
    parser.add_argument("--public-python", help="python of a separate venv with polarquant 0.6.0")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "quality_layers.md")
    args = parser.parse_args()
    which = "all layers" if args.layers is None else f"layers {', '.join(map(str, args.layers))}"
    lines = [f"Attention-output cosine averaged over {which}, keys and values with the same spec, {args.seeds} "
             "rotation seeds (mean; in brackets the lowest and highest per-seed mean). `worst layer`: the "
             "lowest per-layer cosine (seed mean); `beats plain`: layers where the spec's seed-mean cosine "
             "exceeds plain `turboquant` at the same bits. The public package's rotation is fixed: one run, no "
             "range.", "",
             "| text | spec | stored bits/elem | mean cosine | worst layer | beats plain |",
             "|---|---|---:|---:|---:|---:|"]
    for text, cache in TEXTS.items():
        ensure_cache(cache, text)
        results: dict[str, tuple[np.ndarray, float]] = {}
        for spec in args.specs:
            runs = [per_layer_cosine(cache, spec, seed, args.layers) for seed in range(args.seeds)]
            cos = np.stack([c for c, _ in runs])  # (seeds, layers)
            results[spec] = (cos, runs[0][1])
            layer_mean = cos.mean(0)
            base = results.get(baseline_of(spec))
            beats = "" if base is None or spec == baseline_of(spec) else \
                f"{int((layer_mean > base[0].mean(0)).sum())}/{len(layer_mean)}"
            seed_means = cos.mean(1)
            lines.append(f"| {text} | `{spec}` | {runs[0][1]:.3f} | {cos.mean():.4f} "
                         f"[{seed_means.min():.4f}, {seed_means.max():.4f}] | {layer_mean.min():.4f} | {beats} |")
            print(lines[-1], flush=True)
        if args.public_python:
            for bits, (cos, stored) in public_cosine(cache, args.public_python, args.layers).items():
                base = results.get(f"turboquant:bits={bits}")
                beats = "" if base is None else f"{int((cos > base[0].mean(0)).sum())}/{len(cos)}"
                lines.append(f"| {text} | polarquant 0.6.0 `PolarKVQuantizer(nbits={bits})` | {stored:.3f} | "
                             f"{cos.mean():.4f} | {cos.min():.4f} | {beats} |")
                print(lines[-1], flush=True)
    text_out = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text_out)
    print()
    print(text_out)


if __name__ == "__main__":
    main()
