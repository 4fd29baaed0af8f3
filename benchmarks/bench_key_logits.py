"""How far key codecs move each layer's attention, on a capture's own queries (no model run).

For each layer of a ``kvtool capture`` file (with recorded queries) and each key codec: the codec is fitted
to and codes the layer's keys, then, for every recorded query, the attention logits ``s·q·k`` are compared
with the exact ones — the standard deviation of the logit error, and the mean KL divergence (nats) between
the exact and the coded attention distributions over all the keys. It shows which layers a codec breaks
before any end-to-end score (``kvtool eval``) mixes them.

Run (seconds)::

    .venv/bin/python benchmarks/bench_key_logits.py CAPTURE.h5 --name qwen2.5-coder-0.5b [--specs ...]

Writes benchmarks/results/key_logits.<name>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np

from kvtool.codecs.spec import parse_spec
from kvtool.util import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPECS = ["turboquant:bits=3", "turboquant:bits=4", "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true",
         "kvquant:bits=4,outliers=0"]


def layer_figures(keys: np.ndarray, queries: np.ndarray, scaling: float, spec: str) -> dict[str, float]:
    """``keys`` ``(kv_heads, T, d)``, ``queries`` ``(q_heads, Q, d)``: logit error std and mean attention KL."""
    codec = parse_spec(spec).for_role("keys").fit(keys)
    coded = codec.decode(codec.encode(keys))
    group = queries.shape[0] // keys.shape[0]
    exact = scaling * np.einsum("htd,hsd->hst", np.repeat(keys, group, 0).astype(np.float64), queries)  # (H, Q, T)
    moved = scaling * np.einsum("htd,hsd->hst", np.repeat(coded, group, 0).astype(np.float64), queries)
    log_p = exact - exact.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = moved - moved.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # (H, Q)
    return {"logit_error_std": float((moved - exact).std()), "attention_kl": float(kl.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("capture", type=Path)
    parser.add_argument("--name", required=True, help="the model's name in the output file")
    parser.add_argument("--specs", nargs="+", default=SPECS)
    parser.add_argument("--layers", nargs="+", type=int, default=None, help="default: every layer")
    args = parser.parse_args()
    rows = []
    with h5py.File(args.capture, "r") as f:
        scaling = float(f.attrs["attn_scaling"])
        layers = args.layers if args.layers is not None else range(int(f.attrs["num_layers"]))
        for layer in layers:
            g = f[f"sequences/0/layers/{layer}"]
            keys = np.asarray(g["keys"], dtype=np.float32)
            queries = np.asarray(g["queries"], dtype=np.float64)
            rows.append({"layer": layer, **{s: layer_figures(keys, queries, scaling, s) for s in args.specs}})
    lines = [f"Key codecs on the captured keys of {args.name} ({args.capture.name}), scored with the capture's own "
             "queries: per layer, the standard deviation of the attention-logit error and the mean KL (nats) "
             "between the exact and the coded attention over all keys. Codecs get no RoPE here, so `kvquant` codes "
             "the stored (post-RoPE) keys per channel.", "",
             "| layer | " + " | ".join(f"`{s}` logit err / KL" for s in args.specs) + " |",
             "|---:|" + "---:|" * len(args.specs)]
    for r in rows:
        lines.append(f"| {r['layer']} | " + " | ".join(f"{r[s]['logit_error_std']:.2f} / {r[s]['attention_kl']:.3f}"
                                                      for s in args.specs) + " |")
    lines.append("")
    out = RESULTS / f"key_logits.{args.name}.md"
    write_text_atomic(out, "\n".join(lines))
    write_text_atomic(out.with_suffix(".json"), json.dumps({"capture": args.capture.name, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
