"""``kvzip``: KVzip — keep the tokens the model needs to repeat its own prompt (arXiv 2505.23416).

Query-agnostic: the scores come from a pass in which the model, after the prompt, reads an instruction to
repeat it and then the prompt itself (teacher-forced); a prompt token's score is the largest attention any
of those queries pays it. :mod:`kvtool.reconstruct` runs that pass (only ``kvtool eval`` runs the model, so
only it can give the scores: ``kvtool compress`` and ``sweep`` on a capture refuse the codec in one line).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtool.codecs.base import LayerContext, register
from kvtool.codecs.select.selection import ScoredSelector
from kvtool.errors import CodecError


@register
@dataclass
class KVzip(ScoredSelector):
    """``kvzip:keep=0.5,per_head=true`` — keep the tokens the model attends to most while repeating its prompt.

    KVzip (Kim et al., arXiv 2505.23416 §3): a KV pair is important when the model cannot reconstruct its
    context without it. ``kvtool eval`` runs, from a copy of each chunk's exact prompt cache, the prompt again
    after "Repeat the previous context exactly." (in pieces of 2,048 tokens; a later piece is introduced by
    "Repeat the part of the previous context exactly, starting with" and the previous 8 tokens), and scores
    each prompt token of a kv head by the largest softmax weight any reconstruction query of the head's group
    gives it (:mod:`kvtool.reconstruct`: the model's own attention over the whole prompt, not KVzip's
    per-piece renormalisation). The first ``sink=4`` positions are kept.

    ``per_head=true`` (AdaKV budgets: heads keep different numbers of tokens) is what KVzip does and what
    measures best here (docs/FIDELITY.md); it is not the default only so that every selector's default
    stays one budget per head. Costs one more forward pass over the prompt per chunk.
    """

    name = "kvzip"
    sink: int = 4

    def reads_reconstruction(self) -> bool:
        return True

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        table = None if context is None else context.reconstruction
        if table is None:
            raise CodecError("kvzip scores tokens by a pass in which the model repeats its prompt, so it needs the "
                             "model: use it in kvtool eval (compress and sweep code a capture without the model)")
        positions = context.key_positions if context.key_positions is not None else np.arange(keys.shape[1])
        if table.shape[0] != keys.shape[0] or int(np.max(positions, initial=-1)) >= table.shape[1]:
            raise CodecError(f"kvzip: the reconstruction scores {table.shape} do not cover the layer's "
                             f"{keys.shape[0]} kv heads at positions up to {int(np.max(positions, initial=0))}")
        return np.asarray(table[:, positions], dtype=np.float64)  # (heads, T)
