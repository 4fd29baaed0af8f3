"""Spike: KVzip-style scores (arXiv 2505.23416 §3) as a keep mask, against Expected Attention, eviction alone.

KVzip scores each prompt KV pair by the largest attention it receives from the queries of a reconstruction
pass: after the prompt, the model reads "Repeat the previous context exactly." and then the prompt again
(teacher-forced), in pieces of ``--piece`` tokens as KVzip does (a later piece is introduced by "Repeat the part
of the previous context exactly, starting with" and the previous piece's last 8 tokens). Each piece's pass
starts from the prompt's exact cache. Score of a token of a kv head: max over the piece's queries and the query
heads of that kv head of the attention weight. Two normalisations of that softmax:

* ``kvzip``: as KVzip (and kvpress's KVzipPress), over the first 4 keys, the piece's own prompt keys and the
  pass's own keys (causal); a piece scores only its own tokens;
* ``full``: the model's real attention: over every prompt key and the pass's own keys; every piece scores every
  prompt token (max over pieces).

With one piece (prompt ≤ ``--piece`` tokens) the two are the same. The spike's selector reads the scores from a
table filled before the eval; it is not a codec of the project.

Run::

    .venv/bin/python benchmarks/spike_kvzip.py --text gpl-3.0 --context 2048
    .venv/bin/python benchmarks/spike_kvzip.py --text licences-long --context 8192

Writes benchmarks/results/spike_kvzip.<text>.<context>[.<offset>].json and rewrites spike_kvzip.md from every
such file present.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvtool.codecs.assignment import Assignment
from kvtool.codecs.base import LayerContext, register
from kvtool.codecs.select.selection import ScoredSelector
from kvtool.compat import forward_cache_kwarg
from kvtool.evaluate import _bos_id, chunk_tokens, evaluate, exact_prefill, tokenize_text
from kvtool.hooks import Recorder, recording
from kvtool.models import load_model
from kvtool.util import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SINK = 4
FIRST = "\n\nRepeat the previous context exactly.\n"
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8

SCORES: dict[str, dict[int, np.ndarray]] = {}  # variant -> layer -> (kv_heads, prompt)


@register
@dataclass
class SpikeKVzip(ScoredSelector):
    """``spikekvzip:keep=0.6,variant=full`` — the scores of :data:`SCORES`."""

    name = "spikekvzip"
    variant: str = "full"
    sink: int = SINK

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        s = SCORES[self.variant][context.layer]
        assert s.shape == keys.shape[:2], (s.shape, keys.shape)
        return s


def reconstruction_scores(loaded, prompt: np.ndarray, piece: int) -> dict[str, dict[int, np.ndarray]]:
    """Both variants' scores, per layer ``(kv_heads, P)``, for ``prompt`` ``(P,)``."""
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.as_tensor(prompt, device=loaded.device)[None]
    cache, _ = exact_prefill(loaded, ids, 0)
    p = len(prompt)
    body = prompt[1:] if _bos_id(tok) is not None and prompt[0] == _bos_id(tok) else prompt
    start0 = p - len(body)
    pieces = [(s, min(s + piece, len(body))) for s in range(0, len(body), piece)]
    out = {v: {} for v in ("kvzip", "full")}
    for i, (a, b) in enumerate(pieces):
        intro = tok(FIRST if i == 0 else LATER, add_special_tokens=False)["input_ids"]
        if i:
            intro = intro + list(body[max(0, a - OVERLAP):a])
        rep = np.concatenate([np.asarray(intro, dtype=np.int64), body[a:b]])
        lo, hi = start0 + a, start0 + b  # the piece's prompt positions

        def hook(layer, query, key, value, _out, lo=lo, hi=hi):
            q = query[0].float()  # (q_heads, R, d) post-RoPE
            k = key[0].float()  # (kv_heads, P + R, d)
            kv, r = k.shape[0], q.shape[1]
            g = q.shape[0] // kv
            scale = q.shape[-1] ** -0.5
            causal = torch.ones(r, r, dtype=torch.bool).tril()
            for name, cols in (("kvzip", torch.cat([torch.arange(min(SINK, lo)), torch.arange(lo, hi)])),
                               ("full", torch.arange(p))):
                best = torch.zeros(kv, p)
                for h in range(kv):
                    qh = q[h * g:(h + 1) * g]  # (g, R, d)
                    logit_p = scale * qh @ k[h, cols].T  # (g, R, n)
                    logit_r = scale * qh @ k[h, p:].T  # (g, R, R)
                    logit_r = logit_r.masked_fill(~causal, -torch.inf)
                    z = torch.logsumexp(torch.cat([logit_p, logit_r], dim=-1), dim=-1, keepdim=True)
                    w = torch.exp(logit_p - z).amax(dim=(0, 1))  # (n,)
                    best[h, cols] = w
                prev = out[name].get(layer)
                out[name][layer] = best.numpy() if prev is None else np.maximum(prev, best.numpy())

        rec = Recorder(len(cache.layers), 0, hook=hook)
        with recording(model, rec), torch.inference_mode():
            model(input_ids=torch.as_tensor(rep, device=loaded.device)[None], logits_to_keep=1,
                  use_cache=True, **{forward_cache_kwarg(model): copy.deepcopy(cache)})
    return out


def salient(select: str, bits: float) -> str:
    """bench_8x's pick with another selection: kept rows in TurboQuant's form, the mask one bit per token."""
    return (f"salient:select=[{select}],hi=[turboquant:bits={bits:g},center=true,sink=4,norm_bits=8,"
            "unbiased=true],lo=[drop]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="gpl-3.0")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--offset", type=int, default=0, help="first token of the chunk in the text")
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--piece", type=int, default=2048)
    parser.add_argument("--compose", action="store_true", help="the 8x pick (salient, keys 3.25 / values 2.5 "
                        "bits) selected by expected and by the reconstruction scores, instead of eviction alone")
    parser.add_argument("--select", default=None, help="with --compose: only this selection (a spec), not "
                        "expected and spikekvzip per_head=true")
    args = parser.parse_args()
    loaded = load_model("default")
    tokens = tokenize_text(loaded, ROOT / "samples" / f"{args.text}.txt")[args.offset:args.offset + args.context]
    chunk = chunk_tokens(tokens, args.context, _bos_id(loaded.tokenizer))[0]
    t0 = time.perf_counter()
    with torch.inference_mode():
        SCORES.update(reconstruction_scores(loaded, chunk[: args.context // 2], args.piece))
    seconds_scores = time.perf_counter() - t0
    k = args.keep
    specs = [f"expected:keep={k:g}", f"expected:keep={k:g},per_head=true",
             f"spikekvzip:keep={k:g},variant=kvzip", f"spikekvzip:keep={k:g},variant=full",
             f"spikekvzip:keep={k:g},variant=full,per_head=true"]
    pairs = [(s, s) for s in specs]
    if args.compose:
        sels = [args.select] if args.select else [f"expected:keep={k:g}",
                                                  f"spikekvzip:keep={k:g},variant=full,per_head=true"]
        pairs = [(salient(sel, 3.25), salient(sel, 2.5)) for sel in sels]
    r = evaluate(loaded, tokens, [Assignment.of(a, b) for a, b in pairs], context=args.context,
                 source=f"samples/{args.text}.txt tokens {args.offset}-{args.offset + args.context - 1}")
    r["seconds_reconstruction"] = seconds_scores
    name = f"spike_kvzip.{args.text}.{args.context}" + (f".{args.offset}" if args.offset else "") + \
        (".compose" if args.compose else "") + (".uniform" if args.select else "")
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(r, indent=1))
    print(f"{args.text} {args.context} offset {args.offset}: reconstruction scoring {seconds_scores:.1f} s, "
          f"eval {r['seconds']:.1f} s (exact {r['seconds_exact']:.1f} s)")
    print(report())


def report() -> str:
    """spike_kvzip.md from every spike_kvzip.*.json in the results folder."""
    lines = ["KVzip-style reconstruction scores vs Expected Attention, eviction alone (no quantization), keep 0.6, "
             "`kvtool eval` prefill mode, one chunk, the bundled SmolLM2-135M (benchmarks/spike_kvzip.py). "
             "`variant=kvzip`: KVzip's softmax (sinks + the piece's keys + the pass's own keys); `variant=full`: "
             "the model's real attention over the whole prompt and the pass's keys (the same with one piece). "
             "Time: the reconstruction scoring (unoptimised, a Python loop over layers and heads) against the "
             "eval's exact pass (both variants are scored in one run, so it overstates one pass). With `--compose`: "
             "bench_8x's pick (salient, keys 3.25 / values 2.5 bits) with each selection; `per_head=true` inside "
             "`salient` makes heads keep different numbers of rows, which salient codes as one sequence (one "
             "centre and 4 fp16 sinks per layer instead of per head: hence 1.92 bits, not 1.97), so those rows "
             "are handicapped by that layout, not only judged on the selection.", "",
             "| text | tokens | keys / values | bits | Δppl % | KLD | top-1 % |", "|---|---|---|---:|---:|---:|---:|"]
    for path in sorted(RESULTS.glob("spike_kvzip.*.json")):
        r = json.loads(path.read_text())
        where = r["text"].split(" tokens ")
        for m in r["methods"]:
            lines.append(f"| {Path(where[0]).stem} | {where[1]} | `{m['label']}` | {m['bits_per_element']:.3f} | "
                         f"{m['delta_ppl_pct']:+.2f} ± "
                         f"{m['delta_ppl_pct_stderr']:.2f} | {m['kld_mean']:.4f} ± {m['kld_stderr']:.4f} | "
                         f"{100 * m['top1_agreement']:.1f} |")
        lines.append(f"| {Path(where[0]).stem} | {where[1]} | time: reconstruction scoring "
                     f"{r['seconds_reconstruction']:.0f} s, exact pass {r['seconds_exact']:.0f} s | | | | |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(RESULTS / "spike_kvzip.md", text)
    return text


if __name__ == "__main__":
    main()
