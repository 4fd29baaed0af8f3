"""Reconstruction and attention metrics, defined once for every command.

Reconstruction (``x``, ``x_hat`` of shape ``(heads, tokens, head_dim)``):

* ``rel_mse = Σ‖x − x̂‖² / Σ‖x‖²`` (for unit vectors: TurboQuant's D_mse, arXiv 2504.19874 §2);
* ``cosine`` = mean over token rows of cos(x, x̂).

Attention (captured queries ``q`` ``(q_heads, Tq, head_dim)`` at absolute positions ``query_positions``;
keys/values at ``key_positions``; query head ``j`` reads KV head ``j // (q_heads // kv_heads)`` (GQA);
logits ``S = scaling · q kᵀ`` with the model's scaling, default ``head_dim ** -0.5``; a key is visible to
a query iff ``key_pos <= query_pos`` and, for a sliding-window layer, ``key_pos > query_pos − window``):

* ``attention_logit_rel_error = ‖Ŝ − S‖ / ‖S‖`` over visible entries;
* ``attention_kl`` = mean over (head, query) of KL(p ‖ p̂), ``p = softmax(S)``;
* ``topk_overlap`` = mean over (head, query) of |top-k(p) ∩ top-k(p̂)| / min(k, visible keys);
* ``attention_output_rel_error = ‖p̂ V̂ − p V‖ / ‖p V‖`` — what the next layer actually sees;
* ``attention_output_cosine`` = mean over (head, query) of cos(p V, p̂ V̂).

Evicted keys (``key_mask`` False, from token-selection codecs) are removed from p̂ and from the logit error;
KL floors their log-probability at ``log(1e-12)`` so a dropped key with real mass costs a finite amount.
Keys already missing from the reference (``reference_mask`` False: the rows a decompressed evicted cache
marks as not kept) are removed from both p and p̂.
Everything is computed in torch float32, one KV head and a bounded block of queries at a time.

:func:`attention` is :func:`reference_attention` (the exact logits, probabilities, top-k and outputs of one
layer) followed by :func:`compare_attention` (one compressed version against it). ``sweep`` and ``plan``
compute the reference once per layer and compare every codec with it; the figures are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

ATTENTION_KEYS = (
    "attention_logit_rel_error",
    "attention_kl",
    "topk_overlap",
    "attention_output_rel_error",
    "attention_output_cosine",
)
LOG_FLOOR = math.log(1e-12)
BLOCK_ELEMENTS = 1 << 22  # logits per block: 16 MiB of float32


def _safe_ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def reconstruction(x: np.ndarray, x_hat: np.ndarray) -> dict[str, object]:
    """``rel_mse`` and ``cosine`` of ``x_hat`` vs ``x`` (both ``(heads, tokens, head_dim)``), total and
    per head (``heads``: a list of ``{"rel_mse", "cosine"}``)."""
    a = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    b = torch.from_numpy(np.ascontiguousarray(x_hat, dtype=np.float32))
    err = (a - b).square().sum(dim=(1, 2)).double()  # (heads,)
    ref = a.square().sum(dim=(1, 2)).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).double()  # (heads, tokens)
    heads = [
        {"rel_mse": float(e / r) if r > 0 else float(e > 0), "cosine": float(c.mean()) if c.numel() else 1.0}
        for e, r, c in zip(err, ref, cos, strict=True)
    ]
    total_ref = float(ref.sum())
    return {
        "rel_mse": float(err.sum()) / total_ref if total_ref > 0 else float(err.sum() > 0),
        "cosine": float(cos.mean()) if cos.numel() else 1.0,
        "heads": heads,
    }


@dataclass
class _Sums:
    """Running sums of one KV head's query group."""

    logit_err: float = 0.0
    logit_ref: float = 0.0
    kl: float = 0.0
    overlap: float = 0.0
    out_err: float = 0.0
    out_ref: float = 0.0
    out_cos: float = 0.0
    rows: int = 0

    def add(self, other: _Sums) -> None:
        for name in ("logit_err", "logit_ref", "kl", "overlap", "out_err", "out_ref", "out_cos", "rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def result(self) -> dict[str, float]:
        rows = max(self.rows, 1)
        return {
            "attention_logit_rel_error": _safe_ratio(self.logit_err, self.logit_ref),
            "attention_kl": self.kl / rows,
            "topk_overlap": self.overlap / rows,
            "attention_output_rel_error": _safe_ratio(self.out_err, self.out_ref),
            "attention_output_cosine": self.out_cos / rows,
        }


# Queries per chunk are chosen so one chunk's probabilities hold about this many floats (1 MiB): the
# handful of (q_heads, chunk, T) temporaries (softmax, sort, prefix sums) stay a few MiB at any T.
CHUNK_ELEMENTS = 1 << 18


def visible(qpos: torch.Tensor, kpos: torch.Tensor, window: int) -> torch.Tensor:
    """Causal (and sliding-window) visibility on absolute positions: (c,), (T,) → (c, T) bool."""
    dist = qpos[:, None] - kpos[None, :]  # (c, T)
    vis = dist >= 0
    return vis & (dist < window) if window > 0 else vis


def attention_chunks(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                     scaling: float, window: int = 0, chunk: int | None = None,
                     kept: torch.Tensor | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (probs (q_heads, c, T), qpos (c,), visible (c, T)) for successive chunks of queries.

    q: (q_heads, Tq, d), k: (kv_heads, T, d). Query heads are grouped onto their kv head without
    copying the keys: heads kv·g .. kv·g + g-1 share kv head kv. ``kept`` (kv_heads, T) bool masks out
    the evicted rows of a decompressed evicted cache (they get no attention).
    """
    hq, tq, d = q.shape
    hkv, t = k.shape[0], k.shape[1]
    group = hq // hkv
    chunk = chunk or max(1, CHUNK_ELEMENTS // (hq * max(t, 1)))
    kt = k.transpose(1, 2)  # (kv_heads, d, T)
    for s in range(0, tq, chunk):
        qc = q[:, s:s + chunk]  # (q_heads, c, d)
        c = qc.shape[1]
        logits = torch.bmm(qc.reshape(hkv, group * c, d), kt).reshape(hq, c, t) * scaling
        vis = visible(qpos[s:s + chunk], kpos, window)
        logits = logits.masked_fill(~vis, float("-inf"))
        if kept is not None:
            logits = logits.masked_fill(~kept.repeat_interleave(group, dim=0)[:, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query with no visible key → zeros
        yield probs, qpos[s:s + chunk], vis


def visibility(
    query_positions: np.ndarray, key_positions: np.ndarray, sliding_window: int = 0
) -> torch.Tensor:
    """Boolean ``(Tq, Tk)``: causal (``key <= query``) and, if ``sliding_window > 0``, within the window."""
    qp = torch.as_tensor(np.asarray(query_positions), dtype=torch.int64)[:, None]
    kp = torch.as_tensor(np.asarray(key_positions), dtype=torch.int64)[None, :]
    visible = kp <= qp
    if sliding_window and sliding_window > 0:
        visible &= kp > qp - sliding_window
    return visible


@dataclass
class _RefBlock:
    """The exact attention of one KV head's query group over a block of ``c`` queries."""

    q: torch.Tensor  # (g, c, d)
    visible: torch.Tensor  # (c, Tk)
    s: torch.Tensor  # (g, c, Tk) logits, unmasked
    logp: torch.Tensor  # (g, c, Tk) log-softmax over the visible keys
    p: torch.Tensor  # (g, c, Tk)
    top: torch.Tensor  # (g, c, Tk) bool: the top-k keys of each query
    out: torch.Tensor  # (g, c, d) the attention output p V


@dataclass
class AttentionReference:
    """The exact attention of one layer, computed once by :func:`reference_attention` and compared with
    any number of compressed versions by :func:`compare_attention` (``sweep`` and ``plan`` do that)."""

    keys: torch.Tensor  # (kv_heads, Tk, d)
    values: torch.Tensor  # (kv_heads, Tk, d)
    blocks: list[list[_RefBlock]]  # per KV head, per query block
    scaling: float
    topk: int

    @property
    def kv_heads(self) -> int:
        return int(self.keys.shape[0])

    def output_energy(self) -> list[float]:
        """``‖p V‖²`` per KV head, summed over its query heads and queries (the denominator of the
        attention-output error)."""
        return [float(sum(float(b.out.square().sum()) for b in head)) for head in self.blocks]


def _reference_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                     scaling: float, topk: int) -> _RefBlock:
    """Queries ``q`` ``(g, c, d)`` of one KV head, ``k, v`` ``(Tk, d)``, ``visible`` ``(c, Tk)``."""
    s = torch.matmul(q, k.T) * scaling  # (g, c, Tk)
    masked = s.masked_fill(~visible, -math.inf)
    logp = torch.log_softmax(masked, dim=-1)
    k_eff = min(topk, k.shape[0])
    top = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, masked.topk(k_eff, dim=-1).indices, True)
    p = logp.exp()
    return _RefBlock(q, visible, s, logp, p, top, torch.matmul(p, v))


def _compare_block(ref: _RefBlock, k_hat: torch.Tensor | None, v_hat: torch.Tensor, values_exact: bool,
                   kept: torch.Tensor | None, scaling: float, topk: int) -> _Sums:
    """Sums for one reference block against ``k_hat`` (None: exact) and ``v_hat`` ``(Tk, d)``
    (``values_exact``: it is the reference's own), and ``kept`` ``(Tk,)`` (None: every key kept)."""
    s, visible = ref.s, ref.visible
    n_k = s.shape[-1]
    exact_logits = k_hat is None and kept is None
    s_hat = s if k_hat is None else torch.matmul(ref.q, k_hat.T) * scaling
    vis_hat = visible if kept is None else visible & kept  # (c, Tk)
    logit_err = torch.where(vis_hat, s_hat - s, 0.0).square().sum()
    logit_ref = torch.where(vis_hat, s, 0.0).square().sum()
    logp, p = ref.logp, ref.p
    k_eff = min(topk, n_k)
    if exact_logits:  # the same logits: reuse what the reference computed from them
        logp_hat, p_hat, top_hat = logp, p, ref.top
    else:
        s_hat = s_hat.masked_fill(~vis_hat, -math.inf)
        logp_hat = torch.log_softmax(s_hat, dim=-1)
        p_hat = torch.nan_to_num(logp_hat.exp())  # a query with every visible key evicted attends to nothing
        top_hat = torch.zeros_like(ref.top).scatter_(-1, s_hat.topk(k_eff, dim=-1).indices, True)
    kl = torch.where(visible, p * (logp - logp_hat.clamp(min=LOG_FLOOR)), 0.0).sum(-1)  # (g, c)
    hits = (ref.top & top_hat & vis_hat).sum(-1).double()
    overlap = hits / visible.sum(-1).clamp(max=k_eff, min=1).double()  # (g, c) / (c,)
    out = ref.out  # (g, c, d)
    out_hat = out if exact_logits and values_exact else torch.matmul(p_hat, v_hat)
    cos = torch.nn.functional.cosine_similarity(out, out_hat, dim=-1, eps=1e-12)
    return _Sums(float(logit_err), float(logit_ref), float(kl.sum()), float(overlap.sum()),
                 float((out_hat - out).square().sum()), float(out.square().sum()), float(cos.sum()),
                 int(cos.numel()))


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def reference_attention(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    query_positions: np.ndarray,
    key_positions: np.ndarray,
    *,
    scaling: float | None = None,
    sliding_window: int = 0,
    topk: int = 8,
    reference_mask: np.ndarray | None = None,
) -> AttentionReference:
    """The exact attention of one layer (logits, probabilities, top-k, outputs), for
    :func:`compare_attention`. Shapes as in :func:`attention`; ``reference_mask`` ``(kv_heads, Tk)`` bool
    removes keys the reference itself lacks (a decompressed evicted cache's ``kept``)."""
    q_heads, n_q, dim = queries.shape
    kv_heads, n_k, _ = keys.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    group = q_heads // kv_heads
    scale = dim**-0.5 if scaling is None else float(scaling)
    q, k, v = _tensor(queries), _tensor(keys), _tensor(values)
    visible = visibility(query_positions, key_positions, sliding_window)  # (Tq, Tk)
    exists = None if reference_mask is None else torch.from_numpy(np.asarray(reference_mask, dtype=bool))
    chunk = max(1, BLOCK_ELEMENTS // max(group * n_k, 1))
    blocks = [[_reference_block(q[h * group:(h + 1) * group, start:min(start + chunk, n_q)], k[h], v[h],
                                visible[start:min(start + chunk, n_q)] & (True if exists is None else exists[h]),
                                scale, topk)
               for start in range(0, n_q, chunk)] for h in range(kv_heads)]
    return AttentionReference(k, v, blocks, scale, topk)


def compare_attention(
    ref: AttentionReference,
    keys_hat: np.ndarray | None = None,
    values_hat: np.ndarray | None = None,
    *,
    key_mask: np.ndarray | None = None,
) -> dict[str, object]:
    """The metrics of :func:`attention` for compressed ``keys_hat``/``values_hat`` ``(kv_heads, Tk, d)``
    against a reference computed once; ``None`` leaves that tensor exact (what one role's error needs)."""
    kh = None if keys_hat is None else _tensor(keys_hat)
    vh = None if values_hat is None else _tensor(values_hat)
    kept = None if key_mask is None else torch.from_numpy(np.asarray(key_mask, dtype=bool))
    total, heads = _Sums(), []
    for h, blocks in enumerate(ref.blocks):
        sums = _Sums()
        for block in blocks:
            sums.add(_compare_block(block, None if kh is None else kh[h], ref.values[h] if vh is None else vh[h],
                                    vh is None, None if kept is None else kept[h], ref.scaling, ref.topk))
        total.add(sums)
        heads.append(sums.result())
    return {**total.result(), "topk": ref.topk, "heads": heads}


def output_errors(
    ref: AttentionReference,
    keys_hat: np.ndarray | None = None,
    values_hat: np.ndarray | None = None,
    *,
    key_mask: np.ndarray | None = None,
) -> list[float]:
    """``‖ô_h − o_h‖²`` per KV head (summed over its query heads and queries): the numerator of
    ``attention_output_rel_error`` alone, with ô computed exactly as :func:`compare_attention` computes it
    and none of the other metrics — what ``plan`` needs for every candidate (``None``: that tensor exact).
    ``attention_output_rel_error`` of head h is ``sqrt(output_errors[h] / ref.output_energy()[h])``."""
    kh = None if keys_hat is None else _tensor(keys_hat)
    vh = None if values_hat is None else _tensor(values_hat)
    kept = None if key_mask is None else torch.from_numpy(np.asarray(key_mask, dtype=bool))
    errors = []
    for h, blocks in enumerate(ref.blocks):
        err = 0.0
        for b in blocks:
            if kh is None and kept is None:
                p_hat = b.p
            else:
                s_hat = b.s if kh is None else torch.matmul(b.q, kh[h].T) * ref.scaling
                vis_hat = b.visible if kept is None else b.visible & kept[h]
                p_hat = torch.nan_to_num(torch.log_softmax(s_hat.masked_fill(~vis_hat, -math.inf), dim=-1).exp())
            if p_hat is b.p and vh is None:
                continue
            out_hat = torch.matmul(p_hat, ref.values[h] if vh is None else vh[h])
            err += float((out_hat - b.out).square().sum())
        errors.append(err)
    return errors


def attention(
    queries: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    keys_hat: np.ndarray,
    values_hat: np.ndarray,
    query_positions: np.ndarray,
    key_positions: np.ndarray,
    *,
    scaling: float | None = None,
    sliding_window: int = 0,
    key_mask: np.ndarray | None = None,
    topk: int = 8,
    reference_mask: np.ndarray | None = None,
) -> dict[str, object]:
    """Attention-score and attention-output metrics of compressed keys/values (see module docstring).

    queries ``(q_heads, Tq, d)``; keys, values, keys_hat, values_hat ``(kv_heads, Tk, d)``;
    query_positions ``(Tq,)``; key_positions ``(Tk,)``; key_mask and reference_mask ``(kv_heads, Tk)`` bool
    or None.
    Returns the totals of :data:`ATTENTION_KEYS`, ``topk`` and ``heads``: the same metrics per KV head
    (aggregated over the query heads that read it).
    """
    ref = reference_attention(queries, keys, values, query_positions, key_positions, scaling=scaling,
                              sliding_window=sliding_window, topk=topk, reference_mask=reference_mask)
    return compare_attention(ref, keys_hat, values_hat, key_mask=key_mask)


# ------------------------------------------------------------------------------------- end to end (eval)
#
# ``kvtool eval`` compares the model's next-token distributions with an exact and a compressed cache on the
# same tokens, with llama.cpp's perplexity / KL-divergence statistics (tools/perplexity/perplexity.cpp):
# per scored token t, with p the exact and q the compressed distribution and y_t the true next token,
#
# * nll_p = −ln p(y_t), nll_q = −ln q(y_t); ppl = exp(mean nll);
# * ln(PPL(Q)/PPL(base)) = mean(nll_q) − mean(nll_p), its stderr from the two stderrs and their covariance
#   (= the stderr of the paired difference); Δppl % = 100·(exp(that) − 1), stderr 100·exp(that)·stderr;
# * KLD = Σ_v p(v) (ln p(v) − ln q(v)) — mean ± stderr, median, p90, p99, max (percentiles interpolate
#   linearly between sorted values, as llama.cpp and numpy's default do);
# * top-1 agreement ("same top p") = share of tokens whose argmax agrees, stderr sqrt(f(1−f)/(n−1));
# * Δp = q(y_t) − p(y_t); RMS Δp = sqrt(mean Δp²), stderr ½/RMS · stderr(Δp²).
#
# A stderr is sqrt((E[x²] − E[x]²)/(n − 1)) (0 for n ≤ 10, as llama.cpp). Everything is float64.

NEXT_TOKEN_FIELDS = ("nll_exact", "nll", "kld", "same_top", "p_exact", "p")
LOGIT_BLOCK = 64  # rows of (vocab) logits per float64 block
#: A (rows, vocab) float64 block of the sliced statistics holds about this many elements (32 MiB), so
#: their memory does not grow with the vocabulary: 85 rows of SmolLM2's 49,152, 16 of a 262,144 one.
SLICE_ELEMENTS = 1 << 22

#: The model's output head on a slice of positions: final hidden states ``(rows, hidden)`` → logits
#: ``(rows, vocab)``, exactly as the model turns them into its logits (:mod:`kvtool.scoring`).
Head = Callable[[torch.Tensor], torch.Tensor]


def _block_stats(lp: torch.Tensor, lq: torch.Tensor, t: torch.Tensor) -> dict[str, np.ndarray]:
    """The per-token fields of one block: ``lp``, ``lq`` float64 log-probabilities ``(b, V)``, targets
    ``t`` ``(b, 1)``."""
    nll_p = -lp.gather(1, t)[:, 0]
    nll_q = -lq.gather(1, t)[:, 0]
    return {"nll_exact": nll_p.numpy(), "nll": nll_q.numpy(), "kld": (lp.exp() * (lp - lq)).sum(-1).numpy(),
            "same_top": (lp.argmax(-1) == lq.argmax(-1)).double().numpy(),
            "p_exact": torch.exp(-nll_p).numpy(), "p": torch.exp(-nll_q).numpy()}


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.detach().cpu().double(), dim=-1)


def _join(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in blocks]) if blocks else np.zeros(0) for k in NEXT_TOKEN_FIELDS}


def _targets(targets: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(targets), dtype=torch.int64)


def next_token_stats(exact_logits: torch.Tensor, logits: torch.Tensor, targets: np.ndarray | torch.Tensor
                     ) -> dict[str, np.ndarray]:
    """Per-token comparison of two ``(T, vocab)`` logit matrices predicting ``targets`` ``(T,)``.

    Returns float64 arrays ``(T,)``: ``nll_exact``, ``nll`` (−ln of the target's probability), ``kld``
    (KL(exact ‖ compressed) in nats), ``same_top`` (1.0 where the argmaxes agree), ``p_exact``, ``p``.
    """
    y = _targets(targets)
    if exact_logits.shape != logits.shape or exact_logits.shape[0] != y.shape[0]:
        raise ValueError(f"logits {tuple(exact_logits.shape)} / {tuple(logits.shape)} and targets "
                         f"{tuple(y.shape)} disagree")
    return _join([_block_stats(_log_probs(exact_logits[s:s + LOGIT_BLOCK]), _log_probs(logits[s:s + LOGIT_BLOCK]),
                               y[s:s + LOGIT_BLOCK, None]) for s in range(0, y.shape[0], LOGIT_BLOCK)])


def slice_rows(vocab: int) -> int:
    """Positions per slice of :func:`sliced_next_token_stats` for a vocabulary of ``vocab`` (>= 1)."""
    return max(1, SLICE_ELEMENTS // max(int(vocab), 1))


def sliced_next_token_stats(exact_hidden: torch.Tensor, hidden: torch.Tensor, targets: np.ndarray | torch.Tensor,
                            head: Head, rows: int) -> dict[str, np.ndarray]:
    """:func:`next_token_stats` of ``head(exact_hidden)`` against ``head(hidden)``, ``rows`` positions at a
    time: no ``(T, vocab)`` matrix is ever held, only ``(rows, vocab)`` blocks.

    ``exact_hidden``, ``hidden``: ``(T, d)`` what the head reads at each scored position (the final hidden
    states; with a head that is the identity, the logits themselves); ``targets`` ``(T,)``.
    """
    y = _targets(targets)
    if exact_hidden.shape != hidden.shape or exact_hidden.shape[0] != y.shape[0]:
        raise ValueError(f"hidden states {tuple(exact_hidden.shape)} / {tuple(hidden.shape)} and targets "
                         f"{tuple(y.shape)} disagree")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    blocks = []
    for s in range(0, y.shape[0], rows):
        lp = _log_probs(head(exact_hidden[s:s + rows]))  # (rows, V)
        lq = _log_probs(head(hidden[s:s + rows]))
        blocks.append(_block_stats(lp, lq, y[s:s + rows, None]))
        del lp, lq
    return _join(blocks)


def concat_stats(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join per-token stats of several chunks."""
    return _join(parts)


def chunk_stderrs(parts: list[dict[str, np.ndarray]]) -> dict[str, float | None]:
    """Standard errors of the mean KLD and of ln(ppl ratio) from the spread of per-chunk means.

    Tokens of one chunk share their context, so their statistics are correlated and the per-token stderr
    (llama.cpp's, above) understates the uncertainty of a mean over few chunks; chunks are independent
    texts. With equal-sized chunks the mean of chunk means is the overall mean. None for fewer than 2
    chunks.
    """
    if len(parts) < 2:
        return {"kld_stderr_chunks": None, "ln_ppl_ratio_stderr_chunks": None}
    kld = np.array([np.mean(p["kld"]) for p in parts])
    ratio = np.array([np.mean(p["nll"] - p["nll_exact"]) for p in parts])
    n = math.sqrt(len(parts))
    return {"kld_stderr_chunks": float(np.std(kld, ddof=1) / n),
            "ln_ppl_ratio_stderr_chunks": float(np.std(ratio, ddof=1) / n)}


def mean_stderr(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (llama.cpp: 0 for 10 values or fewer)."""
    n = len(x)
    if n == 0:
        return 0.0, 0.0
    mean = float(np.mean(x))
    var = float(np.mean(np.square(x))) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.mean(a * b)) - float(np.mean(a)) * float(np.mean(b))) / (n - 1)


def percentile(x: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation at ``fraction · (n − 1)`` in the sorted values."""
    if len(x) == 0:
        return 0.0
    return float(np.quantile(np.asarray(x, dtype=np.float64), min(max(fraction, 0.0), 1.0)))


def summarize_next_token(stats: dict[str, np.ndarray]) -> dict[str, float | int]:
    """llama.cpp's perplexity / KL-divergence summary of :func:`next_token_stats` (module comment above)."""
    n = len(stats["nll"])
    nll_p, se_p = mean_stderr(stats["nll_exact"])
    nll_q, se_q = mean_stderr(stats["nll"])
    cov = _covariance(stats["nll"], stats["nll_exact"])
    ln_ratio = nll_q - nll_p
    ln_ratio_se = math.sqrt(max(se_q * se_q + se_p * se_p - 2.0 * cov, 0.0))
    kld, kld_se = mean_stderr(stats["kld"])
    top, _ = mean_stderr(stats["same_top"])
    dp = stats["p"] - stats["p_exact"]
    msd, msd_se = mean_stderr(np.square(dp))
    rms = math.sqrt(msd)
    return {
        "tokens_scored": n,
        "ppl_exact": math.exp(nll_p),
        "ppl_exact_stderr": math.exp(nll_p) * se_p,
        "ppl_compressed": math.exp(nll_q),
        "ppl_compressed_stderr": math.exp(nll_q) * se_q,
        "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_stderr": ln_ratio_se,
        "delta_ppl_pct": 100.0 * math.expm1(ln_ratio),
        "delta_ppl_pct_stderr": 100.0 * math.exp(ln_ratio) * ln_ratio_se,
        "kld_mean": kld,
        "kld_stderr": kld_se,
        "kld_median": percentile(stats["kld"], 0.5),
        "kld_p90": percentile(stats["kld"], 0.9),
        "kld_p99": percentile(stats["kld"], 0.99),
        "kld_max": float(np.max(stats["kld"])) if n else 0.0,
        "top1_agreement": top,
        "top1_agreement_stderr": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        "rms_dp": rms,
        "rms_dp_stderr": 0.5 / rms * msd_se if rms > 0 else 0.0,
        "mean_dp": float(np.mean(dp)) if n else 0.0,
    }
