"""``salient`` with AdaKV's head-adaptive budgets (``per_head=true``): each head's rows coded on their own.

When heads keep different numbers of rows, ``salient`` codes each head's rows of a part with its own copy
of the part (its own TurboQuant mean, sink rows and outlier channels; kvtool/codecs/compose/salient.py).
Before that layout the rows of all heads were gathered into one sequence, one mean and one set of sink rows
for the whole layer; [8x.md](8x.md)'s AdaKV row was measured that way (1.921 bits, KLD 0.0183 on GPL-3,
0.0372 on Apache-2.0). Rows: the 8× pick with the shared keep (equal counts, coded as before), the same
widths with per-head budgets, and 8x.md's AdaKV row (both 3 bits).

Scored by ``kvtool eval`` (prefill, one 2,048-token chunk per text: the first half coded, the second half
scored; one shared exact pass per text), the bundled SmolLM2-135M. GPL-3 is the text the pick was chosen
on, Apache-2.0 held out.

Run (about 4 minutes per text on 2 shared cores)::

    .venv/bin/python benchmarks/bench_salient_heads.py [--texts gpl-3.0 apache-2.0]

Writes benchmarks/results/salient_heads.md and salient_heads.<text>.json beside it.
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
CONTEXT = 2048


def salient(bits: float, select: str) -> str:
    return f"salient:select=[expected:keep=0.6{select}],hi=[turboquant:bits={bits:g},{FORM}],lo=[drop]"


ROWS = [  # (label, keys, values)
    ("the pick: keep 0.6 in every head, keys 3.25 / values 2.5 bits", salient(3.25, ""), salient(2.5, "")),
    ("keep 0.6 per head (AdaKV), keys 3.25 / values 2.5 bits", salient(3.25, ",per_head=true"),
     salient(2.5, ",per_head=true")),
    ("keep 0.6 per head (AdaKV), both 3 bits (8x.md's row)", salient(3, ",per_head=true"),
     salient(3, ",per_head=true")),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", nargs="+", default=["gpl-3.0", "apache-2.0"])
    parser.add_argument("--output", type=Path, default=RESULTS / "salient_heads.md")
    args = parser.parse_args()
    loaded = load_model("default")
    lines = ["`kvtool eval`, prefill mode, one 2,048-token chunk per text (1,023 tokens scored), the bundled "
             "SmolLM2-135M; `salient:select=[expected:...],hi=[turboquant:bits=B,"
             f"{FORM}],lo=[drop]`. Bits: every stored byte (mask, codes, norms, means, fp16 sink rows, "
             "outlier channel tables). Heads that keep different numbers of rows are coded head by head.", "",
             "| text | keys / values | bits | Δppl % | KLD | top-1 % |", "|---|---|---:|---:|---:|---:|"]
    for text in args.texts:
        tokens = tokenize_text(loaded, ROOT / "samples" / f"{text}.txt", CONTEXT)
        r = evaluate(loaded, tokens, [Assignment.of(k, v) for _, k, v in ROWS], context=CONTEXT,
                     labels=[label for label, _, _ in ROWS], source=f"samples/{text}.txt")
        write_text_atomic(args.output.with_name(f"{args.output.stem}.{text}.json"), json.dumps(r, indent=1))
        for m in r["methods"]:
            lines.append(f"| {text} | {m['label']} | {m['bits_per_element']:.3f} | {m['delta_ppl_pct']:+.2f} ± "
                         f"{m['delta_ppl_pct_stderr']:.2f} | {m['kld_mean']:.4f} ± {m['kld_stderr']:.4f} | "
                         f"{100 * m['top1_agreement']:.1f} |")
    lines.append("")
    write_text_atomic(args.output, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
