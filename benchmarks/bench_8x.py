"""8× fp16 at KLD ≤ 0.01 on the bundled model: eviction × quantization compositions at ≤ 2.0 stored bits.

Every composition keeps the tokens Expected Attention scores highest (kvpress's form, ``expected``) and
codes the kept rows with TurboQuant's recommended form; keys and values may differ in width (the selection
is the same: both roles score with the layer's keys). Two stored forms of the selection: ``expected:keep=f+
SPEC`` stores one index per kept token and head (16 bits at these lengths), ``salient:select=[expected:
keep=f],hi=[SPEC],lo=[drop]`` one bit per token and head, and spends the difference on keeping more tokens.
Two rows try keeping the "evicted" tokens at low precision instead (``lo=[turboquant:bits=1,...]``, MiKV)
and AdaKV's head-adaptive budgets (``per_head=true``).

Scored by ``kvtool eval`` (prefill, one shared exact pass per text). The compositions were chosen on GPL-3
(its first 2,048 tokens, and for the components its second 2,048); Apache-2.0 is the held-out text: nothing
was chosen on it. A run scores both (``--texts``). 8k: no sample text is long enough to hold an 8,192-token
chunk of held-out text (Apache-2.0 has about 2,400 tokens, GPL-3 about 7,500).

Run (about 7 minutes per text and context on 2 shared cores)::

    .venv/bin/python benchmarks/bench_8x.py [--texts apache-2.0 gpl-3.0] [--contexts 2048]

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


def salient(keep: float, bits: float, select: str = "", by: str = "expected") -> str:
    """The kept rows in the TurboQuant form at ``bits``, the selection (by ``by``) as one bit per token and head."""
    return f"salient:select=[{by}:keep={keep:g}{select}],hi=[{tq(bits)}],lo=[drop]"


PAIRS = [  # (keys, values)
    (f"expected:keep=0.57+{tq(3)}",) * 2,  # the best before (FIDELITY.md): indices stored per kept token
    (salient(0.6, 3),) * 2,
    (salient(0.64, 3.5), salient(0.64, 2)),
    (salient(0.6, 3.25), salient(0.6, 2.5)),  # the best at <= 2.0 bits on GPL-3: the pick
    (salient(0.58, 3.5), salient(0.58, 2.5)),
    (salient(0.72, 3), salient(0.72, 2)),
    (salient(0.65, 3), salient(0.65, 2.5)),
    (salient(0.6, 3, ",per_head=true"),) * 2,  # AdaKV: heads share the layer's budget
    # MiKV: the 60 % the selector would evict kept at 1 bit instead of dropped
    (f"salient:select=[expected:keep=0.4],hi=[{tq(3)}],lo=[turboquant:bits=1,center=true,norm_bits=8,"
     "unbiased=true]",) * 2,
    # KVzip's selection (kvtool.reconstruct: the model repeats its prompt) with the pick's widths
    (salient(0.6, 3.25, by="kvzip"), salient(0.6, 2.5, by="kvzip")),
    (salient(0.6, 3.25, ",per_head=true", by="kvzip"), salient(0.6, 2.5, ",per_head=true", by="kvzip")),
    # other splits of the same budget with KVzip's head-adaptive selection (explored on GPL-3's second chunk)
    (salient(0.5, 4, ",per_head=true", by="kvzip"), salient(0.5, 3, ",per_head=true", by="kvzip")),
    (salient(0.55, 3.5, ",per_head=true", by="kvzip"), salient(0.55, 3, ",per_head=true", by="kvzip")),
    (salient(0.64, 3.5, ",per_head=true", by="kvzip"), salient(0.64, 2, ",per_head=true", by="kvzip")),
    (salient(0.5, 3.5, ",per_head=true", by="kvzip"),) * 2,
    ("kvzip:keep=0.6,per_head=true",) * 2,  # the selection alone (16-bit rows, indices): its share of the error
    (salient(0.6, 3.5, ",per_head=true", by="kvzip"), salient(0.6, 2.25, ",per_head=true", by="kvzip")),
    (salient(0.6, 3, ",per_head=true", by="kvzip"), salient(0.6, 2.75, ",per_head=true", by="kvzip")),
    (salient(0.58, 3.5, ",per_head=true", by="kvzip"), salient(0.58, 2.5, ",per_head=true", by="kvzip")),
    # the pick with the newest tokens protected, or fewer kept and wider keys
    (salient(0.6, 3.25, ",per_head=true,recent=32", by="kvzip"),
     salient(0.6, 2.5, ",per_head=true,recent=32", by="kvzip")),
    (salient(0.56, 3.75, ",per_head=true", by="kvzip"), salient(0.56, 2.5, ",per_head=true", by="kvzip")),
    (salient(0.62, 3.25, ",per_head=true", by="kvzip"), salient(0.62, 2.25, ",per_head=true", by="kvzip")),
]
CHOSEN = 3  # the row picked on GPL-3 (KLD 0.0052 at 1.972 bits there); Apache-2.0 scores it held-out


def _pick(keep: float, select: str = "expected", extra: str = "") -> tuple[str, str]:
    """The pick's widths (keys 3.5, values 2 bits) with another selection."""
    sel = f"{select}:keep={keep:g}{extra}"
    return (f"salient:select=[{sel}],hi=[{tq(3.5)}],lo=[drop]", f"salient:select=[{sel}],hi=[{tq(2)}],lo=[drop]")


def _layered(keeps: list[float]) -> Assignment:
    """The pick with a keep ratio per layer (PyramidKV-style budgets across layers)."""
    layers = {i: dict(zip(("keys", "values"), _pick(k), strict=True)) for i, k in enumerate(keeps)}
    return Assignment(*_pick(0.64), layers)


LAYERS = 30  # SmolLM2-135M
EXPLORE: list[tuple[str, Assignment]] = [  # on GPL-3's second 2,048-token chunk: what limits the pick
    ("the pick", Assignment.of(*_pick(0.64))),
    ("eviction alone: expected:keep=0.6", Assignment.of("expected:keep=0.6", "expected:keep=0.6")),
    ("quantization alone: the 3-bit form", Assignment.of(tq(3), tq(3))),
    ("the pick, the newest 64 tokens always kept", Assignment.of(*_pick(0.64, extra=",recent=64"))),
    ("the pick selected by snapkv", Assignment.of(*_pick(0.64, "snapkv"))),
    ("the pick selected by h2o", Assignment.of(*_pick(0.64, "h2o"))),
    ("layers 0-9 keep 0.8, the rest 0.56", _layered([0.8] * 10 + [0.56] * (LAYERS - 10))),
    ("layers 0-9 keep 0.5, the rest 0.71", _layered([0.5] * 10 + [0.71] * (LAYERS - 10))),
    ("keep falling linearly 0.84 → 0.44", _layered([0.84 - 0.4 * i / (LAYERS - 1) for i in range(LAYERS)])),
]


def explore(loaded: object, output: Path) -> None:
    """The study behind the pick on GPL-3's second chunk (tokens 2,048-4,095; never Apache-2.0)."""
    tokens = tokenize_text(loaded, ROOT / "samples" / "gpl-3.0.txt")[2048:4096]
    r = evaluate(loaded, tokens, [a for _, a in EXPLORE], context=2048, labels=[n for n, _ in EXPLORE],
                 source="samples/gpl-3.0.txt tokens 2048-4095")
    write_text_atomic(output.with_name("8x.explore.json"), json.dumps(r, indent=1))
    lines = ["GPL-3, tokens 2,048-4,095 (one 2,048-token chunk), the bundled model, one exact pass. The pick: "
             f"`{_pick(0.64)[0]}` for keys, values at 2 bits.", "",
             "| variant | bits | Δppl % | KLD |", "|---|---:|---:|---:|"]
    for m in r["methods"]:
        lines.append(f"| {m['label']} | {m['bits_per_element']:.3f} | {m['delta_ppl_pct']:+.2f} ± "
                     f"{m['delta_ppl_pct_stderr']:.2f} | {m['kld_mean']:.4f} ± {m['kld_stderr']:.4f} |")
    write_text_atomic(output.with_name("8x.explore.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", nargs="+", default=["apache-2.0", "gpl-3.0"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048])
    parser.add_argument("--output", type=Path, default=RESULTS / "8x.md")
    parser.add_argument("--rows", default=None, help="comma-separated indices into PAIRS (default: all)")
    parser.add_argument("--model", default="default", help="the model (kvtool's --model names); the header says "
                        "which")
    parser.add_argument("--chunks", type=int, default=1, help="chunks of --context tokens scored per text "
                        "(the figures are over all of them)")
    parser.add_argument("--offset", type=int, default=0, help="first token of the text to score from (a later "
                        "chunk of a long text, held out from what the rows were chosen on)")
    parser.add_argument("--chosen-on", default="GPL-3", help="the text the pick was chosen on (for the header)")
    parser.add_argument("--explore", action="store_true", help="only the study behind the pick, on GPL-3's "
                        "second chunk (writes 8x.explore.md)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    if args.explore:
        explore(loaded, args.output)
        return
    pairs = PAIRS if args.rows is None else [PAIRS[int(i)] for i in args.rows.split(",")]
    labels = [k if k == v else f"K {k} / V {v}" for k, v in pairs]
    chosen = "K {} / V {}".format(*PAIRS[CHOSEN])
    rows = []
    for text in args.texts:
        for context in args.contexts:
            tokens = tokenize_text(loaded, ROOT / "samples" / f"{text}.txt",
                                   args.offset + args.chunks * context)[args.offset:]
            where = f" tokens {args.offset}-{args.offset + len(tokens) - 1}" if args.offset else ""
            r = evaluate(loaded, tokens, [Assignment.of(k, v) for k, v in pairs], context=context,
                         labels=labels, source=f"samples/{text}.txt{where}")
            at = f".{args.offset}" if args.offset else ""
            write_text_atomic(args.output.with_name(f"{args.output.stem}.{text}.{context}{at}.json"),
                              json.dumps(r, indent=1))
            rows += [(text + (f" from token {args.offset:,}" if args.offset else ""), context, m)
                     for m in r["methods"]]
    model = "the bundled SmolLM2-135M" if args.model == "default" else f"`--model {args.model}`"
    lines = [f"`kvtool eval`, prefill mode, {args.chunks} chunk(s) of --context tokens per text (the first half "
             f"coded, the second half scored), {model}. Bits: stored bits per element of the coded "
             "prompt (kept indices or the selection mask, codes, norms, fp16 sinks: every byte). 8× fp16 = 2.0 bits. "
             f"Chosen on {args.chosen_on}; every other text is held out.", "",
             "| text | context | keys / values | bits | Δppl % | KLD | top-1 % |", "|---|---:|---|---:|---:|---:|---:|"]
    for text, context, m in rows:
        ok = " ✓" if m["bits_per_element"] <= 2.0 and m["kld_mean"] <= 0.01 else ""
        pick = " **(pick)**" if m["label"] == chosen else ""
        lines.append(f"| {text} | {context} | `{m['label']}`{pick} | {m['bits_per_element']:.3f} | "
                     f"{m['delta_ppl_pct']:+.2f} ± {m['delta_ppl_pct_stderr']:.2f} | {m['kld_mean']:.4f} ± "
                     f"{m['kld_stderr']:.4f}{ok} | {100 * m['top1_agreement']:.1f} |")
    lines.append("")
    write_text_atomic(args.output, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
