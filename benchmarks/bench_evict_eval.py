"""End to end: token selectors and age bands inside the model's cache (``kvtool eval``), beside TurboQuant.

``kvtool eval`` in prefill mode (kvpress's protocol, llama.cpp's perplexity/KL statistics): the text is cut
into chunks of 2,048 tokens; the first 1,024 of each are the prompt, coded once after prefill (selectors see
the prompt's last queries, as ``CodecCache`` records them), and the next 1,023 are scored teacher-forced
against the exact cache. The bundled SmolLM2-135M, the first 4,096 tokens of each text (two chunks,
2,046 scored tokens), every method on one shared exact pass.

Run (about 20 minutes per text on 2 shared cores)::

    .venv/bin/python benchmarks/bench_evict_eval.py [--texts gpl-3.0 apache-2.0] [--from-json DIR]

Writes benchmarks/results/evict_eval.md (and the eval reports as evict_eval.<text>.json beside it; with
``--from-json DIR`` it renders from reports already there instead of running eval).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = [
    "turboquant:bits=3", "h2o:keep=0.5", "snapkv:keep=0.5", "tova:keep=0.5", "expected:keep=0.5",
    "streaming:keep=0.5", "knorm:keep=0.5", "h2o:keep=0.25", "snapkv:keep=0.25", "expected:keep=0.25",
    "h2o:keep=0.25,per_head=true", "h2o:keep=0.25+turboquant:bits=3",
    "age:bands=[0-128:fp16;128-:turboquant:bits=3],sink=4",
]


def run_eval(text: str, output: Path) -> None:
    cmd = [sys.executable, "-m", "kvtool", "eval", "--text", str(ROOT / "samples" / f"{text}.txt"),
           "--context", "2048", "--max-tokens", "4096", "--json", str(output)]
    for m in METHODS:
        cmd += ["--method", m]
    subprocess.run(cmd, check=True, cwd=ROOT)


def write_markdown(path: Path, reports: dict[str, dict]) -> None:
    texts = list(reports)
    first = reports[texts[0]]
    lines = [
        f"`kvtool eval --context 2048 --max-tokens 4096` (prefill mode), {first['tokens_scored']} tokens scored "
        "per text, the bundled SmolLM2-135M; exact perplexity "
        + ", ".join(f"{t} {r['ppl_exact']:.3f}" for t, r in reports.items())
        + ". Bits: stored bits per element of the coded prompt (keys and values, every byte). ± is the "
        "standard error over scored tokens.", "",
        "| method | bits | " + " | ".join(f"{t} Δppl % | {t} KLD | {t} top-1 %" for t in texts) + " |",
        "|---|---:|" + "---:|---:|---:|" * len(texts),
    ]
    for n, method in enumerate(METHODS):
        rows = [r["methods"][n] for r in reports.values()]
        cells = [f"`{method}`", f"{rows[0]['bits_per_element']:.3f}"]
        for m in rows:
            cells += [f"{m['delta_ppl_pct']:+.2f} ± {m['delta_ppl_pct_stderr']:.2f}",
                      f"{m['kld_mean']:.4f} ± {m['kld_stderr']:.4f}", f"{100 * m['top1_agreement']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", nargs="+", default=["gpl-3.0", "apache-2.0"])
    parser.add_argument("--from-json", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "evict_eval.md")
    args = parser.parse_args()
    reports = {}
    for text in args.texts:
        saved = (args.from_json or args.output.parent) / f"evict_eval.{text}.json"
        if args.from_json is None:
            run_eval(text, saved)
        reports[text] = json.loads(saved.read_text())
        labels = [m["label"] for m in reports[text]["methods"]]
        if len(labels) != len(METHODS):
            raise SystemExit(f"{saved}: {len(labels)} methods, expected {len(METHODS)}")
    write_markdown(args.output, reports)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
