"""Assemble BENCHMARKS.md from the result files the benchmarks wrote (benchmarks/results/*.md).

Every figure in BENCHMARKS.md comes from one of those files; the prose around them lives in
benchmarks/results/_targets.md (verdicts against the issues' targets, written after a run).

Run: ``.venv/bin/python benchmarks/collect.py``
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = [
    ("capture.md", "Capture vs plain forward, model load", "benchmarks/bench_capture.py"),
    ("codecs.md", "Codec throughput (with public packages side by side)", "benchmarks/bench_codecs.py"),
    ("quality.md", "Codec quality on a real cache", "benchmarks/bench_quality.py"),
    ("quality_layers.md", "TurboQuant options over every layer, two texts, three seeds",
     "benchmarks/bench_quality_layers.py"),
    ("quality_layer15_seeds.md", "Seed spread at layer 15 (8 rotation seeds)",
     "benchmarks/bench_quality_layers.py --layers 15 --seeds 8 ... --output "
     "benchmarks/results/quality_layer15_seeds.md"),
    ("analyze.md", "`kvtool analyze`: wall time and peak memory", "benchmarks/bench_analyze.py"),
    ("evict.md", "Eviction, age bands and cross-layer sharing (held-out queries)", "benchmarks/bench_evict.py"),
    ("eval.md", "End to end: the codec inside the model (`kvtool eval`), HF QuantizedCache beside it",
     "benchmarks/bench_eval.py --fidelity"),
    ("eval_fidelity.md", "The fidelity target (≤ 3.25 stored bits, Δppl ≤ +1 %, KLD ≤ 0.01, three rotation seeds)",
     "benchmarks/bench_eval.py --fidelity-only [--round 3]"),
    ("eval_options.md", "TurboQuant options end to end (unbiased norms, sinks, 8-bit norms, centring)",
     "kvtool eval (the runs named in the section)"),
    ("eval_speed.md", "Eval overhead and streaming decode speed", "benchmarks/bench_eval_speed.py"),
    ("integrity.md", "Checksums: write, read and verify cost; capture with them on", "benchmarks/bench_integrity.py"),
    ("lowrank.md", "Low-rank and learned codebooks vs quantizers, keys and values apart",
     "benchmarks/bench_lowrank.py"),
    ("evict_eval.md", "Eviction and age bands end to end (`kvtool eval`)", "benchmarks/bench_evict_eval.py"),
    ("sweep.md", "`kvtool sweep`: the frontier of the default preset, and sweep time against compress runs",
     "benchmarks/bench_plan.py --parts frontier speed"),
    ("plan.md", "`kvtool plan` against the best uniform spec (attention error, KLD, Δppl)",
     "benchmarks/bench_plan.py --parts plans"),
    ("longctx.md", "Long contexts: eval memory against context, exact bases, the codec table at 8k vs 2k",
     "benchmarks/bench_longctx.py; --part plan-row"),
    ("longctx.gemma3-270m.md", "Long contexts on Gemma 3 270M: capture and eval up to 32k (262k vocabulary)",
     "benchmarks/bench_longctx.py --part long-model; --what eval --specs '' --long-lengths 8192,16384,32768"),
    ("tasks.md", "Retrieval tasks with the codec in the cache (passkey heatmap) beside KLD",
     "benchmarks/bench_tasks.py --samples 2"),
    ("generate.md", "Generating with a codec in the cache: held memory and decode speed (compact CodecCache, "
     "HF QuantizedCache)", "benchmarks/bench_generate.py --lengths 1024 --new 16; --lengths 4096 --new 8 "
     "--rows 0,1,4,8; --lengths 8192 --new 4 --rows 0,1,4,8,9"),
    ("expected.md", "Expected Attention: kvpress's form, paired", "benchmarks/bench_expected.py"),
    ("kvpress.md", "Token selectors against kvpress 0.5.5 (its own venv: `make kvpress-venv`), GPL-3",
     "benchmarks/bench_kvpress.py"),
    ("kvpress-apache.md", "Token selectors against kvpress 0.5.5, held-out Apache-2.0",
     "benchmarks/bench_kvpress.py --text apache-2.0 --output benchmarks/results/kvpress-apache.md"),
    ("kvpress-gpl-3chunks.md", "Token selectors against kvpress 0.5.5, all of GPL-3 (3 chunks)",
     "benchmarks/bench_kvpress.py --max-tokens 8192 --output benchmarks/results/kvpress-gpl-3chunks.md"),
    ("models.md", "One codec table per real model (SmolLM2, Gemma 3, Qwen2.5-Coder)", "benchmarks/bench_models.py"),
    ("key_logits.qwen2.5-coder-0.5b.md", "Why TurboQuant keys fail on Qwen2.5: attention-logit error per layer",
     "benchmarks/bench_key_logits.py CAPTURE --name qwen2.5-coder-0.5b (a GPL-3 capture, --queries last:128)"),
    ("8x.md", "8× fp16 at KLD ≤ 0.01: compositions on held-out text", "benchmarks/bench_8x.py"),
    ("8x.long.md", "8× on held-out licence texts at 2k and 8k (samples/licences-long.txt)",
     "benchmarks/bench_8x.py --texts licences-long --contexts 8192 2048 --rows 0,1,2,3,4 --output "
     "benchmarks/results/8x.long.md"),
    ("8x.explore.md", "What limits 8×: eviction, selectors, per-layer budgets (GPL-3, second chunk)",
     "benchmarks/bench_8x.py --explore"),
    ("spike_kvzip.md", "KVzip-style reconstruction scores vs Expected Attention (the spike before the `kvzip` codec)",
     "benchmarks/spike_kvzip.py"),
    ("salient_heads.md", "salient with head-adaptive budgets: each head coded on its own",
     "benchmarks/bench_salient_heads.py"),
    ("8x.kvzip.long8k.md", "8× with KVzip's selection, held out: licences-long at 8k from token 8,192",
     "benchmarks/bench_8x.py --texts licences-long --contexts 8192 --offset 8192 --rows 3,9,10 --output "
     "benchmarks/results/8x.kvzip.long8k.md"),
    ("8x.kvzip.long8k2.md", "8× with KVzip's selection: licences-long at 8k from token 16,384",
     "benchmarks/bench_8x.py --texts licences-long --contexts 8192 --offset 16384 --rows 3,10 --output "
     "benchmarks/results/8x.kvzip.long8k2.md"),
    ("8x.kvzip.2k.md", "8× with KVzip's selection at 2k: Apache-2.0 and GPL-3",
     "benchmarks/bench_8x.py --texts apache-2.0 gpl-3.0 --contexts 2048 --rows 3,9,10 --output "
     "benchmarks/results/8x.kvzip.2k.md"),
    ("8x.kvzip.long2k7.md", "8× with KVzip's selection, held out: licences-long, seven 2k chunks from token 8,192",
     "benchmarks/bench_8x.py --texts licences-long --contexts 2048 --offset 8192 --chunks 7 --rows 3,10 --output "
     "benchmarks/results/8x.kvzip.long2k7.md"),
    ("8x.kvzip.gemma3-270m.md", "The 8× composite on Gemma 3 270M (tuned on SmolLM2): does it carry over?",
     "benchmarks/bench_8x.py --model gemma3-270m --texts apache-2.0 --contexts 2048 --rows 3,9 --chosen-on "
     "\"GPL-3 on SmolLM2 (not on this model)\" --output benchmarks/results/8x.kvzip.gemma3-270m.md"),
    ("reconstruct.md", "KVzip's reconstruction pass against the exact prefill of the same prompt",
     "benchmarks/bench_reconstruct.py"),
    ("tasks_kvzip.md", "Passkey retrieval with KVzip's selection and the 8× composite, beside expected and snapkv",
     "benchmarks/bench_tasks_kvzip.py"),
    ("8x.kvzip.explore.md", "8× with KVzip's selection: splits of the budget on GPL-3's second chunk",
     "benchmarks/bench_8x.py --texts gpl-3.0 --contexts 2048 --offset 2048 --rows 10,11,12,13,14,15 --output "
     "benchmarks/results/8x.kvzip.explore.md"),
    ("8x.kvzip.explore2.md", "8× with KVzip's selection: other key/value splits at keep 0.6 (GPL-3's second chunk)",
     "benchmarks/bench_8x.py --texts gpl-3.0 --contexts 2048 --offset 2048 --rows 16,17,18 --output "
     "benchmarks/results/8x.kvzip.explore2.md"),
    ("8x.kvzip.explore3.md", "8× with KVzip's selection: newest tokens protected, other keeps (GPL-3's second chunk)",
     "benchmarks/bench_8x.py --texts gpl-3.0 --contexts 2048 --offset 2048 --rows 10,19,20,21 --output "
     "benchmarks/results/8x.kvzip.explore3.md"),
    ("8x.kvzip.long2k.md", "8× with KVzip's selection, held out: licences-long at 2k from token 16,384",
     "benchmarks/bench_8x.py --texts licences-long --contexts 2048 --offset 16384 --rows 3,9,10 --output "
     "benchmarks/results/8x.kvzip.long2k.md"),
    ("grid.md", "`kvtool grid`: one worker, two local processes and local Ray on a 24-cell grid",
     "benchmarks/bench_grid.py --context 256 --rounds 2 --screenshot docs/report.png"),
]


def main() -> None:
    parts = [
        "# Benchmarks",
        "",
        "Measured on this project's machine kind (2 CPU cores, 24 GiB, no GPU), which is shared with other",
        "jobs: wall times vary from run to run, so every speed figure is a ratio against a baseline measured",
        "in the same run. Regenerate with `make bench`, then `.venv/bin/python benchmarks/collect.py`.",
        "",
    ]
    targets = RESULTS / "_targets.md"
    if targets.exists():
        parts += [targets.read_text().strip(), ""]
    for name, title, script in SECTIONS:
        path = RESULTS / name
        if not path.exists():
            continue
        # result files link their images beside them (benchmarks/results/); BENCHMARKS.md sits at the root
        text = re.sub(r"\]\(([^/)]+\.png)\)", r"](benchmarks/results/\1)", path.read_text().strip())
        parts += [f"## {title}", "", f"From `{script}`.", "", text, ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
