"""8× fp16 at KLD ≤ 0.01 on the bundled model: eviction × quantization compositions at ≤ 2.0 stored bits.

Every composition keeps the tokens Expected Attention scores highest (kvpress's form, ``expected``) and
codes the kept rows with TurboQuant's recommended form at a whole or fractional width; keys and values may
differ in width (the selection is the same: both roles score with the layer's keys). Scored by
``kvtool eval`` (prefill, one shared exact pass per text) on text no spec was chosen on: the candidates
were picked on GPL-3 (benchmarks/results/models.md, FIDELITY.md); this run scores Apache-2.0 (and GPL-3
for reference).

Run (about 15 minutes per text and context on 2 shared cores)::

    .venv/bin/python benchmarks/bench_8x.py [--texts apache-2.0 gpl-3.0] [--contexts 2048 8192]

Writes benchmarks/results/8x.md and 8x.<text>.<context>.json beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvtool.codecs.assignment import Assignment
from kvtool.evaluate import evaluate, tokenize_text
from kvtool.models import load_model
from kvtool.util import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FORM = "center=true,sink=4,norm_bits=8,unbiased=true"


def tq(bits: float) -> str:
    return f"turboquant:bits={bits:g},{FORM}"


PAIRS = [  # (keys, values)
    (f"expected:keep=0.5+{tq(3)}",) * 2,
    (f"expected:keep=0.55+{tq(3)}",) * 2,
    (f"expected:keep=0.57+{tq(3)}",) * 2,
    (f"expected:keep=0.5+{tq(3.5)}",) * 2,
    (f"expected:keep=0.5+{tq(4)}", f"expected:keep=0.5+{tq(3)}"),
    (f"expected:keep=0.5+{tq(3)}", f"expected:keep=0.5+{tq(4)}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", nargs="+", default=["apache-2.0"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048])
    parser.add_argument("--output", type=Path, default=RESULTS / "8x.md")
    args = parser.parse_args()
    loaded = load_model("default")
    labels = [k if k == v else f"K {k} / V {v}" for k, v in PAIRS]
    rows = []
    for text in args.texts:
        for context in args.contexts:
            tokens = tokenize_text(loaded, ROOT / "samples" / f"{text}.txt", context)
            r = evaluate(loaded, tokens, [Assignment.of(k, v) for k, v in PAIRS], context=context,
                         labels=labels, source=f"samples/{text}.txt")
            write_text_atomic(args.output.with_name(f"8x.{text}.{context}.json"), json.dumps(r, indent=1))
            rows += [(text, context, m) for m in r["methods"]]
    lines = ["`kvtool eval`, prefill mode, one chunk of --context tokens per text (the first half coded, the "
             "second half scored), the bundled SmolLM2-135M. Bits: stored bits per element of the coded "
             "prompt (kept indices, codes, norms, fp16 sinks: every byte). 8× fp16 = 2.0 bits.", "",
             "| text | context | keys / values | bits | Δppl % | KLD | top-1 % |", "|---|---:|---|---:|---:|---:|---:|"]
    for text, context, m in rows:
        ok = " ✓" if m["bits_per_element"] <= 2.0 and m["kld_mean"] <= 0.01 else ""
        lines.append(f"| {text} | {context} | `{m['label']}` | {m['bits_per_element']:.3f} | "
                     f"{m['delta_ppl_pct']:+.2f} ± {m['delta_ppl_pct_stderr']:.2f} | {m['kld_mean']:.4f} ± "
                     f"{m['kld_stderr']:.4f}{ok} | {100 * m['top1_agreement']:.1f} |")
    lines.append("")
    write_text_atomic(args.output, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
