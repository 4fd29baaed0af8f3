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
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtool import metrics
from kvtool.cache import DEFAULT_QUERIES, MODES, CodecCache, QueryRecord, kvtool_attention
from kvtool.codecs.assignment import Assignment
from kvtool.compat import forward_cache_kwarg
from kvtool.errors import InputError
from kvtool.evalstate import ChunkResult, EvalState
from kvtool.models import LoadedModel
from kvtool.report import header, json_safe
from kvtool.scoring import SLICED, LogitHead, bounded_heap, forward_hidden
from kvtool.store import BaseReader, BaseWriter


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
    from kvtool.capture import TextInput, read_text

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


def evaluate(loaded: LoadedModel, tokens: np.ndarray, assignments: Sequence[Assignment], *,
             mode: str = "prefill", context: int = DEFAULT_CONTEXT, queries: int = DEFAULT_QUERIES,
             labels: Sequence[str] | None = None, progress: Progress | None = None,
             source: str = "", baselines: Sequence[Baseline] = (), base: str | Path | None = None,
             save_base: str | Path | None = None, resume: str | Path | None = None) -> dict[str, Any]:
    """Score ``tokens`` ``(T,)`` with an exact cache and with each assignment's :class:`CodecCache`.

    ``loaded``: a :class:`kvtool.models.LoadedModel`; ``assignments``: one per method (all share the exact
    pass), each an :class:`Assignment` or a :class:`kvtool.plan.Plan` (checked against the model's identity
    and geometry); ``mode``: ``"prefill"`` or ``"streaming"``; ``context``: chunk length C (the last C − 1 − C/2
    tokens of each chunk are scored); ``labels``: a name per method (default: its specs); ``baselines``: other
    caches scored in the same run, reported after the methods (:class:`Baseline`). ``save_base``: write the
    exact pass's result to this exact base file (:class:`kvtool.store.BaseWriter`); ``base``: read it from
    one instead of running the exact pass over the scored tokens (refused unless model, tokens, context and
    mode match); ``resume``: a folder keeping each finished chunk (:mod:`kvtool.evalstate`), so the same
    call continues an interrupted run. Returns the JSON report: header fields, the protocol, ``methods``
    (one dict per assignment, in order, with the statistics of :func:`kvtool.metrics.summarize_next_token`,
    ``bits_per_element``, ``cache_bytes_*``, ``seconds``) and, at top level, the fields of the first method.

    Memory follows the cache, not tokens × vocabulary: each pass keeps only the final hidden states of the
    scored positions, and the statistics apply the model's head to slices of them (:mod:`kvtool.scoring`).
    """
    import torch

    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not assignments:
        raise InputError("give at least one method (--method, or --keys and --values)")
    if base is not None and save_base is not None:
        raise InputError("give --base or --save-base, not both")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    check_context(loaded, tokens, context)
    assignments = [_plan_assignment(loaded, a) for a in assignments]
    model = loaded.model
    for a in assignments:  # bad specs and non-streaming selectors fail before any forward pass
        CodecCache(model.config, a, mode=mode)
    labels = list(labels) if labels is not None else [_label(a) for a in assignments]
    labels += [b.label for b in baselines]
    runs: list[Any] = [*assignments, *baselines]
    chunks = chunk_tokens(tokens, context, _bos_id(loaded.tokenizer))
    started = time.perf_counter()
    bounded_heap()  # memory that follows the cache needs a heap that gives large blocks back
    head = LogitHead.for_model(model, torch.as_tensor(chunks[0][:MIN_CONTEXT], device=loaded.device)[None])
    identity = base_identity(loaded, chunks, context, mode, head)
    with torch.inference_mode():
        results = _score_chunks(loaded, head, runs, chunks, mode=mode, queries=queries, progress=progress,
                                base=_open_base(base, identity) if base is not None else None,
                                save_base=BaseWriter(save_base, identity) if save_base is not None else None,
                                state=_open_state(resume, identity, runs, labels, queries, save_base)
                                if resume is not None else None)
    report = header("eval", model=loaded.spec, model_source=loaded.source,
                    model_architecture=loaded.architecture)
    methods = _method_reports(runs, labels, results, model.dtype)
    report.update({
        "text": source, "mode": mode, "context": context, "chunks": len(chunks),
        "tokens_in_text": int(len(tokens)), "scored_per_chunk": context - 1 - context // 2,
        "model_dtype": str(model.dtype).replace("torch.", ""), "device": str(loaded.device),
        "device_map": getattr(loaded, "device_map", None), "scoring": head.form,
        "base": str(base) if base is not None else None,
        **{k: v for k, v in methods[0].items() if k not in ("label", "assignment")},
        "methods": methods, "seconds_exact": float(sum(r.seconds_exact for r in results)),
        "seconds": time.perf_counter() - started,
    })
    return json_safe(report)


def base_identity(loaded: LoadedModel, chunks: np.ndarray, context: int, mode: str, head: LogitHead
                  ) -> dict[str, Any]:
    """What an exact base is tied to (:data:`kvtool.store.BASE_IDENTITY`): model, tokens, context, mode."""
    return {"model": loaded.spec, "model_architecture": loaded.architecture or "",
            "model_source": loaded.source or "", "mode": mode, "context": int(context),
            "prompt_tokens": int(context // 2), "num_chunks": int(len(chunks)),
            "tokens_sha256": hashlib.sha256(np.ascontiguousarray(chunks, dtype=np.int64).tobytes()).hexdigest(),
            "stored": "hidden" if head.form == SLICED else "logits",
            "width": _head_width(loaded.model, head)}


def _head_width(model: Any, head: LogitHead) -> int:
    if head.form != SLICED:
        return head.vocab
    weight = getattr(head.module, "weight", None)
    return int(weight.shape[1]) if weight is not None else int(model.config.hidden_size)


def _open_base(path: str | Path, identity: dict[str, Any]) -> BaseReader:
    """The exact base at ``path``, refused in one line (InputError) unless it was made for this run."""
    reader = BaseReader(path)
    try:
        check_base_identity(reader.identity, identity, str(path))
    except BaseException:
        reader.close()
        raise
    return reader


#: What differs, in the words of the refusal, for each identity attribute (model fields compared as one).
_IDENTITY_WORDS = {"mode": "mode", "context": "context", "prompt_tokens": "context", "num_chunks": "tokens",
                   "tokens_sha256": "tokens", "stored": "model", "width": "model"}


def check_base_identity(stored: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """InputError naming the first of model, tokens, context, mode that differs between two identities."""
    model = ("model_architecture", "model_source") if current["model_source"] else (
        "model", "model_architecture")
    if any(stored[k] != current[k] for k in model):
        raise InputError(f"{where}: the base was computed with model {stored['model']!r} "
                         f"({stored['model_architecture']}, {stored['model_source'] or 'no digest'}), not "
                         f"{current['model']!r}; compute a base for this model with --save-base")
    for key in ("context", "mode", "num_chunks", "tokens_sha256", "stored", "width"):
        if stored[key] != current[key]:
            word = _IDENTITY_WORDS[key]
            shown = "" if word in ("tokens", "model") else f" ({stored[key]}, this run {current[key]})"
            raise InputError(f"{where}: the base was computed for other {word}{shown}; use the --text, "
                             "--max-tokens, --context and --mode it was made with, or --save-base a new one")


def _open_state(folder: str | Path, identity: dict[str, Any], runs: Sequence[Any], labels: Sequence[str],
                queries: int, save_base: Any) -> EvalState:
    methods = [r.describe() if isinstance(r, Assignment) else {"baseline": r.label} for r in runs]
    return EvalState(folder, {**identity, "queries": int(queries), "labels": list(labels), "methods": methods,
                              "save_base": save_base is not None})


def _score_chunks(loaded: LoadedModel, head: LogitHead, runs: Sequence[Any], chunks: np.ndarray, *, mode: str,
                  queries: int, progress: Progress | None, base: BaseReader | None, save_base: BaseWriter | None,
                  state: EvalState | None) -> list[ChunkResult]:
    """Every chunk's :class:`ChunkResult`: from ``state`` when an earlier run finished it, else scored (its
    exact side from ``base`` when given); each exact result also goes to ``save_base``."""
    total_passes = len(chunks) * (1 + len(runs))
    results: list[ChunkResult] = []
    try:
        for c, chunk in enumerate(chunks):
            done = state.load(c) if state is not None else None
            if done is not None:
                result, exact = done
            else:
                given = _as_tensor(base.chunk(c)[1], loaded.device) if base is not None else None
                result, exact = score_chunk(loaded, head, runs, chunk, mode=mode, queries=queries, exact=given,
                                            progress=None if progress is None else
                                            _offset(progress, c * (1 + len(runs)), total_passes))
                if state is not None:
                    state.save(c, result, _host(exact) if save_base is not None else None)
            if save_base is not None:
                save_base.add_chunk(chunk, _host(exact))
            results.append(result)
            if progress is not None:
                progress((c + 1) * (1 + len(runs)), total_passes)
        if save_base is not None:
            save_base.commit()
    except BaseException:
        if save_base is not None:
            save_base.abort()
        raise
    finally:
        if base is not None:
            base.close()
    return results


def _offset(progress: Progress, before: int, total: int) -> Progress:
    return lambda done, _total: progress(before + done, total)


def _as_tensor(x: np.ndarray, device: Any) -> Any:
    import torch

    return torch.as_tensor(x, device=device)


def _host(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    return x.detach().to("cpu").float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


def score_chunk(loaded: LoadedModel, head: LogitHead, runs: Sequence[Any], chunk: np.ndarray, *, mode: str,
                queries: int, exact: Any = None, progress: Progress | None = None) -> tuple[ChunkResult, Any]:
    """One chunk ``(C,)``: the exact pass (skipped when ``exact``, what the head reads at the scored
    positions, is given) and each run's pass; returns the chunk's figures and the exact side ``(scored, d)``.

    The prompt's exact pass still runs with ``exact`` in prefill mode: the codecs code its cache.
    """
    import torch

    model = loaded.model
    first = len(chunk) // 2
    ids = torch.as_tensor(chunk, device=loaded.device)[None]  # (1, C)
    targets = chunk[first + 1:]
    t0 = time.perf_counter()
    needs_prefill = exact is None or (mode == "prefill" and any(isinstance(r, Assignment) for r in runs))
    prefill, records = _exact_prefill(loaded, ids[:, :first], queries) if needs_prefill else (None, {})
    if exact is None:
        exact = forward_hidden(model, ids[:, first:-1], copy.deepcopy(prefill), head, pieces=True)  # (scored, d)
    seconds_exact = time.perf_counter() - t0
    if progress is not None:
        progress(1, 0)
    n = len(runs)
    result = ChunkResult([], np.zeros((n, 2, 2)), np.zeros(n), np.zeros(n), seconds_exact)
    for m, run in enumerate(runs):
        t0 = time.perf_counter()
        if isinstance(run, Baseline):
            hidden, fp = _baseline_pass(model, run, ids, first, head)
        else:
            hidden, fp = _method_pass(model, run, mode, ids, first, prefill, records, queries, head)
        result.stats.append(metrics.sliced_next_token_stats(exact, hidden, targets, head, head.rows))
        result.seconds[m] = time.perf_counter() - t0
        for r, role in enumerate(("keys", "values")):
            result.sizes[m, r] = (fp[role]["stored_bytes"], fp[role]["elements"])
        result.exact_bytes[m] = _exact_bytes(fp, model.dtype)
        del hidden
        if progress is not None:
            progress(2 + m, 0)
    return result, exact


def _method_reports(runs: Sequence[Any], labels: Sequence[str], results: Sequence[ChunkResult], dtype: Any
                    ) -> list[dict[str, Any]]:
    """One report dict per run: the statistics over all chunks' tokens, bits, bytes and seconds."""
    n_chunks = len(results)
    methods = []
    for m, run in enumerate(runs):
        summary = metrics.summarize_next_token(metrics.concat_stats([r.stats[m] for r in results]))
        summary.update(metrics.chunk_stderrs([r.stats[m] for r in results]))
        sizes = sum(r.sizes[m] for r in results)  # (2 roles, [stored bytes, elements])
        stored = {role: float(sizes[i][0]) for i, role in enumerate(("keys", "values"))}
        elements = {role: float(sizes[i][1]) for i, role in enumerate(("keys", "values"))}
        bits = {role: 8.0 * stored[role] / elements[role] if elements[role] else 0.0 for role in stored}
        bits["total"] = 8.0 * sum(stored.values()) / max(sum(elements.values()), 1.0)
        methods.append({
            "label": labels[m], "assignment": run.describe() if isinstance(run, Assignment) else None,
            **summary,
            "bits_per_element": bits["total"], "bits_per_element_keys": bits["keys"],
            "bits_per_element_values": bits["values"],
            "cache_bytes_exact": float(sum(r.exact_bytes[m] for r in results)) / n_chunks,
            "cache_bytes_compressed": sum(stored.values()) / n_chunks,
            "seconds": float(sum(r.seconds[m] for r in results)),
        })
    return methods


def _plan_assignment(loaded: LoadedModel, a: Any) -> Assignment:
    """``a`` itself, or a plan's assignment once the plan is checked against the loaded model."""
    from kvtool.capture import model_shape
    from kvtool.plan import Plan

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
    from kvtool.capture import run_and_record

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
                 records: dict[int, QueryRecord], queries: int, head: LogitHead
                 ) -> tuple[Any, dict[str, dict[str, int]]]:
    """What the head reads at the continuation's positions ``(context − 1 − first, d)`` with the method's
    cache, and the cache's :meth:`~kvtool.cache.CodecCache.footprint` (prefill: the coded prompt;
    streaming: the whole chunk)."""
    import torch

    with kvtool_attention(model):
        if mode == "prefill":
            cache = CodecCache.from_cache(model, assignment, prefill, queries=records)
            footprint = cache.footprint()  # the coded prompt, before the continuation is appended precise
            return forward_hidden(model, ids[:, first:-1], cache, head, pieces=True), footprint
        cache = CodecCache(model, assignment, mode="streaming", queries=queries)
        pieces: list[Any] = []
        pos, end = 0, int(ids.shape[1]) - 1
        while pos < end:
            room = cache.safe_piece()
            stop = min(end, first if pos < first else end, pos + room if room else end)
            if stop > first:
                pieces.append(forward_hidden(model, ids[:, pos:stop], cache, head)[max(first - pos, 0):])
            else:
                _forward(model, ids[:, pos:stop], cache, logits=False)
            pos = stop
        return torch.cat(pieces, dim=0), cache.footprint()


def _baseline_pass(model: Any, baseline: Baseline, ids: Any, first: int, head: LogitHead
                   ) -> tuple[Any, dict[str, dict[str, int]]]:
    cache = baseline.make(model)
    _forward(model, ids[:, :first], cache, logits=False)
    footprint = baseline.footprint(cache)
    return forward_hidden(model, ids[:, first:-1], cache, head), footprint


def _exact_bytes(footprint: dict[str, dict[str, int]], dtype: Any) -> float:
    """The same elements as the model holds them."""
    return float(sum(fp["elements"] for fp in footprint.values()) * dtype.itemsize)
