"""What KVzip's reconstruction pass costs against the exact prefill of the same prompt (kvtool.reconstruct).

The bundled SmolLM2-135M, prompts of the first ``L`` tokens of samples/licences-long.txt (``kvtool eval
--context 2L`` codes such a prompt per chunk). Per round, interleaved: the prompt's exact prefill
(``evaluate.exact_prefill``) and the reconstruction pass from copies of its cache (``reconstruction_scores``:
the forward over the repeated prompt and the attention hook that scores it). Median wall seconds over the
rounds; the ratio is the figure (both measured in the same run, on the same load).

Run (about 5 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_reconstruct.py [--lengths 1024,4096] [--rounds 2]

Writes benchmarks/results/reconstruct.md and reconstruct.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from kvtool.evaluate import exact_prefill, tokenize_text
from kvtool.models import load_model, model_shape
from kvtool.reconstruct import passes, reconstruction_scores
from kvtool.util import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model("default")
    layers = model_shape(loaded.config).num_layers
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        prompt = tokenize_text(loaded, ROOT / "samples" / "licences-long.txt", n)
        ids = torch.as_tensor(prompt)[None]
        prefill, rebuild = [], []
        for _ in range(args.rounds):
            with torch.inference_mode():
                t0 = time.perf_counter()
                cache, _ = exact_prefill(loaded, ids, 0)
                prefill.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                reconstruction_scores(loaded.model, loaded.tokenizer, lambda c=cache: copy.deepcopy(c), prompt,
                                      layers, loaded.device)
                rebuild.append(time.perf_counter() - t0)
            del cache
        a, b = statistics.median(prefill), statistics.median(rebuild)
        rows.append({"prompt_tokens": n, "passes": passes(loaded.tokenizer, prompt), "seconds_prefill": a,
                     "seconds_reconstruction": b, "ratio": b / a, "rounds": args.rounds})
        print(rows[-1], flush=True)
    write_text_atomic(RESULTS / "reconstruct.json", json.dumps(rows, indent=1))
    lines = ["KVzip's reconstruction pass against the exact prefill of the same prompt, the bundled SmolLM2-135M, "
             "samples/licences-long.txt, median wall seconds of interleaved rounds on 2 cores (the ratio is the "
             "figure). `kvtool eval --context 2L` runs one such pass per chunk for the methods that read it; the "
             "exact side of a chunk is the prefill plus the scored pass, about twice the prefill.", "",
             "| prompt tokens | passes | prefill s | reconstruction s | reconstruction / prefill |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['prompt_tokens']:,} | {r['passes']} | {r['seconds_prefill']:.1f} | "
                     f"{r['seconds_reconstruction']:.1f} | {r['ratio']:.2f}× |")
    write_text_atomic(RESULTS / "reconstruct.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
