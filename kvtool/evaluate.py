"""End-to-end quality of codecs inside the model's cache: Δperplexity, KL divergence, top-1 agreement.

The protocol is llama.cpp's perplexity / KL-divergence one (``tools/perplexity``), with a kvtool cache:

1. The text's tokens (``add_special_tokens=True``, as ``kvtool capture`` tokenizes), cut to their first
   ``max_tokens``, are split into ``n = len // context`` non-overlapping chunks of ``context`` tokens; the
   rest is dropped. If the tokenizer adds a BOS token, every chunk starts with it (its first token is
   replaced), as llama.cpp does.
2. In each chunk, with ``first = context // 2``, the model predicts tokens ``first + 1 .. context − 1``
   from the logits at positions ``first .. context − 2`` (teacher-forced): ``context − 1 − first`` tokens
   scored per chunk.
3. ``prefill`` mode: one exact forward pass over the first ``first`` tokens (the prompt), shared by every
   method; its cache — an ordinary ``DynamicCache`` — scores the continuation exactly, and for each method
   :meth:`kvtool.cache.CodecCache.from_cache` codes a copy, which scores the same continuation. The prompt's
   last ``queries`` post-RoPE queries (recorded as ``kvtool capture`` does) go to the codecs' context.
   ``streaming`` mode: the exact pass is the same; each method's :class:`~kvtool.cache.CodecCache` in
   streaming mode takes the whole chunk as it arrives, in pieces that give what token-by-token decoding
   gives (:meth:`~kvtool.cache.CodecCache.safe_piece`).
4. Per scored token: exact vs compressed log-probabilities → the statistics of
   :func:`kvtool.metrics.summarize_next_token`, over all chunks.

Stored size: in prefill mode, what the codecs store for the prompt's cache (right after coding it); in
streaming mode, everything the cache holds after the chunk (coded blocks, shared state and the 16-bit
window of tokens not yet coded). ``cache_bytes_exact`` is the same tokens as the model holds them.

The library entry point is :func:`evaluate` (stable signature; ``sweep --eval-text`` and ``plan
--objective kld`` call it)::

    from kvtool.evaluate import evaluate, tokenize_text
    tokens = tokenize_text(loaded, "samples/gpl-3.0.txt", max_tokens=2048)
    report = evaluate(loaded, tokens, [Assignment.of("turboquant:bits=3", "turboquant:bits=3")],
                      mode="prefill", context=1024)
    report["methods"][0]["kld_mean"]
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtool import metrics
from kvtool.cache import DEFAULT_QUERIES, MODES, CodecCache, QueryRecord
from kvtool.capture import TextInput, read_text, run_and_record
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.planfile import Plan
from kvtool.compat import forward_cache_kwarg
from kvtool.errors import InputError
from kvtool.hooks import codec_attention
from kvtool.models import LoadedModel, model_shape
from kvtool.report import header, json_safe


@dataclass(frozen=True)
class Baseline:
    """Another transformers cache scored in the same run as the assignments (e.g. HF ``QuantizedCache``).

    ``make(model)`` returns a fresh cache per chunk; it takes the prompt in one forward pass (its own
    prefill) and then the continuation, like the methods in prefill mode. ``footprint(cache)``, called right
    after the prompt, returns ``{"keys"|"values": {"stored_bytes", "elements"}}`` as
    :meth:`kvtool.cache.CodecCache.footprint` does.
    """

    label: str
    make: Callable[[Any], Any]
    footprint: Callable[[Any], dict[str, dict[str, int]]]


DEFAULT_CONTEXT = 512
MIN_CONTEXT = 8
#: ``progress(done, total)`` over forward passes (exact and per method).
Progress = Callable[[int, int], None]


def tokenize_text(loaded: LoadedModel, text: str | Path, max_tokens: int | None = None) -> np.ndarray:
    """Token ids ``(T,)`` of a UTF-8 text file (or of ``text`` itself when it is not a path)."""
    if isinstance(text, Path) or (isinstance(text, str) and "\n" not in text and Path(text).is_file()):
        source = read_text(text)
    else:
        source = TextInput(source="text", text=str(text))
    ids = loaded.tokenizer(source.text, add_special_tokens=True)["input_ids"]
    if not ids:
        raise InputError(f"{source.source}: the text has no tokens")
    if max_tokens is not None:
        if max_tokens < 1:
            raise InputError(f"--max-tokens must be >= 1, got {max_tokens}")
        ids = ids[:max_tokens]
    return np.asarray(ids, dtype=np.int64)


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer adds one at the start of a text (llama.cpp's ``add_bos``), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def chunk_tokens(tokens: np.ndarray, context: int, bos: int | None = None) -> np.ndarray:
    """``(n_chunks, context)`` non-overlapping chunks of ``tokens`` (the tail that does not fill one is
    dropped); with ``bos``, each chunk's first token is replaced by it."""
    n = len(tokens) // context
    chunks = np.array(tokens[: n * context], dtype=np.int64).reshape(n, context)
    if bos is not None and n:
        chunks[:, 0] = bos
    return chunks


def check_context(loaded: LoadedModel, tokens: np.ndarray, context: int) -> None:
    """One-line errors for a context the model cannot take or a text shorter than one chunk."""
    if context < MIN_CONTEXT:
        raise InputError(f"--context must be >= {MIN_CONTEXT} tokens, got {context}")
    limit = loaded.max_context
    if limit and context > limit:
        raise InputError(f"--context {context} exceeds the model's maximum of {limit} tokens")
    if len(tokens) < context:
        raise InputError(f"the text has {len(tokens)} tokens, fewer than one chunk of --context {context}; "
                         f"lower --context or give a longer text")


def evaluate(loaded: LoadedModel, tokens: np.ndarray, assignments: Sequence[Assignment | Plan], *,
             mode: str = "prefill", context: int = DEFAULT_CONTEXT, queries: int = DEFAULT_QUERIES,
             labels: Sequence[str] | None = None, progress: Progress | None = None,
             source: str = "", baselines: Sequence[Baseline] = ()) -> dict[str, Any]:
    """Score ``tokens`` ``(T,)`` with an exact cache and with each assignment's :class:`CodecCache`.

    ``loaded``: a :class:`kvtool.models.LoadedModel`; ``assignments``: one per method (all share the exact
    pass), each an :class:`Assignment` or a :class:`kvtool.codecs.planfile.Plan` (checked against the model's
    identity and geometry); ``mode``: ``"prefill"`` or ``"streaming"``; ``context``: chunk length C (the last
    C − 1 − C/2 tokens of each chunk are scored); ``labels``: a name per method (default: its specs);
    ``baselines``: other caches scored in the same run, reported after the methods (:class:`Baseline`).
    Returns the JSON report: header fields, the protocol, ``methods`` (one dict per assignment, in order, with
    the statistics of :func:`kvtool.metrics.summarize_next_token`, ``bits_per_element``, ``cache_bytes_*``,
    ``seconds``) and, at top level, the fields of the first method.
    """
    # 1. everything that can be wrong with the input fails before any forward pass
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not assignments:
        raise InputError("give at least one method (--method, or --keys and --values)")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    check_context(loaded, tokens, context)
    methods = [_plan_assignment(loaded, a) for a in assignments]
    for a in methods:  # bad specs and non-streaming selectors
        CodecCache(loaded.model.config, a, mode=mode)
    runs: list[Assignment | Baseline] = [*methods, *baselines]
    names = list(labels) if labels is not None else [_label(a) for a in methods]
    names += [b.label for b in baselines]
    # 2. per chunk: the exact pass, then every run on the same prompt, compared token by token
    chunks = chunk_tokens(tokens, context, _bos_id(loaded.tokenizer))
    tally = _Tally.empty(len(runs), progress, total=len(chunks) * (1 + len(runs)))
    started = time.perf_counter()
    with torch.inference_mode():
        for chunk in chunks:
            _score_chunk(loaded, chunk, runs, mode, queries, tally)
    # 3. the report: one row per run, the first run's figures also at top level
    rows = [_method_row(names[m], run, tally, m, len(chunks)) for m, run in enumerate(runs)]
    model = loaded.model
    first = context // 2
    report = header("eval", model=loaded.spec, model_source=loaded.source,
                    model_architecture=loaded.architecture)
    report.update({
        "text": source, "mode": mode, "context": context, "chunks": len(chunks),
        "tokens_in_text": int(len(tokens)), "scored_per_chunk": context - 1 - first,
        "model_dtype": str(model.dtype).replace("torch.", ""), "device": str(loaded.device),
        "device_map": getattr(loaded, "device_map", None),
        **{k: v for k, v in rows[0].items() if k not in ("label", "assignment")},
        "methods": rows, "seconds_exact": tally.seconds_exact, "seconds": time.perf_counter() - started,
    })
    return json_safe(report)


@dataclass
class _Tally:
    """What the chunks add up to, per run: next-token statistics, stored bytes and elements per role, the
    exact cache's bytes, seconds; and the progress over forward passes."""

    stats: list[list[dict[str, np.ndarray]]]
    sizes: list[dict[str, np.ndarray]]  # per run, per role: [stored bytes, elements]
    exact_bytes: np.ndarray
    seconds: np.ndarray
    progress: Progress | None
    total: int
    done: int = 0
    seconds_exact: float = 0.0

    @classmethod
    def empty(cls, runs: int, progress: Progress | None, total: int) -> _Tally:
        return cls([[] for _ in range(runs)], [{"keys": np.zeros(2), "values": np.zeros(2)} for _ in range(runs)],
                   np.zeros(runs), np.zeros(runs), progress, total)

    def tick(self) -> None:
        """One forward pass done (the exact one or a run's)."""
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def add(self, m: int, stats: dict[str, np.ndarray], footprint: dict[str, dict[str, int]], dtype: Any,
            seconds: float) -> None:
        self.seconds[m] += seconds
        self.stats[m].append(stats)
        for role in ("keys", "values"):
            self.sizes[m][role] += (footprint[role]["stored_bytes"], footprint[role]["elements"])
        self.exact_bytes[m] += _exact_bytes(footprint, dtype)


def _score_chunk(loaded: LoadedModel, chunk: np.ndarray, runs: Sequence[Assignment | Baseline], mode: str,
                 queries: int, tally: _Tally) -> None:
    """One chunk ``(C,)``: the exact prompt pass and its continuation's logits, then each run's continuation
    on the same prompt, compared with the exact logits on the scored tokens."""
    model = loaded.model
    ids = torch.as_tensor(chunk, device=loaded.device)[None]  # (1, C)
    first = len(chunk) // 2
    targets = chunk[first + 1:]
    t0 = time.perf_counter()
    prefill, records = _exact_prefill(loaded, ids[:, :first], queries)
    exact_logits = _forward(model, ids[:, first:-1], copy.deepcopy(prefill))
    tally.seconds_exact += time.perf_counter() - t0
    tally.tick()
    for m, run in enumerate(runs):
        t0 = time.perf_counter()
        if isinstance(run, Baseline):
            logits, footprint = _baseline_pass(model, run, ids, first)
        else:
            logits, footprint = _method_pass(model, run, mode, ids, first, prefill, records, queries)
        stats = metrics.next_token_stats(exact_logits, logits, targets)
        tally.add(m, stats, footprint, model.dtype, time.perf_counter() - t0)
        del logits
        tally.tick()


def _method_row(label: str, run: Assignment | Baseline, tally: _Tally, m: int, chunks: int) -> dict[str, Any]:
    """One run's row of the report: the next-token statistics over all chunks, stored bits, bytes, seconds."""
    summary = metrics.summarize_next_token(metrics.concat_stats(tally.stats[m]))
    sizes = tally.sizes[m]
    stored = {role: float(sizes[role][0]) for role in ("keys", "values")}
    elements = {role: float(sizes[role][1]) for role in ("keys", "values")}
    bits = {role: 8.0 * stored[role] / elements[role] if elements[role] else 0.0 for role in stored}
    bits["total"] = 8.0 * sum(stored.values()) / max(sum(elements.values()), 1.0)
    return {
        "label": label, "assignment": run.describe() if isinstance(run, Assignment) else None,
        **summary,
        "bits_per_element": bits["total"], "bits_per_element_keys": bits["keys"],
        "bits_per_element_values": bits["values"],
        "cache_bytes_exact": tally.exact_bytes[m] / chunks,
        "cache_bytes_compressed": sum(stored.values()) / chunks,
        "seconds": float(tally.seconds[m]),
    }


def _plan_assignment(loaded: LoadedModel, a: Assignment | Plan) -> Assignment:
    """``a`` itself, or a plan's assignment once the plan is checked against the loaded model."""
    if not isinstance(a, Plan):
        return a
    a.check_model(loaded.spec, loaded.source, loaded.architecture, "the model")
    shape = model_shape(loaded.config)
    a.check_geometry({g: getattr(shape, g) for g in a.geometry}, "the model")
    return a.assignment()


def _label(a: Assignment) -> str:
    base = a.keys if a.keys == a.values else f"keys={a.keys} values={a.values}"
    return base if a.uniform else f"{base} (+{len(a.layers)} layer overrides)"


def _exact_prefill(loaded: LoadedModel, prompt: Any, queries: int) -> tuple[Any, dict[int, QueryRecord]]:
    """The prompt's exact forward pass: (its DynamicCache, the last ``queries`` queries per layer)."""
    cache, rec = run_and_record(loaded, prompt, keep_last=min(queries, int(prompt.shape[1])))
    n = int(prompt.shape[1])
    records = {}
    for layer, q in rec.queries.items():
        positions = np.arange(n - q.shape[1], n)
        records[layer] = QueryRecord(q[None].float(), positions, rec.scaling.get(layer))
    return cache, records


def _forward(model: Any, ids: Any, cache: Any, *, logits: bool = True) -> Any:
    """Feed ``ids`` ``(1, t)`` to ``model`` with ``cache``; return the logits ``(t, vocab)`` (or the last)."""
    kwargs: dict[str, Any] = {forward_cache_kwarg(model): cache, "use_cache": True}
    if not logits:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=ids, **kwargs).logits[0]


def _method_pass(model: Any, assignment: Assignment, mode: str, ids: Any, first: int, prefill: Any,
                 records: dict[int, QueryRecord], queries: int) -> tuple[Any, dict[str, dict[str, int]]]:
    """The continuation's logits ``(context − 1 − first, vocab)`` with the method's cache, and the cache's
    :meth:`~kvtool.cache.CodecCache.footprint` (prefill: the coded prompt; streaming: the whole chunk)."""
    with codec_attention(model):
        if mode == "prefill":
            cache = CodecCache.from_cache(model, assignment, prefill, queries=records)
            footprint = cache.footprint()  # the coded prompt, before the continuation is appended precise
            return _forward(model, ids[:, first:-1], cache), footprint
        cache = CodecCache(model, assignment, mode="streaming", queries=queries)
        pieces: list[Any] = []
        pos, end = 0, int(ids.shape[1]) - 1
        while pos < end:
            room = cache.safe_piece()
            stop = min(end, first if pos < first else end, pos + room if room else end)
            out = _forward(model, ids[:, pos:stop], cache, logits=stop > first)
            if stop > first:
                pieces.append(out[max(first - pos, 0):])
            pos = stop
        return torch.cat(pieces, dim=0), cache.footprint()


def _baseline_pass(model: Any, baseline: Baseline, ids: Any, first: int) -> tuple[Any, dict[str, dict[str, int]]]:
    cache = baseline.make(model)
    _forward(model, ids[:, :first], cache, logits=False)
    footprint = baseline.footprint(cache)
    return _forward(model, ids[:, first:-1], cache), footprint


def _exact_bytes(footprint: dict[str, dict[str, int]], dtype: Any) -> float:
    """The same elements as the model holds them."""
    return float(sum(fp["elements"] for fp in footprint.values()) * dtype.itemsize)
