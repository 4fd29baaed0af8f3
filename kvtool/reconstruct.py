"""KVzip's reconstruction pass: how much attention each prompt token gets while the model repeats its prompt.

KVzip (Kim et al., arXiv 2505.23416 §3) scores a prompt's KV pairs query-agnostically: after the prompt the
model reads "Repeat the previous context exactly." and the prompt again, teacher-forced, and a KV pair
matters as much as the largest attention any of those queries pays it. A long prompt is repeated in pieces
of :data:`PIECE` tokens, each pass starting from the prompt's exact cache; a later piece is introduced by
"Repeat the part of the previous context exactly, starting with" and the :data:`OVERLAP` tokens before it.

The score of a prompt position in a kv head is the maximum, over the pieces, their queries and the query
heads of the head's group, of the model's own softmax weight over the whole held prompt and the pass's own
keys (causal). KVzip renormalises each piece over the sinks and that piece's own keys instead; on the
bundled model the two rank tokens alike (benchmarks/results/spike_kvzip.md: KLD 0.0712 against 0.0702 at
8k) and the model's own softmax needs no choice of what else to leave out. Simplifications: on
sliding-window layers every held key counts (the window inside the pass is not applied), and a model's
attention-logit soft-capping is not applied to the scores. ``kvtool eval`` calls :func:`reconstruction_scores`
for the codecs that ask (:meth:`kvtool.codecs.base.Codec.reads_reconstruction`: ``kvzip``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvtool.compat import forward_cache_kwarg
from kvtool.hooks import Recorder, recording

#: Tokens of the prompt repeated per pass (KVzip's chunk size).
PIECE = 2048
#: Tokens of the previous piece that introduce a later one.
OVERLAP = 8
FIRST = "\n\nRepeat the previous context exactly.\n"
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
#: Query rows scored at once (bounds the (heads, rows, keys) block: 9 × 256 × 4,096 floats = 38 MB).
ROWS = 256


def reconstruction_inputs(tokenizer: Any, prompt: np.ndarray, piece: int | None = None) -> list[np.ndarray]:
    """The token ids ``(r,)`` fed after the prompt in each pass: the instruction, then a piece of the prompt
    (its leading BOS left out) of ``piece`` tokens (default :data:`PIECE`)."""
    piece = piece or PIECE
    bos = getattr(tokenizer, "bos_token_id", None)
    body = prompt[1:] if bos is not None and len(prompt) and prompt[0] == bos else prompt
    out = []
    for a in range(0, len(body), piece):
        intro = list(tokenizer(FIRST if a == 0 else LATER, add_special_tokens=False)["input_ids"])
        if a:
            intro += [int(t) for t in body[max(0, a - OVERLAP):a]]
        out.append(np.concatenate([np.asarray(intro, dtype=np.int64), body[a:a + piece]]))
    return out


class MaxAttention:
    """An attention hook (:class:`kvtool.hooks.Recorder`) keeping, per layer, the largest softmax weight each of
    the first ``prompt`` key positions receives from the pass's queries: ``best[layer]`` ``(kv_heads, prompt)``."""

    def __init__(self, prompt: int) -> None:
        self.prompt = prompt
        self.best: dict[int, torch.Tensor] = {}
        #: per layer, the scaling the model passed to its attention (a Recorder's ``scaling``, filled before the hook)
        self.scaling: dict[int, float] = {}

    def __call__(self, layer: int, query: Any, key: Any, _value: Any, _out: Any) -> None:
        q = query[0].float()  # (q_heads, r, d), post-RoPE
        k = key[0].float()  # (kv_heads, held + r, d): the held prompt, then the pass's own keys
        kv, r = int(k.shape[0]), int(q.shape[1])
        held = int(k.shape[1]) - r
        scale = self.scaling.get(layer, q.shape[-1] ** -0.5)
        qg = q.reshape(kv, q.shape[0] // kv, r, q.shape[-1])  # (kv, group, r, d)
        k_prompt, k_own = k[:, :held], k[:, held:]
        best = torch.zeros(kv, held, device=q.device)
        own_pos = torch.arange(r, device=q.device)
        for a in range(0, r, ROWS):
            b = min(a + ROWS, r)
            lp = scale * qg[:, :, a:b] @ k_prompt.transpose(-1, -2)[:, None]  # (kv, g, rows, held)
            lo = scale * qg[:, :, a:b] @ k_own.transpose(-1, -2)[:, None]  # (kv, g, rows, r)
            lo = lo.masked_fill(own_pos[None, :] > own_pos[a:b, None], -torch.inf)  # causal
            z = torch.logaddexp(torch.logsumexp(lp, dim=-1), torch.logsumexp(lo, dim=-1))  # (kv, g, rows)
            top = (lp - z[..., None]).amax(dim=(1, 2))  # (kv, held): the largest log-weight; exp is monotone
            torch.maximum(best, top.exp(), out=best)
        full = torch.zeros(kv, self.prompt)
        start = self.prompt - held  # a sliding-window layer holds only its last positions
        full[:, max(start, 0):] = best[:, max(-start, 0):].cpu()
        before = self.best.get(layer)
        self.best[layer] = full if before is None else torch.maximum(before, full)


def reconstruction_scores(model: Any, tokenizer: Any, take_cache: Callable[[], Any], prompt: np.ndarray,
                          num_layers: int, device: Any, piece: int | None = None
                          ) -> dict[int, np.ndarray]:
    """Per layer, ``(kv_heads, len(prompt))`` float32: each prompt position's reconstruction score.

    ``take_cache()`` gives a fresh cache holding the prompt's exact keys and values, once per pass
    (:func:`reconstruction_inputs`; ``kvtool.evaluate.PromptCache.take``); the passes extend and drop it.
    """
    scorer = MaxAttention(len(prompt))
    for ids in reconstruction_inputs(tokenizer, prompt, piece):
        rec = Recorder(num_layers, 0, hook=scorer)
        scorer.scaling = rec.scaling
        with recording(model, rec), torch.inference_mode():
            model(input_ids=torch.as_tensor(ids, device=device)[None], logits_to_keep=1, use_cache=True,
                  **{forward_cache_kwarg(model): take_cache()})
    return {layer: s.numpy() for layer, s in scorer.best.items()}


def passes(tokenizer: Any, prompt: np.ndarray, piece: int | None = None) -> int:
    """How many passes (caches taken) :func:`reconstruction_scores` makes for ``prompt``."""
    return len(reconstruction_inputs(tokenizer, prompt, piece))
