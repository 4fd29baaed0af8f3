"""End-to-end quality with the codec inside the model's cache (`kvtool eval`), HF QuantizedCache beside it.

The bundled SmolLM2-135M (float32, CPU), llama.cpp's protocol (kvtool.evaluate): chunks of ``--context``
tokens, the first half the prompt (coded once after its exact forward pass: prefill mode), the rest scored
teacher-forced. Every method of one text shares the exact pass. HF ``QuantizedCache`` (quanto 4-bit, HQQ
3/4-bit, their defaults: per-channel groups of 64, residual 128) runs in the same process on the same
chunks as a :class:`kvtool.evaluate.Baseline`; its stored size is the bytes of its quantized tensors
(codes, scales, zero points) after the prompt. Optional dependency: ``optimum-quanto==0.2.7``,
``hqq==0.2.8.post1`` (``pip install kvtool[bench]``); without them those rows are skipped and say so.

``--fidelity`` adds, on the first text only, the issue's fidelity candidates (≤ 3.25 stored bits) and
plain ``turboquant:bits=3`` at rotation seeds 0, 1, 2. ``--fidelity-only`` runs only a second round of
candidates (:data:`FIDELITY_2`, or ``--round 3``: :data:`FIDELITY_3`; seeds 0, 1, 2; no table, no HF rows)
on the first text.

Run::

    .venv/bin/python benchmarks/bench_eval.py [--context 2048] [--max-tokens 2048] [--fidelity]

Writes benchmarks/results/eval.md (and eval.json beside it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["gpl-3.0", "apache-2.0"]
TABLE = [
    "fp16", "fp8", "uniform:bits=4,axis=token,group=64", "kivi:bits=2", "kivi:bits=3", "kivi:bits=4",
    "turboquant:bits=2.5", "turboquant:bits=3", "turboquant:bits=3.5", "turboquant:bits=4",
    "turboquant:bits=2.5,center=true,sink=1", "turboquant:bits=3,center=true,sink=1",
    "turboquant:bits=3.5,center=true,sink=1", "turboquant:bits=4,center=true,sink=1", "polarquant",
]
#: (label, keys spec, values spec) with ``{seed}``; each at seeds 0, 1, 2.
FIDELITY = [
    ("tq3", "turboquant:bits=3,seed={seed}", "turboquant:bits=3,seed={seed}"),
    ("tq3 norm8 sink=8", "turboquant:bits=3,norm_bits=8,sink=8,seed={seed}",
     "turboquant:bits=3,norm_bits=8,sink=8,seed={seed}"),
    ("K tq3 sink=4 | V tq3 norm8", "turboquant:bits=3,sink=4,seed={seed}",
     "turboquant:bits=3,norm_bits=8,seed={seed}"),
    ("K tq3.25 norm8 sink=4 | V tq2.5 norm8", "turboquant:bits=3.25,norm_bits=8,sink=4,seed={seed}",
     "turboquant:bits=2.5,norm_bits=8,seed={seed}"),
]
#: Second round (``--fidelity-only``): centred keys (the largest KLD gain measured in the first round) with
#: 8-bit norms and 4 sinks, and bits moved from values to keys at about the same average.
FIDELITY_2 = [
    ("tq3 center sink=4 norm8", "turboquant:bits=3,center=true,sink=4,norm_bits=8,seed={seed}",
     "turboquant:bits=3,center=true,sink=4,norm_bits=8,seed={seed}"),
    ("K tq3 center sink=4 norm8 | V tq3 norm8", "turboquant:bits=3,center=true,sink=4,norm_bits=8,seed={seed}",
     "turboquant:bits=3,norm_bits=8,seed={seed}"),
    ("K tq3.25 center sink=4 norm8 | V tq2.75 norm8",
     "turboquant:bits=3.25,center=true,sink=4,norm_bits=8,seed={seed}", "turboquant:bits=2.75,norm_bits=8,seed={seed}"),
    ("K tq3.5 center sink=4 norm8 | V tq2.5 norm8",
     "turboquant:bits=3.5,center=true,sink=4,norm_bits=8,seed={seed}", "turboquant:bits=2.5,norm_bits=8,seed={seed}"),
]
#: Third round (``--fidelity-only --round 3``): the best of the second (centred keys and values, 8-bit norms)
#: with 8 sinks, and with RaBitQ's unbiased norms.
FIDELITY_3 = [
    ("tq3 center sink=8 norm8", "turboquant:bits=3,center=true,sink=8,norm_bits=8,seed={seed}",
     "turboquant:bits=3,center=true,sink=8,norm_bits=8,seed={seed}"),
    ("tq3 center sink=4 norm8 unbiased", "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true,seed={seed}",
     "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true,seed={seed}"),
]
#: Fourth round (``--fidelity-only --round 4``, seed 0): keys alone (values exact) — the pre-RoPE low-rank
#: basis inside the model (its RoPE from the model's rotary embedding) against post-RoPE and TurboQuant.
FIDELITY_4 = [
    ("K tq3 | V exact", "turboquant:bits=3,seed={seed}", "none"),
    ("K tq3 center sink=4 norm8 unbiased | V exact",
     "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true,seed={seed}", "none"),
    ("K lowrank32 prerope + tq4 | V exact", "lowrank:rank=32,prerope=true+turboquant:bits=4,seed={seed}", "none"),
    ("K lowrank32 + tq4 | V exact", "lowrank:rank=32+turboquant:bits=4,seed={seed}", "none"),
    ("K lowrank32 prerope | V exact", "lowrank:rank=32,prerope=true", "none"),
]
ROUNDS = {2: FIDELITY_2, 3: FIDELITY_3, 4: FIDELITY_4}
ROUND_SEEDS = {4: (0,)}
SEEDS = (0, 1, 2)
HF = [("HF QuantizedCache quanto 4-bit", "quanto", 4), ("HF QuantizedCache HQQ 4-bit", "hqq", 4),
      ("HF QuantizedCache HQQ 3-bit", "hqq", 3)]


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside a quantized HF cache entry (quanto QBitsTensor, HQQ (codes, meta))."""
    import torch

    if isinstance(obj, torch.Tensor):
        inner = [v for v in vars(obj).values() if isinstance(v, torch.Tensor)] if hasattr(obj, "__dict__") else []
        return sum(_tensor_bytes(v) for v in inner) if inner else obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def hf_baselines(loaded: Any) -> tuple[list[Any], list[str]]:
    """Baselines for HF QuantizedCache backends that import here, and notes for those that do not."""
    import importlib

    from kvtool.models import model_shape

    shape = model_shape(loaded.config)
    per_token = shape.num_kv_heads * shape.head_dim  # elements of one layer's keys (or values) per token

    from kvtool.evaluate import Baseline

    out, notes = [], []
    for label, backend, bits in HF:
        module = {"quanto": "optimum.quanto", "hqq": "hqq.core.quantize"}[backend]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            notes.append(f"{label}: skipped, {module} does not import ({exc})")
            continue

        def make(model: Any, backend: str = backend, bits: int = bits) -> Any:
            from transformers import QuantizedCache

            return QuantizedCache(backend, model.config, nbits=bits)

        def footprint(cache: Any) -> dict[str, dict[str, int]]:
            total = {r: {"stored_bytes": 0, "elements": 0} for r in ("keys", "values")}
            for layer in cache.layers:
                for role, q in (("keys", layer._quantized_keys), ("values", layer._quantized_values)):
                    total[role]["stored_bytes"] += _tensor_bytes(q)
                    res = layer.keys if role == "keys" else layer.values
                    if res is not None and res.dim() == 4:  # the residual window, as the model holds it
                        total[role]["stored_bytes"] += res.numel() * res.element_size()
                    total[role]["elements"] += layer.cumulative_length * per_token
            return total

        out.append(Baseline(label, make, footprint))
    return out, notes


def main() -> None:
    from kvtool.codecs.assignment import Assignment
    from kvtool.evaluate import evaluate, tokenize_text
    from kvtool.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--texts", nargs="*", default=TEXTS)
    parser.add_argument("--fidelity", action="store_true")
    parser.add_argument("--fidelity-only", action="store_true")
    parser.add_argument("--round", type=int, choices=sorted(ROUNDS), default=2, help="with --fidelity-only")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "eval.md")
    parser.add_argument("--combine", type=Path, nargs="*", help="Only write --output from the .json files of "
                        "earlier runs (one text each, e.g. run in parallel).")
    args = parser.parse_args()
    if args.combine:
        results, notes = {}, []
        for path in args.combine:
            data = json.loads(path.read_text())
            notes += data.pop("_notes", [])
            for text, r in data.items():
                if text in results:  # two runs on one text: their rows side by side (the same exact pass)
                    if abs(results[text]["ppl_exact"] - r["ppl_exact"]) > 1e-9 * r["ppl_exact"]:
                        raise SystemExit(f"{path}: {text} was scored on other tokens (ppl exact differs)")
                    results[text]["methods"] += r["methods"]
                    results[text]["wall_seconds"] += r["wall_seconds"]
                else:
                    results[text] = r
        args.output.write_text(render(results, args, sorted(set(notes))))
        print(f"wrote {args.output}")
        return
    loaded = load_model("default")
    if args.fidelity_only:
        args.no_hf = True
    baselines, notes = ([], ["HF QuantizedCache: not run"]) if args.no_hf else hf_baselines(loaded)
    results = {}
    for t, text in enumerate(args.texts):
        methods = [] if args.fidelity_only else [(spec, Assignment.of(spec, spec)) for spec in TABLE]
        if args.fidelity_only and t == 0:
            methods += [(f"{label} seed {seed}", Assignment.of(k.format(seed=seed), v.format(seed=seed)))
                        for label, k, v in ROUNDS[args.round] for seed in ROUND_SEEDS.get(args.round, SEEDS)]
        elif args.fidelity and t == 0:
            methods += [(f"{label} seed {seed}", Assignment.of(k.format(seed=seed), v.format(seed=seed)))
                        for label, k, v in FIDELITY for seed in SEEDS]
        if not methods:  # --fidelity-only: the candidates run on the first text only
            continue
        tokens = tokenize_text(loaded, ROOT / "samples" / f"{text}.txt", args.max_tokens)
        started = time.perf_counter()
        r = evaluate(loaded, tokens, [a for _, a in methods], labels=[n for n, _ in methods],
                     context=args.context, source=f"{text}.txt", baselines=baselines,
                     progress=lambda d, n, text=text: print(f"{text}: {d}/{n}", flush=True))
        r["wall_seconds"] = time.perf_counter() - started
        results[text] = r
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({**results, "_notes": notes}, indent=1))
    args.output.write_text(render(results, args, notes))
    print(f"wrote {args.output}")


def render(results: dict[str, Any], args: Any, notes: list[str]) -> str:
    lines = [
        f"The bundled SmolLM2-135M (float32, CPU), `kvtool eval --context {args.context} --max-tokens "
        f"{args.max_tokens}` (prefill mode: the first {args.context // 2} tokens of each chunk are coded after "
        f"their exact forward pass, the next {args.context // 2 - 1} are scored teacher-forced). Δppl and KLD ±"
        " one standard error (llama.cpp's statistics); bits = stored bits per element of keys and values "
        "(K, V: each alone; `none` keeps the model's float32), every stored byte counted (sink rows, means, "
        "norms, windows, shared state). HF QuantizedCache rows: "
        "transformers' own cache with its defaults (per-channel groups of 64, residual 128), in the same run "
        f"on the same chunks. Wall time of the run on the shared 2-core machine: "
        + ", ".join(f"{t} {r['wall_seconds'] / 60:.0f} min" for t, r in results.items()) + ".",
        "",
    ]
    for text, r in results.items():
        lines += [f"**{text}** — {r['chunks']} chunk(s), {r['tokens_scored']} tokens scored, ppl exact "
                  f"{r['ppl_exact']:.4f}", "",
                  "| method | bits | K bits | V bits | Δppl % | KLD | KLD p99 | top-1 % | RMS Δp % |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in r["methods"]:
            label = m["label"].replace("|", "\\|")  # "K … | V …" inside a table cell
            lines.append(f"| {label} | {m['bits_per_element']:.3f} | {m['bits_per_element_keys']:.3f} | "
                         f"{m['bits_per_element_values']:.3f} | {m['delta_ppl_pct']:+.2f} ± "
                         f"{m['delta_ppl_pct_stderr']:.2f} | {m['kld_mean']:.4f} ± {m['kld_stderr']:.4f} | "
                         f"{m['kld_p99']:.3f} | {100 * m['top1_agreement']:.1f} | {100 * m['rms_dp']:.2f} |")
        lines.append("")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    main()
