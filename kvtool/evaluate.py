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
   :meth:`kvtool.cache.CodecCache.from_cache` codes a fresh copy read back from :class:`PromptCache` (never
   two in memory), which scores the same continuation. The prompt's
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

import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvtool import metrics, scoring
from kvtool.cache import MODES, CodecCache, QueryRecord, holds_compact
from kvtool.capture import TextInput, read_text, run_and_record
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.base import ROLES, latest_sink, most_queries
from kvtool.codecs.moments import MomentRecorder
from kvtool.codecs.planfile import Plan
from kvtool.compat import forward_cache_kwarg, grouped_sdpa
from kvtool.errors import InputError
from kvtool.evalstate import ChunkResult, EvalState
from kvtool.hooks import codec_attention
from kvtool.models import LoadedModel, model_shape
from kvtool.reconstruct import passes, reconstruction_scores
from kvtool.report import header, json_safe
from kvtool.rope import rope_candidates
from kvtool.scoring import SLICED, LogitHead, bounded_heap, forward_hidden
from kvtool.store import BaseReader, BaseWriter, CacheReader


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
             mode: str = "prefill", context: int = DEFAULT_CONTEXT, queries: int | None = None,
             labels: Sequence[str] | None = None, progress: Progress | None = None,
             source: str = "", baselines: Sequence[Baseline] = (), base: str | Path | None = None,
             save_base: str | Path | None = None, resume: str | Path | None = None) -> dict[str, Any]:
    """Score ``tokens`` ``(T,)`` with an exact cache and with each assignment's :class:`CodecCache`.

    ``loaded``: a :class:`kvtool.models.LoadedModel`; ``assignments``: one per method (all share the exact
    pass), each an :class:`Assignment` or a :class:`kvtool.codecs.planfile.Plan` (checked against the model's
    identity and geometry); ``mode``: ``"prefill"`` or ``"streaming"``; ``context``: chunk length C (the last C
    − 1 − C/2 tokens of each chunk are scored); ``labels``: a name per method (default: its specs);
    ``baselines``: other caches scored in the same run, reported after the methods (:class:`Baseline`).
    ``save_base``: write the exact pass's result to this exact base file (:class:`kvtool.store.BaseWriter`);
    ``base``: read it from one instead of running the exact pass over the scored tokens (refused unless model,
    tokens, context and mode match); ``resume``: a folder keeping each finished chunk (:mod:`kvtool.evalstate`),
    so the same call continues an interrupted run. Returns the JSON report: header fields, the protocol,
    ``methods`` (one dict per assignment, in order, with the statistics of
    :func:`kvtool.metrics.summarize_next_token`, ``bits_per_element``, ``cache_bytes_*``, ``seconds``,
    ``warnings``: what a codec reported it could not do as asked, and ``in_sample`` for a plan whose capture
    held the scored tokens) and, at top level, the fields of the first method. ``queries``: how many of the
    prompt's last query positions each method's codecs get; by default what each asks for
    (:meth:`kvtool.codecs.base.Codec.observed_queries`: 128 for most query-based selectors), and for ``expected``
    the moments of all the prompt's queries, streamed during the exact prefill
    (:meth:`~kvtool.codecs.base.Codec.query_moments`, :mod:`kvtool.codecs.moments`); with ``queries`` given, the
    codecs get that many queries and no moments. Codecs that read the scores of a reconstruction pass
    (``kvzip``, :meth:`~kvtool.codecs.base.Codec.reads_reconstruction`) get them from one such pass per chunk
    (:mod:`kvtool.reconstruct`), run from copies of the prompt's exact cache.

    Memory follows the cache, not tokens × vocabulary: each pass keeps only the final hidden states of the
    scored positions, and the statistics apply the model's head to slices of them (:mod:`kvtool.scoring`).
    """
    # 1. everything that can be wrong with the input fails before any forward pass
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not assignments:
        raise InputError("give at least one method (--method, or --keys and --values)")
    if base is not None and save_base is not None:
        raise InputError("give --base or --save-base, not both")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    check_context(loaded, tokens, context)
    in_sample = [plan_overlap(a, tokens, context) for a in assignments]
    assignments = [plan_assignment(loaded, a) for a in assignments]
    model = loaded.model
    for a in assignments:  # bad specs and non-streaming selectors
        CodecCache(model.config, a, mode=mode)
    labels = list(labels) if labels is not None else [method_label(a) for a in assignments]
    labels += [b.label for b in baselines]
    runs: list[Any] = [*assignments, *baselines]
    wants = [_queries_wanted(model.config, a, context // 2) if queries is None else queries for a in assignments]
    wants += [0] * len(baselines)
    sinks = [_moments_wanted(model.config, a) if queries is None else None for a in assignments]
    rebuilds = [reconstruction_wanted(model.config, a) for a in assignments] + [False] * len(baselines)
    chunks = chunk_tokens(tokens, context, _bos_id(loaded.tokenizer))
    # 2. per chunk: the exact pass (or the base), then every run on the same prompt
    started = time.perf_counter()
    bounded_heap()  # memory that follows the cache needs a heap that gives large blocks back
    head = LogitHead.for_model(model, torch.as_tensor(chunks[0][:MIN_CONTEXT], device=loaded.device)[None])
    identity = base_identity(loaded, chunks, context, mode, head)
    with torch.inference_mode(), grouped_sdpa(loaded.device):  # every pass: exact, methods, baselines
        results = _score_chunks(loaded, head, runs, chunks, mode=mode, wants=wants, sink=latest_sink(sinks),
                                rebuilds=rebuilds, progress=progress,
                                base=_open_base(base, identity) if base is not None else None,
                                save_base=BaseWriter(save_base, identity) if save_base is not None else None,
                                state=_open_state(resume, identity, runs, labels, wants, save_base)
                                if resume is not None else None)
    report = header("eval", model=loaded.spec, model_source=loaded.source,
                    model_architecture=loaded.architecture)
    # 3. the report: one row per run, the first run's figures also at top level
    methods = _method_reports(runs, labels, results, model.dtype, model_shape(model.config).num_layers)
    for m, row in enumerate(methods):
        # the codecs that read moments saw every query of the prompt, through them
        row["queries_observed"] = context // 2 if m < len(sinks) and sinks[m] is not None else wants[m]
        overlap = in_sample[m] if m < len(in_sample) else None
        row["warnings"] += [overlap["warning"]] if overlap else []
        row["in_sample"] = overlap
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
                wants: Sequence[int], save_base: Any) -> EvalState:
    methods = [r.describe() if isinstance(r, Assignment) else {"baseline": r.label} for r in runs]
    return EvalState(folder, {**identity, "queries": [int(w) for w in wants], "labels": list(labels),
                              "methods": methods,
                              "save_base": save_base is not None})


def _score_chunks(loaded: LoadedModel, head: LogitHead, runs: Sequence[Any], chunks: np.ndarray, *, mode: str,
                  wants: Sequence[int], sink: int | None, rebuilds: Sequence[bool], progress: Progress | None,
                  base: BaseReader | None,
                  save_base: BaseWriter | None,
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
                result, exact = score_chunk(loaded, head, runs, chunk, mode=mode, wants=wants, sink=sink, exact=given,
                                            rebuilds=rebuilds,
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
    return torch.as_tensor(x, device=device)


def _host(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    return x.detach().to("cpu").float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


def score_chunk(loaded: LoadedModel, head: LogitHead, runs: Sequence[Any], chunk: np.ndarray, *, mode: str,
                wants: Sequence[int], sink: int | None = None, exact: Any = None,
                rebuilds: Sequence[bool] | None = None, progress: Progress | None = None) -> tuple[ChunkResult, Any]:
    """One chunk ``(C,)``: the exact pass (skipped when ``exact``, what the head reads at the scored
    positions, is given) and each run's pass; returns the chunk's figures and the exact side ``(scored, d)``.
    ``wants``: per run, how many of the prompt's last queries its codecs get; ``sink``: stream the moments of
    the prompt's queries from that position on for the codecs that read them (:func:`exact_prefill`); ``rebuilds``:
    per run, whether its codecs read the scores of the prompt's reconstruction pass (:mod:`kvtool.reconstruct`,
    run once for all of them; its time is counted in each such run's seconds).

    The prompt's exact pass still runs with ``exact`` in prefill mode: the codecs code its cache.
    """
    model = loaded.model
    first = len(chunk) // 2
    ids = torch.as_tensor(chunk, device=loaded.device)[None]  # (1, C)
    targets = chunk[first + 1:]
    t0 = time.perf_counter()
    coded = sum(isinstance(r, Assignment) for r in runs) if mode == "prefill" else 0
    rebuild = mode == "prefill" and any(rebuilds or ())
    n_rebuild = passes(loaded.tokenizer, chunk[:first]) if rebuild else 0
    uses = (exact is None) + coded + n_rebuild  # how many passes start from the prompt's exact cache
    prompt, records = PromptCache(None, 0), {}
    if uses:
        cache, records = exact_prefill(loaded, ids[:, :first], max(wants, default=0), moments=sink)
        prompt = PromptCache(cache, uses)
        del cache  # the PromptCache's now: a reference here would keep the prompt's cache for the whole chunk
    rebuilt, seconds_rebuild = None, 0.0
    if rebuild:
        t1 = time.perf_counter()
        rebuilt = reconstruction_scores(model, loaded.tokenizer, prompt.take, chunk[:first], _layers(model.config),
                                        loaded.device)
        seconds_rebuild = time.perf_counter() - t1
    if exact is None:
        exact = forward_hidden(model, ids[:, first:-1], prompt.take(), head, pieces=True)  # (scored, d)
    seconds_exact = time.perf_counter() - t0 - seconds_rebuild  # the reconstruction is the methods' time
    if progress is not None:
        progress(1, 0)
    n = len(runs)
    result = ChunkResult([], np.zeros((n, 2, 2)), np.zeros(n), np.zeros(n), seconds_exact)
    for m, run in enumerate(runs):
        t0 = time.perf_counter()
        if isinstance(run, Baseline):
            hidden, fp = _baseline_pass(model, run, ids, first, head)
            result.warnings.append({})
        else:
            hidden, fp, notes = _method_pass(model, run, mode, ids, first, prompt,
                                             _last_queries(records, wants[m]), wants[m], head, rebuilt)
            result.warnings.append(notes)
        result.stats.append(metrics.sliced_next_token_stats(exact, hidden, targets, head, head.rows))
        result.seconds[m] = time.perf_counter() - t0 + (seconds_rebuild if rebuilds and rebuilds[m] else 0.0)
        for r, role in enumerate(("keys", "values")):
            result.sizes[m, r] = (fp[role]["stored_bytes"], fp[role]["elements"])
        result.exact_bytes[m] = _exact_bytes(fp, model.dtype)
        del hidden
        if progress is not None:
            progress(2 + m, 0)
    return result, exact


def _method_reports(runs: Sequence[Any], labels: Sequence[str], results: Sequence[ChunkResult], dtype: Any,
                    layers: int) -> list[dict[str, Any]]:
    """One report dict per run: the statistics over all chunks' tokens, bits, bytes and seconds, and the
    codecs' warnings (with the most of the model's ``layers`` one concerned in a chunk scored in this run)."""
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
            "warnings": _merged_warnings([r.warnings[m] for r in results if len(r.warnings) > m], layers),
        })
    return methods


#: Scored tokens count as seen in a capture when the window of this many tokens ending at them occurs in it.
OVERLAP_WINDOW = 16


def plan_overlap(plan: Any, tokens: np.ndarray, context: int) -> dict[str, Any] | None:
    """For a :class:`kvtool.codecs.planfile.Plan`: which share of the tokens eval scores were in the capture the plan
    was measured on (``plan.source``), so its figures are in-sample; None for anything else or no overlap.

    A scored token counts as seen when the :data:`OVERLAP_WINDOW` tokens ending at it occur, in order, in
    the capture's tokens. When the capture file is gone the check is impossible, and said so.
    """
    if not isinstance(plan, Plan) or not plan.source:
        return None
    if not Path(plan.source).is_file():
        return {"capture": plan.source, "checked": False, "scored_in_capture": None,
                "warning": f"the plan's capture {plan.source} is not here, so whether the scored tokens were "
                           "part of it (in-sample figures) was not checked"}
    seen: set[bytes] = set()
    with CacheReader(plan.source) as reader:
        for j in range(len(reader.info.sequences)):
            t = np.asarray(reader.tokens(j), dtype=np.int64)
            seen.update(t[i:i + OVERLAP_WINDOW].tobytes() for i in range(len(t) - OVERLAP_WINDOW + 1))
    first = context // 2
    hits = total = 0
    for chunk in chunk_tokens(tokens, context):  # the text's own tokens (BOS replacement aside)
        for end in range(first + 1, context):
            total += 1
            if end + 1 >= OVERLAP_WINDOW and chunk[end + 1 - OVERLAP_WINDOW:end + 1].tobytes() in seen:
                hits += 1
    if not hits:
        return None
    share = hits / max(total, 1)
    return {"capture": plan.source, "checked": True, "scored_in_capture": share,
            "warning": f"{100 * share:.0f} % of the scored tokens were in the capture the plan was measured on "
                       f"({plan.source}): its figures are in-sample; score held-out text"}


def plan_assignment(loaded: LoadedModel, a: Assignment | Plan) -> Assignment:
    """``a`` itself, or a plan's assignment once the plan is checked against the loaded model."""
    if not isinstance(a, Plan):
        return a
    a.check_model(loaded.spec, loaded.source, loaded.architecture, "the model")
    shape = model_shape(loaded.config)
    a.check_geometry({g: getattr(shape, g) for g in a.geometry}, "the model")
    return a.assignment()


def method_label(a: Assignment) -> str:
    base = a.keys if a.keys == a.values else f"keys={a.keys} values={a.values}"
    return base if a.uniform else f"{base} (+{len(a.layers)} layer overrides)"


def _layers(config: Any) -> int:
    return model_shape(config).num_layers


def _queries_wanted(config: Any, assignment: Assignment, prompt: int) -> int:
    """The prompt's last query positions ``assignment``'s codecs ask for (all of them: ``prompt``)."""
    counts = [assignment.codec(i, role).observed_queries() for i in range(_layers(config)) for role in ROLES]
    most = most_queries(counts)
    return prompt if most is None else min(most, prompt)


def _moments_wanted(config: Any, assignment: Assignment) -> int | None:
    """From which position ``assignment``'s codecs read the moments of the prompt's queries (None: none do)."""
    return latest_sink(assignment.codec(i, role).query_moments() for i in range(_layers(config)) for role in ROLES)


def reconstruction_wanted(config: Any, assignment: Assignment) -> bool:
    """Whether ``assignment``'s codecs read the scores of the prompt's reconstruction pass."""
    return any(assignment.codec(i, role).reads_reconstruction() for i in range(_layers(config)) for role in ROLES)


def _last_queries(records: dict[int, QueryRecord], n: int) -> dict[int, QueryRecord]:
    """The last ``n`` recorded queries of each layer (and the moments, where streamed)."""
    if not n:
        return {}
    return {i: QueryRecord(r.queries[:, :, -n:], r.positions[-n:], r.scaling, r.moments) for i, r in records.items()}


def _warnings(cache: CodecCache) -> dict[str, int]:
    """The distinct ``warning`` entries of the codecs' reports on the coded blocks, each with its number of
    layers (a codec reports one when it could not do what its spec asked, e.g. find the layer's RoPE)."""
    found: dict[str, set[int]] = {}
    for layer in cache.layers:
        for track in layer.tracks.values():
            for segment in track.segments:
                for enc in segment.rows:
                    for key, value in track.codec.report(enc).items():
                        if key.split(".")[-1] == "warning":
                            found.setdefault(str(value), set()).add(layer.index)
    return {note: len(layers) for note, layers in found.items()}


def _merged_warnings(chunks: Sequence[dict[str, int]], layers: int) -> list[str]:
    """Each distinct warning of the chunks' codecs with the most layers it concerned in one chunk."""
    most: dict[str, int] = {}
    for notes in chunks:
        for note, count in notes.items():
            most[note] = max(most.get(note, 0), count)
    return [f"{note} ({count} of {layers} layers)" for note, count in most.items()]


def exact_prefill(loaded: LoadedModel, prompt: Any, queries: int, moments: int | None = None
                  ) -> tuple[Any, dict[int, QueryRecord]]:
    """The prompt's exact forward pass: (its DynamicCache, the last ``queries`` queries per layer); the
    RoPE each layer used is kept on the cache as ``kvtool_ropes`` for the codecs' context. ``moments``: also
    stream the moments of all the prompt's queries, kept as they are below that position
    (:class:`kvtool.codecs.moments.MomentRecorder`, under every RoPE the model holds: which one a layer uses is
    known only after the pass), into each record's ``moments``."""
    streamed = MomentRecorder(rope_candidates(loaded.model), moments) if moments is not None else None
    cache, rec = run_and_record(loaded, prompt, keep_last=min(queries, int(prompt.shape[1])),
                                piece=scoring.PIECE, hook=streamed)
    n = int(prompt.shape[1])
    records = {}
    for layer, q in rec.queries.items():
        positions = np.arange(n - q.shape[1], n)
        records[layer] = QueryRecord(q[None].float(), positions, rec.scaling.get(layer),
                                     streamed.moments.get(layer) if streamed is not None else None)
    cache.kvtool_ropes = dict(rec.rope)
    return cache, records


class PromptCache:
    """The prompt's exact cache, handed in turn to each pass that starts from it (the exact pass over the
    scored tokens, each prefill-mode method), so that only one copy of it is ever in memory.

    A pass extends or codes the cache it is given, so each needs its own. Rather than keep the original
    beside the copy a pass works on (and the copy's growth), a cache with several users is written once
    to a temporary file and dropped; each :meth:`take` reads a fresh copy back. A single user gets the
    cache itself. The file (the cache's size: 180 MiB for SmolLM2's 4,096-token prompt) is removed after
    the last user, or when the chunk ends.
    """

    def __init__(self, cache: Any, uses: int) -> None:
        self.ropes = getattr(cache, "kvtool_ropes", None)
        self._left = uses
        self._cache: Any = cache
        self._spill: Any = None
        if uses > 1:
            self._spill = tempfile.TemporaryFile(prefix="kvtool-prompt-")
            torch.save(cache, self._spill)
            self._cache = None

    def take(self) -> Any:
        """A cache holding the prompt, the caller's to extend or code."""
        if self._left <= 0:
            raise RuntimeError("the prompt cache was taken more times than announced")
        self._left -= 1
        if self._spill is None:
            cache, self._cache = self._cache, None
            return cache
        self._spill.seek(0)
        cache = torch.load(self._spill, weights_only=False)
        if not self._left:
            self._spill.close()
            self._spill = None
        return cache

    def __del__(self) -> None:
        if self._spill is not None:
            self._spill.close()


def forward_logits(model: Any, ids: Any, cache: Any, *, logits: bool = True) -> Any:
    """Feed ``ids`` ``(1, t)`` to ``model`` with ``cache``; return the logits ``(t, vocab)`` (or the last)."""
    kwargs: dict[str, Any] = {forward_cache_kwarg(model): cache, "use_cache": True}
    if not logits:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=ids, **kwargs).logits[0]


def _method_pass(model: Any, assignment: Assignment, mode: str, ids: Any, first: int, prompt: PromptCache,
                 records: dict[int, QueryRecord], queries: int, head: LogitHead,
                 rebuilt: dict[int, np.ndarray] | None = None
                 ) -> tuple[Any, dict[str, dict[str, int]], dict[str, int]]:
    """What the head reads at the continuation's positions ``(context − 1 − first, d)`` with the method's
    cache, the cache's :meth:`~kvtool.cache.CodecCache.footprint` (prefill: the coded prompt; streaming:
    the whole chunk) and its codecs' warnings (:func:`_warnings`). ``rebuilt``: per layer, the reconstruction
    scores for the codecs that read them."""
    with codec_attention(model):
        if mode == "prefill":
            # compact: the coded prompt held as its codes, each layer decoded only while its attention runs
            # (the model sees the same keys and values as with the decoded copy: tests/test_compact_cache.py)
            compact = holds_compact(assignment, model_shape(model.config).num_layers)
            cache = CodecCache.from_cache(model, assignment, prompt.take(), queries=records, ropes=prompt.ropes,
                                          compact=compact, reconstruction=rebuilt)
            footprint = cache.footprint()  # the coded prompt, before the continuation is appended precise
            return (forward_hidden(model, ids[:, first:-1], cache, head, pieces=True), footprint,
                    _warnings(cache))
        cache = CodecCache(model, assignment, mode="streaming", queries=queries)
        pieces: list[Any] = []
        pos, end = 0, int(ids.shape[1]) - 1
        while pos < end:
            room = cache.safe_piece()
            stop = min(end, first if pos < first else end, pos + room if room else end)
            if stop > first:
                pieces.append(forward_hidden(model, ids[:, pos:stop], cache, head)[max(first - pos, 0):])
            else:
                forward_logits(model, ids[:, pos:stop], cache, logits=False)
            pos = stop
        return torch.cat(pieces, dim=0), cache.footprint(), _warnings(cache)


def _baseline_pass(model: Any, baseline: Baseline, ids: Any, first: int, head: LogitHead
                   ) -> tuple[Any, dict[str, dict[str, int]]]:
    cache = baseline.make(model)
    forward_logits(model, ids[:, :first], cache, logits=False)
    footprint = baseline.footprint(cache)
    return forward_hidden(model, ids[:, first:-1], cache, head), footprint


def _exact_bytes(footprint: dict[str, dict[str, int]], dtype: Any) -> float:
    """The same elements as the model holds them."""
    return float(sum(fp["elements"] for fp in footprint.values()) * dtype.itemsize)
