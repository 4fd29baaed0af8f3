"""Memory and speed of generating with a codec in the cache: kvtool.CodecCache (decoded and compact) against
DynamicCache and HF QuantizedCache (quanto int4 / int2).

The bundled SmolLM2-135M (float32, CPU, 2 threads), a prompt of L tokens from the bundled sample texts, then
N tokens generated greedily one forward pass at a time. Each (row, L) runs in its own process, so its peak
RSS is its own. Measured:

* **held bytes**: every tensor and array reachable from the cache object, deduplicated by storage
  (:func:`kvtool.runtime.memory.held_bytes`, which knows nothing of kvtool's classes), after the prompt
  (a prefill-mode CodecCache codes its prompt at the next forward pass; here ``compress()`` is called
  first, which is what that pass does) and after the last generated token;
* **stored bytes**: ``CodecCache.stored_bytes()`` (what the codecs store: codes, norms, scales, windows);
* **decode tok/s**: N / the time of the N single-token forward passes (prompt excluded);
* **peak RSS** of the process, and its RSS after loading the model (the difference is what the run added).

Run: ``.venv/bin/python benchmarks/bench_generate.py [--lengths 1024,4096,8192] [--new 128]``
(needs the ``bench`` extra for the QuantizedCache rows). Writes benchmarks/results/generate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["gpl-3.0.txt", "apache-2.0.txt", "cc0-1.0.txt"]
REC = "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true"
# (row name, kind, argument)
ROWS = [
    ("DynamicCache", "dynamic", None),
    ("HF QuantizedCache quanto int4", "quanto", 4),
    ("HF QuantizedCache quanto int2", "quanto", 2),
    ("CodecCache decoded turboquant:bits=3", "decoded", "turboquant:bits=3"),
    (f"compact {REC}", "compact", REC),
    ("compact turboquant:bits=3", "compact", "turboquant:bits=3"),
    ("compact kivi:bits=2", "compact", "kivi:bits=2"),
    ("compact h2o:keep=0.5+turboquant:bits=3", "compact", "h2o:keep=0.5+turboquant:bits=3"),
    (f"compact+codes {REC}", "codes", REC),
    ("compact+codes turboquant:bits=3", "codes", "turboquant:bits=3"),
    ("compact+codes kivi:bits=2", "codes", "kivi:bits=2"),
    ("compact+codes h2o:keep=0.5+turboquant:bits=3", "codes", "h2o:keep=0.5+turboquant:bits=3"),
]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one(index: int, length: int, new: int) -> dict:
    """Run one row at one prompt length in this process; return its figures."""
    import torch
    from transformers import DynamicCache

    from kvtool.cache import CodecCache
    from kvtool.compat import forward_cache_kwarg
    from kvtool.models import load_model
    from kvtool.runtime.memory import held_bytes

    torch.set_num_threads(2)
    name, kind, arg = ROWS[index]
    loaded = load_model("default")
    model, tok = loaded.model, loaded.tokenizer
    text = "\n\n".join((ROOT / "samples" / t).read_text() for t in TEXTS)
    ids = tok(text, return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise SystemExit(f"the sample texts hold {ids.shape[1]} tokens, fewer than {length}")
    base_rss = rss_mib()
    if kind == "dynamic":
        cache = DynamicCache(config=model.config)
    elif kind == "quanto":
        from transformers import QuantizedCache

        cache = QuantizedCache("quanto", model.config, nbits=arg)
    else:
        cache = CodecCache(model, arg, compact=kind != "decoded", attention="codes" if kind == "codes" else "decode")
    kw = {forward_cache_kwarg(model): cache}
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw).logits
        if isinstance(cache, CodecCache):
            cache.compress()
        prefill_s = time.perf_counter() - t0
        held_prefill = held_bytes(cache)
        stored_prefill = cache.stored_bytes() if isinstance(cache, CodecCache) else None
        token = logits[:, -1:].argmax(-1)
        out = []
        t0 = time.perf_counter()
        for _ in range(new):
            logits = model(input_ids=token, use_cache=True, **kw).logits
            token = logits[:, -1:].argmax(-1)
            out.append(int(token))
        decode_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"row": name, "kind": kind, "length": length, "new": new, "prefill_s": prefill_s,
            "decode_tok_s": new / decode_s, "held_prefill": held_prefill, "held_end": held_bytes(cache),
            "stored_prefill": stored_prefill,
            "stored_end": cache.stored_bytes() if isinstance(cache, CodecCache) else None,
            "peak_rss_mib": peak, "model_rss_mib": base_rss, "tokens": out}


def mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.2f}"


def render(results: list[dict]) -> str:
    lines = ["# Generating with a codec in the cache: held memory and decode speed", "",
             "`benchmarks/bench_generate.py`: the bundled SmolLM2-135M (float32, CPU, 2 threads on a shared "
             "2-core machine), prompt from the bundled sample texts, greedy decoding one token per forward "
             "pass. Held = every tensor/array reachable from the cache object, deduplicated by storage, "
             "counted from the outside (`kvtool.runtime.memory.held_bytes`). Stored = `stored_bytes()`. "
             "Ratios are against rows of the same run at the same length. Each row ran in its own process. "
             "The machine's load (other jobs) changed during the run, so speeds measured minutes apart "
             "carry that noise; peak RSS includes the model (its RSS after loading in brackets).", ""]
    for length in sorted({r["length"] for r in results}):
        rows = [r for r in results if r["length"] == length]
        dyn = next((r for r in rows if r["kind"] == "dynamic"), None)
        q4 = next((r for r in rows if r["kind"] == "quanto" and "int4" in r["row"]), None)
        lines += [f"## prompt {length} tokens, {rows[0]['new']} generated", "",
                  "| row | held after prompt MiB | held at end MiB | stored at end MiB | held ÷ stored | "
                  "held at end ÷ DynamicCache | decode tok/s | tok/s ÷ quanto int4 | prompt s | "
                  "peak RSS MiB (model loaded) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ratio = f"{r['held_end'] / r['stored_end']:.3f}" if r["stored_end"] else "–"
            vs_dyn = f"{r['held_end'] / dyn['held_end']:.3f}" if dyn else "–"
            vs_q4 = f"{r['decode_tok_s'] / q4['decode_tok_s']:.2f}" if q4 else "–"
            lines.append(f"| {r['row']} | {mib(r['held_prefill'])} | {mib(r['held_end'])} | {mib(r['stored_end'])} "
                         f"| {ratio} | {vs_dyn} | {r['decode_tok_s']:.2f} | {vs_q4} | {r['prefill_s']:.1f} | "
                         f"{r['peak_rss_mib']:.0f} ({r['model_rss_mib']:.0f}) |")
        same = [r["row"] for r in rows if r["kind"] == "compact"
                and any(d["kind"] == "decoded" and d["row"].endswith(r["row"].split(" ", 1)[1]) and
                        d["tokens"] == r["tokens"] for d in rows)]
        if same:
            lines += ["", f"Greedy tokens identical to the decoded cache's: {', '.join(same)}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--new", default="128", help="generated tokens; one value, or one per length")
    parser.add_argument("--rows", default=None, help="comma-separated row indices (default: all)")
    parser.add_argument("--one", nargs=3, type=int, metavar=("ROW", "LENGTH", "NEW"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "generate.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    news = [int(x) for x in args.new.split(",")]
    new_by_length = dict(zip(lengths, news if len(news) == len(lengths) else news * len(lengths), strict=False))
    rows = [int(x) for x in args.rows.split(",")] if args.rows else list(range(len(ROWS)))
    raw = args.output.with_suffix(".json")
    results = json.loads(raw.read_text()) if raw.exists() else []
    for length in lengths:
        for i in rows:
            if any(r["row"] == ROWS[i][0] and r["length"] == length for r in results):
                continue  # resumable: rows already measured are kept
            proc = subprocess.run([sys.executable, __file__, "--one", str(i), str(length), str(new_by_length[length])],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if proc.returncode:
                print(f"{ROWS[i][0]} at {length}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"{length:>5} {result['row']:<55} held {mib(result['held_end'])} MiB  "
                  f"{result['decode_tok_s']:.2f} tok/s", flush=True)
            raw.write_text(json.dumps(results, indent=1))
            args.output.write_text(render(results))
    args.output.write_text(render(results))


if __name__ == "__main__":
    main()
