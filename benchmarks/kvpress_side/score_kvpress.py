"""kvpress's presses on kvtool's eval protocol, run in kvpress's own venv (``make kvpress-venv``).

Never imports kvtool (kvpress pins an older transformers). For each chunk of ``--context`` tokens of the
text (BOS first when the tokenizer adds one, as kvtool eval does): the first half is the prompt, prefilled
once exactly and once per press inside ``with press(model)``; the next tokens are scored teacher-forced
after it. Prints one JSON object: per press, Δppl % and mean KLD against the exact pass, over all chunks.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

PRESSES = {
    "knorm": lambda r: __import__("kvpress").KnormPress(compression_ratio=r),
    "streaming": lambda r: __import__("kvpress").StreamingLLMPress(compression_ratio=r),
    "snapkv": lambda r: __import__("kvpress").SnapKVPress(compression_ratio=r),
    "tova": lambda r: __import__("kvpress").TOVAPress(compression_ratio=r),
    "expected": lambda r: __import__("kvpress").ExpectedAttentionPress(compression_ratio=r),
}


def continuation(model, ids: torch.Tensor, first: int, press=None) -> torch.Tensor:
    """Log-probabilities ``(C − 1 − first, vocab)`` of the continuation after the (pressed) prompt."""
    cache = DynamicCache()
    with torch.inference_mode():
        if press is None:
            model(input_ids=ids[:, :first], past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(input_ids=ids[:, :first], past_key_values=cache, use_cache=True)
        logits = model(input_ids=ids[:, first:-1], past_key_values=cache, use_cache=True).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--presses", nargs="+", default=list(PRESSES))
    args = parser.parse_args()
    folder, name = args.gguf.rsplit("/", 1)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    ids = tok(open(args.text, encoding="utf-8").read(), add_special_tokens=True)["input_ids"][: args.max_tokens]
    bos = tok.bos_token_id if tok("a", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id else None
    n = len(ids) // args.context
    chunks = np.array(ids[: n * args.context]).reshape(n, args.context)
    if bos is not None:
        chunks[:, 0] = bos
    first = args.context // 2
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
    print(json.dumps({"ppl_exact": ppl_exact, "tokens_scored": scored, "presses": out}))


if __name__ == "__main__":
    main()
