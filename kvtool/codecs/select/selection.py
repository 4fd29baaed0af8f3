"""Shared machinery of the token selectors (eviction codecs): budgets, protected tokens, head-adaptive
allocation and the attention of the observed queries. One module per selector builds on it
(``streaming``, ``h2o``, ``snapkv``, ``tova``, ``knorm``, ``expected``); docs/CODECS.md describes them.

Budget. ``keep=f`` keeps ``round(f · T)`` of a head's ``T`` tokens (at least 1), ``tokens=n`` keeps ``n``;
giving neither means ``keep=0.5``. Every head keeps exactly that many (with ``per_head=true`` the layer
keeps ``heads × n`` in total, shared unevenly).

Protected tokens are kept before any score is looked at, in this order of priority: the first ``sink``
positions of the sequence (StreamingLLM's attention sinks; by position, so a sliding-window layer whose
held rows start later has none), then the newest ones — the last ``recent`` tokens, and for
query-based selectors every key newer than the last observed query (no observed query could see it, so it
is treated as a token appended after compression, as a serving cache would keep it). The rest of the
budget goes to the highest scores. With ``tokens=n`` a budget below ``sink + recent`` is an error; with
``keep=f`` on a short cache the protected windows are cut to the budget (sinks first), so the budget is
always met exactly.

Head-adaptive budgets (``per_head=true``, AdaKV, arXiv 2407.11550 §3): the protected tokens stay in every
head; the remaining ``heads × (n − protected)`` slots go to the highest scores of the whole layer, after
each head has taken its own top ``⌊0.2 · (n − protected)⌋`` (AdaKV's safeguard ``α = 0.2``). Heads then
keep different numbers of tokens, stored as a flat index list plus per-head counts
(:func:`kvtool.codecs.base.pack_selection`).

Scores and selections are computed in :meth:`fit` from the layer's original keys (``context.keys``; the
tensor itself when it is the keys) and the observed queries, so the keys codec and the values codec of a
layer select the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from kvtool.codecs.base import LayerContext, Selector, check_input, kept_mask
from kvtool.errors import CodecError
from kvtool.metrics import attention_chunks

DEFAULT_KEEP = 0.5
ADAKV_SAFEGUARD = 0.2  # AdaKV's alpha: every head keeps at least this share of its free budget

# tiers of the ranking: higher tiers are kept first, whatever their score
_SCORED, _NEWEST, _SINK = 0, 1, 2


@dataclass
class BudgetSelector(Selector):
    """A selector with a token budget (``keep`` / ``tokens``) and protected ``sink`` / ``recent`` tokens."""

    keep: float | None = None
    tokens: int | None = None
    sink: int = 0
    recent: int | None = 0

    #: True for selectors that score keys with the observed queries (they need captured queries).
    query_based: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.keep is None and self.tokens is None:
            self.keep = DEFAULT_KEEP
        self._mask: np.ndarray | None = None
        super().__post_init__()

    def validate(self, head_dim: int | None = None) -> None:
        if self.keep is not None and self.tokens is not None:
            raise CodecError(f"{self.name}: give keep= or tokens=, not both")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise CodecError(f"keep must be in (0, 1], got {self.keep:g}")
        if self.tokens is not None and self.tokens < 1:
            raise CodecError(f"tokens must be at least 1, got {self.tokens}")
        for name in ("sink", "recent"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise CodecError(f"{name} must be at least 0, got {value}")
        protected = self.sink + (self.recent or 0)
        if self.tokens is not None and self.tokens < protected:
            raise CodecError(f"tokens={self.tokens} is below sink + recent = {protected}")

    def params(self) -> dict[str, object]:
        """The spec parameters; an unset (``None``) budget or window is left out of the spec."""
        return {k: v for k, v in super().params().items() if v is not None}

    def uses_queries(self) -> bool:
        return self.query_based

    # -- budget ---------------------------------------------------------------------------------------
    def budget(self, tokens: int) -> int:
        """Tokens each head keeps out of ``tokens``."""
        if self.tokens is not None:
            if self.tokens > tokens:
                raise CodecError(f"{self.name}: tokens={self.tokens} is more than the {tokens} tokens of "
                                 "the cache")
            return self.tokens
        return max(1, min(tokens, math.floor(self.keep * tokens + 0.5)))  # type: ignore[operator]

    def recent_window(self, budget: int) -> int:
        """Tokens of the recent window at this budget (``recent``; subclasses may derive it)."""
        return self.recent or 0

    # -- fitting --------------------------------------------------------------------------------------
    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> BudgetSelector:
        x = check_input(x)
        super().fit(x, context)
        if context is not None and context.role == "values" and context.values is None:
            context = replace(context, values=x)
        keys = self._keys(x, context)
        n = self.budget(x.shape[1])
        memo = _recall(self, keys, context)
        if memo is not None:  # the keys codec of this layer already chose: the values codec keeps the same rows
            self._mask = memo
            return self
        tier = np.full(x.shape[1], _SCORED, dtype=np.int8)  # (T,)
        newest = self.protect(keys, context)  # (T,) bool: keys no observed query could see, windows
        recent = self.recent_window(n)
        if recent:
            newest[-recent:] = True
        tier[newest] = _NEWEST
        tier[sink_rows(self.sink, context, x.shape[1])] = _SINK
        scores = self.scores(keys, context)  # (heads, T)
        self._mask = self._choose(scores, tier, n)
        _remember(self, keys, context, self._mask)
        return self

    def _keys(self, x: np.ndarray, context: LayerContext | None) -> np.ndarray:
        if context is not None and context.keys is not None:
            keys = np.asarray(context.keys, dtype=np.float32)
            if keys.shape != x.shape:
                raise CodecError(f"{self.name}: the layer's keys {keys.shape} do not match the tensor "
                                 f"{x.shape}")
            return keys
        if context is not None and context.role == "values":
            raise CodecError(f"{self.name} selects values by their keys; give the layer's keys in the "
                             "context (LayerContext.keys)")
        return x

    def protect(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        """Boolean ``(T,)``: tokens kept with the newest (besides ``recent``). Query-based selectors keep
        every key newer than the last observed query."""
        protected = np.zeros(keys.shape[1], dtype=bool)
        if self.query_based:
            obs = observed(self.name, context, keys.shape[1])
            protected |= obs.key_positions > obs.query_positions.max()
        return protected

    def scores(self, keys: np.ndarray, context: LayerContext | None) -> np.ndarray:
        """Importance ``(heads, T)`` of each token (higher is kept first)."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores()")

    def _choose(self, scores: np.ndarray, tier: np.ndarray, n: int) -> np.ndarray:
        """The keep mask ``(heads, T)``: ``n`` tokens per head, ranked by (tier, score, newer first)."""
        heads, tokens = scores.shape
        position = np.arange(tokens)
        order = np.stack([np.lexsort((position, scores[h], tier))[::-1] for h in range(heads)])  # (heads, T)
        return kept_mask(order[:, :n], scores.shape)

    # -- selecting ------------------------------------------------------------------------------------
    def keep_mask(self, x: np.ndarray) -> np.ndarray:
        x = check_input(x)
        if self._mask is None or self._mask.shape != x.shape[:2]:
            self.fit(x)  # no context: only selectors that need no queries get here without an error
        return self._mask.copy()  # type: ignore[union-attr]

    def select(self, x: np.ndarray) -> np.ndarray:
        mask = self.keep_mask(x)
        counts = mask.sum(axis=1)
        if (counts != counts[0]).any():
            raise CodecError(f"{self.spec()}: heads keep different numbers of tokens (per_head=true), so "
                             "there is no (heads, n_keep) index array; use keep_mask()")
        return np.nonzero(mask)[1].reshape(mask.shape[0], -1)


@dataclass
class ScoredSelector(BudgetSelector):
    """A :class:`BudgetSelector` ranking tokens by a score, with head-adaptive budgets (``per_head``)."""

    per_head: bool = False

    def _choose(self, scores: np.ndarray, tier: np.ndarray, n: int) -> np.ndarray:
        if not self.per_head:
            return super()._choose(scores, tier, n)
        heads, tokens = scores.shape
        # protected tokens, the newest and sinks first, cut to the budget
        position = np.arange(tokens)
        protected_order = np.lexsort((position, tier))[::-1][: min(n, int((tier > _SCORED).sum()))]
        mask = np.zeros((heads, tokens), dtype=bool)
        mask[:, protected_order] = True
        free = n - protected_order.size
        if free == 0:
            return mask
        ranked = np.where(mask, -np.inf, scores.astype(np.float64))  # (heads, T): protected never again
        safe = math.floor(ADAKV_SAFEGUARD * free)
        if safe:
            top = np.argsort(-ranked, axis=1, kind="stable")[:, :safe]
            np.put_along_axis(mask, top, True, axis=1)
            np.put_along_axis(ranked, top, -np.inf, axis=1)
        rest = heads * (free - safe)
        flat = np.argsort(-ranked.ravel(), kind="stable")[:rest]  # the layer's best remaining scores
        mask.ravel()[flat] = True
        return mask


def sink_rows(sink: int, context: LayerContext | None, tokens: int) -> np.ndarray:
    """Boolean ``(tokens,)``: the rows holding the first ``sink`` positions of the sequence. A sliding-window
    layer holds only its newest tokens, so its rows need not start at position 0 (and then hold no sink)."""
    positions = context.key_positions if context is not None else None
    if positions is None or len(positions) != tokens:
        return np.arange(tokens) < sink
    return np.asarray(positions, dtype=np.int64) < sink


# ------------------------------------------------------------------------------------ selection memo

# The keys codec and the values codec of a layer are separate instances fitted on the same context arrays
# and choose the same rows; the last few choices are remembered so the second fit does not score again.
# An entry holds the very arrays it was computed from and matches only those objects (``is``), so a
# recycled id can never match.
_MEMO: list[tuple[tuple, tuple, np.ndarray]] = []
_MEMO_SIZE = 4


def _inputs(keys: np.ndarray, context: LayerContext | None) -> tuple:
    if context is None:
        return (keys,)
    return (keys, context.queries, context.values, context.query_positions, context.key_positions,
            context.rope_inv_freq, context.rope, context.scaling, context.sliding_window, context.query_moments,
            context.reconstruction)


def _same(a: object, b: object) -> bool:
    return a is b or (not isinstance(a, np.ndarray) and not isinstance(b, np.ndarray) and a == b)


def _recall(selector: BudgetSelector, keys: np.ndarray, context: LayerContext | None) -> np.ndarray | None:
    key, inputs = (type(selector), tuple(selector.params().items())), _inputs(keys, context)
    for k, ins, mask in _MEMO:
        if k == key and len(ins) == len(inputs) and all(_same(a, b) for a, b in zip(ins, inputs, strict=True)):
            return mask.copy()
    return None


def _remember(selector: BudgetSelector, keys: np.ndarray, context: LayerContext | None, mask: np.ndarray) -> None:
    _MEMO.insert(0, ((type(selector), tuple(selector.params().items())), _inputs(keys, context), mask.copy()))
    del _MEMO[_MEMO_SIZE:]


# ------------------------------------------------------------------------------------ observed queries


@dataclass
class Observed:
    """The observed queries of one layer as torch tensors, with positions and the attention geometry."""

    queries: torch.Tensor  # (q_heads, Tq, d)
    query_positions: np.ndarray  # (Tq,)
    key_positions: np.ndarray  # (T,)
    scaling: float
    window: int


def observed(name: str, context: LayerContext | None, tokens: int) -> Observed:
    """The observed queries of ``context``, or a CodecError saying how to capture them."""
    if context is None or context.queries is None or np.shape(context.queries)[1] == 0:
        raise CodecError(f"{name} scores tokens with the model's queries, but this cache holds none; "
                         "capture with `kvtool capture --queries last:N`")
    q = torch.from_numpy(np.ascontiguousarray(context.queries, dtype=np.float32))
    qpos = np.asarray(context.query_positions if context.query_positions is not None
                      else np.arange(tokens - q.shape[1], tokens), dtype=np.int64)
    kpos = np.asarray(context.key_positions if context.key_positions is not None else np.arange(tokens),
                      dtype=np.int64)
    scaling = context.scaling if context.scaling is not None else q.shape[-1] ** -0.5
    return Observed(q, qpos, kpos, float(scaling), int(context.sliding_window or 0))


def attention_probs(keys: np.ndarray, obs: Observed, last: int | None = None) -> torch.Tensor:
    """Attention ``(q_heads, Tq', T)`` of the observed queries (the last ``last`` of them) over ``keys``
    ``(kv_heads, T, d)``: the model's scaling, causal and sliding-window masks on absolute positions."""
    q, qpos = obs.queries, obs.query_positions
    if last is not None:
        q, qpos = q[:, -last:], qpos[-last:]
    k = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))
    chunks = attention_chunks(q, k, torch.from_numpy(qpos), torch.from_numpy(obs.key_positions),
                              obs.scaling, obs.window)
    return torch.cat([probs for probs, _, _ in chunks], dim=1)


def per_kv_head(scores: torch.Tensor, kv_heads: int) -> np.ndarray:
    """Mean of ``(q_heads, T)`` scores over the query heads that read each kv head: ``(kv_heads, T)``."""
    q_heads, tokens = scores.shape
    return scores.reshape(kv_heads, q_heads // kv_heads, tokens).mean(dim=1).double().numpy()
