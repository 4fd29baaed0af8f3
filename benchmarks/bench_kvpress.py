"""kvtool's token selectors beside kvpress's presses on the same protocol (issue 21's comparison).

The protocol: the text's first ``--max-tokens`` tokens in chunks of ``--context`` (GPL-3, 2,048: a 1,024-token
prompt, the next 1,023 tokens scored), 50 % of the prompt's tokens kept. kvtool's side is one ``evaluate``
call (one shared exact pass); kvpress's side runs ``benchmarks/kvpress_side/score_kvpress.py`` in kvpress's
own venv, since kvpress pins an older transformers (``make kvpress-venv`` builds it: kvpress 0.5.5, the
pinned CPU torch, gguf), on the very token chunks kvtool scored (handed over as a ``.npy``; the two
transformers releases tokenize the GGUF vocabulary differently) and checked by their sha256. Both sides
report the exact pass's perplexity, so a difference in the model itself would show. Without that venv the
kvpress column is left out and says why.

Run::

    make bench-kvpress            # or: .venv/bin/python benchmarks/bench_kvpress.py --kvpress-python PY

Writes benchmarks/results/kvpress.md (and kvpress.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from kvtool.codecs.assignment import Assignment
from kvtool.evaluate import _bos_id, chunk_tokens, evaluate, tokenize_text
from kvtool.models import bundled_model_path, load_model
from kvtool.util import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SIDE = ROOT / "benchmarks" / "kvpress_side" / "score_kvpress.py"
# kvtool spec per kvpress press, with kvpress's defaults (StreamingLLM n_sink=4, SnapKV window 64 kernel 5)
METHODS = {"knorm": "knorm", "streaming": "streaming:sink=4", "snapkv": "snapkv:window=64,kernel=5",
           "tova": "tova", "expected": "expected"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="gpl-3.0")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--kvpress-python", type=Path, default=ROOT / ".venv-kvpress" / "bin" / "python")
    parser.add_argument("--output", type=Path, default=RESULTS / "kvpress.md")
    args = parser.parse_args()
    text = ROOT / "samples" / f"{args.text}.txt"
    loaded = load_model("default")
    tokens = tokenize_text(loaded, text, args.max_tokens)
    specs = [f"{s}{',' if ':' in s else ':'}keep={args.keep:g}" for s in METHODS.values()]
    ours = evaluate(loaded, tokens, [Assignment.of(s, s) for s in specs], context=args.context,
                    labels=specs, source=str(text.relative_to(ROOT)))
    # the chunks evaluate scored (same chunking, same BOS rule), handed to kvpress's side as they are
    chunks = chunk_tokens(tokens, args.context, _bos_id(loaded.tokenizer))
    digest = hashlib.sha256(chunks.astype("<i8").tobytes()).hexdigest()
    theirs, why = None, ""
    if args.kvpress_python.is_file():
        theirs, why = run_kvpress(args.kvpress_python, chunks, args.keep)
        if theirs is not None and theirs["chunks_sha256"] != digest:
            theirs, why = None, f"kvpress scored other chunks (sha256 {theirs['chunks_sha256']}, kvtool {digest})"
    else:
        why = f"no kvpress venv at {args.kvpress_python} (`make kvpress-venv`)"
    exact = f"exact ppl: kvtool {ours['ppl_exact']:.4f}" + \
        (f", kvpress's side {theirs['ppl_exact']:.4f} ({', '.join(f'{k} {v}' for k, v in theirs['versions'].items())})"
         if theirs else "")
    lines = [f"Token selectors at {args.keep:.0%} kept, {args.text}, --context {args.context}, --max-tokens "
             f"{args.max_tokens} ({ours['tokens_scored']} tokens scored in {len(chunks)} chunk(s), sha256 "
             f"{digest[:12]}), the bundled SmolLM2-135M; kvtool: one shared exact pass; kvpress: its presses "
             f"inside `with press(model)` on the same chunks, the continuation at its true positions, in its own "
             f"venv; {exact}."
             + (f" kvpress column empty: {why}." if theirs is None else ""), "",
             "| method | kvtool spec | kvtool Δppl % | kvtool KLD | kvpress Δppl % | kvpress KLD |",
             "|---|---|---:|---:|---:|---:|"]
    for (press, _), spec, m in zip(METHODS.items(), specs, ours["methods"], strict=True):
        k = (theirs or {}).get("presses", {}).get(press)
        lines.append(f"| {press} | `{spec}` | {m['delta_ppl_pct']:+.2f} ± {m['delta_ppl_pct_stderr']:.2f} | "
                     f"{m['kld_mean']:.4f} | " + (f"{k['delta_ppl_pct']:+.2f} | {k['kld_mean']:.4f} |" if k
                                                  else "– | – |"))
    lines.append("")
    write_text_atomic(args.output, "\n".join(lines))
    write_text_atomic(args.output.with_suffix(".json"), json.dumps({"kvtool": ours, "kvpress": theirs,
                                                                    "kvpress_missing": why,
                                                                    "chunks_sha256": digest}, indent=1))
    print("\n".join(lines))


def run_kvpress(python: Path, chunks: np.ndarray, keep: float) -> tuple[dict | None, str]:
    """kvpress's side on ``chunks`` ``(n, context)``: its JSON, or None and why it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chunks.npy"
        np.save(path, chunks.astype(np.int64))
        cmd = [str(python), str(SIDE), "--gguf", str(bundled_model_path()), "--chunks", str(path),
               "--keep", str(keep)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1]), ""
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return None, f"kvpress run failed: {last}"


if __name__ == "__main__":
    main()
