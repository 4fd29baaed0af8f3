"""kvpress's presses on kvtool's eval protocol, run in kvpress's own venv (``make kvpress-venv``).

Never imports kvtool (kvpress pins an older transformers). It scores the very chunks kvtool scored: the
bench writes them (``--chunks``, an ``(n, context)`` int64 ``.npy``), since the two transformers releases
tokenize the GGUF's vocabulary differently (the older one adds a BOS the newer one does not). In each chunk
the first half is the prompt, prefilled once exactly and once per press inside ``with press(model)``; the
next tokens are scored teacher-forced after it, at their true positions. Prints one JSON object: the exact
perplexity, the chunks' sha256, and per press Δppl % and mean KLD against the exact pass, over all chunks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from importlib import metadata

import kvpress
import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

PRESSES = {
    "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
    "streaming": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
    "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
    "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
    "expected": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
}


def continuation(model, ids: torch.Tensor, first: int, press=None) -> torch.Tensor:
    """Log-probabilities ``(C − 1 − first, vocab)`` of the continuation after the (pressed) prompt.

    The continuation gets its true positions (``position_ids``), as kvpress's pipeline gives its question and
    answer tokens: a pressed cache holds fewer rows than the prompt had, so the positions transformers would
    infer from the cache's length would be wrong (every continuation token's RoPE off by the evicted count).
    """
    cache = DynamicCache()
    positions = torch.arange(first, ids.shape[1] - 1)[None]
    with torch.inference_mode():
        if press is None:
            model(input_ids=ids[:, :first], past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(input_ids=ids[:, :first], past_key_values=cache, use_cache=True)
        logits = model(input_ids=ids[:, first:-1], past_key_values=cache, position_ids=positions,
                       use_cache=True).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--chunks", required=True, help="(n, context) int64 .npy of the token chunks")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--presses", nargs="+", default=list(PRESSES))
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder, name = args.gguf.rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    chunks = np.load(args.chunks).astype(np.int64)
    context = chunks.shape[1]
    first = context // 2
    out = {}
    sums = {p: {"nll": 0.0, "kld": 0.0} for p in args.presses}
    exact_nll, scored = 0.0, 0
    for chunk in chunks:
        x = torch.as_tensor(chunk)[None]
        targets = x[0, first + 1:]
        exact = continuation(model, x, first)
        exact_nll -= exact.gather(1, targets[:, None]).sum().item()
        scored += len(targets)
        for p in args.presses:
            lp = continuation(model, x, first, PRESSES[p](1.0 - args.keep))
            sums[p]["nll"] -= lp.gather(1, targets[:, None]).sum().item()
            sums[p]["kld"] += (exact.exp() * (exact - lp)).sum(dim=-1).sum().item()
    ppl_exact = math.exp(exact_nll / scored)
    for p in args.presses:
        ppl = math.exp(sums[p]["nll"] / scored)
        out[p] = {"delta_ppl_pct": 100 * (ppl / ppl_exact - 1), "kld_mean": sums[p]["kld"] / scored}
    digest = hashlib.sha256(chunks.astype("<i8").tobytes()).hexdigest()
    versions = {name: metadata.version(name) for name in ("kvpress", "transformers", "torch")}
    print(json.dumps({"ppl_exact": ppl_exact, "tokens_scored": scored, "chunks_sha256": digest, "versions": versions,
                      "presses": out}))


if __name__ == "__main__":
    main()
