"""Passkey retrieval with KVzip's selection in the cache, beside the query-aware selectors and the 8× composite.

The same protocol as bench_tasks.py (``kvtool eval --task passkey`` over samples/gpl-3.0.txt, the bundled
SmolLM2-135M-Instruct, seed 0, depths 0, 0.25, 0.5, 0.75, 1, ``--samples`` prompts per cell), with KVzip's
query-agnostic scores (kvtool.reconstruct: the model repeats its prompt; one pass per prompt, shared by every
method that reads it) against Expected Attention and SnapKV at the same keep, and the 8× composite of
docs/FIDELITY.md. tasks.md holds the other methods on the same prompts (its lengths 1k and 2k).

Run (about 15 minutes on 2 cores)::

    .venv/bin/python benchmarks/bench_tasks_kvzip.py [--lengths 1k,2k] [--samples 2]

Writes benchmarks/results/tasks_kvzip.md and tasks_kvzip.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_tasks import DEPTHS, pct, per_length

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FORM = "center=true,sink=4,norm_bits=8,unbiased=true"
SEL = "kvzip:keep=0.6,per_head=true"
COMPOSITE = (f"salient:select=[{SEL}],hi=[turboquant:bits=3.25,{FORM}],lo=[drop]",
             f"salient:select=[{SEL}],hi=[turboquant:bits=2.5,{FORM}],lo=[drop]")
METHODS = ["kvzip:keep=0.5", "kvzip:keep=0.5,per_head=true", "kvzip:keep=0.25,per_head=true",
           "expected:keep=0.5", "snapkv:keep=0.5", COMPOSITE]


def label(method: object) -> str:
    return method if isinstance(method, str) else f"8× composite: {SEL}, keys 3.25 / values 2.5 bits (1.97 bits)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1k,2k")
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args()
    from kvtool.codecs.assignment import Assignment
    from kvtool.models import load_model
    from kvtool.report import json_safe
    from kvtool.tasks import parse_lengths
    from kvtool.tasks.run import run_tasks
    from kvtool.util import write_text_atomic

    lengths = parse_lengths(args.lengths)
    loaded = load_model("default")
    methods = [m if isinstance(m, str) else Assignment.of(*m) for m in METHODS]
    r = json_safe(run_tasks(loaded, "passkey", ROOT / "samples" / "gpl-3.0.txt", methods, lengths=lengths,
                            depths=DEPTHS, samples=args.samples, seed=0, labels=[label(m) for m in METHODS]))
    write_text_atomic(RESULTS / "tasks_kvzip.json", json.dumps(r, indent=1))
    lines = [f"`kvtool.tasks.run_tasks` — passkey on samples/gpl-3.0.txt, the bundled SmolLM2-135M-Instruct, "
             f"{r['template']} template, seed 0 (the prompts of tasks.md at these lengths): {len(lengths)} lengths x "
             f"{len(DEPTHS)} depths x {args.samples} prompts = {r['prompts']} prompts per method. Accuracy with its "
             "Wilson 95 % interval; agreement: the same reply as the exact cache.", "",
             "| method | bits | " + " | ".join(f"{n} acc %" for n in lengths) + " | accuracy % [95 % CI] | "
             "agreement % [95 % CI] | seconds |", "|---|---:|" + "---:|" * len(lengths) + "---:|---:|---:|"]
    for m in [r["exact"], *r["methods"]]:
        bits = m.get("bits_per_element")
        agree = pct(m["agreement"], m["agreement_low"], m["agreement_high"]) if "agreement" in m else "-"
        lines.append(f"| `{m['label']}` | {'-' if bits is None else f'{bits:.3f}'} | "
                     + " | ".join(per_length(m, lengths))
                     + f" | {pct(m['accuracy'], m['accuracy_low'], m['accuracy_high'])} | {agree} | "
                     f"{m['seconds']:.0f} |")
    lines += ["", f"Wall time {r['seconds'] / 60:.0f} min on 2 cores. The seconds of a `kvzip` method include "
              "the reconstruction pass (one per prompt, shared).", ""]
    write_text_atomic(RESULTS / "tasks_kvzip.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
