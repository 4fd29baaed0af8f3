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
from kvtool.cache import MODES, CodecCache, QueryRecord
from kvtool.capture import TextInput, read_text, run_and_record
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.base import ROLES, most_queries
from kvtool.codecs.planfile import Plan
from kvtool.compat import forward_cache_kwarg
from kvtool.errors import InputError
from kvtool.hooks import codec_attention
from kvtool.models import LoadedModel, model_shape
from kvtool.report import header, json_safe
from kvtool.store import CacheReader


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
             source: str = "", baselines: Sequence[Baseline] = ()) -> dict[str, Any]:
    """Score ``tokens`` ``(T,)`` with an exact cache and with each assignment's :class:`CodecCache`.

    ``loaded``: a :class:`kvtool.models.LoadedModel`; ``assignments``: one per method (all share the exact
    pass), each an :class:`Assignment` or a :class:`kvtool.codecs.planfile.Plan` (checked against the model's identity
    and geometry); ``mode``: ``"prefill"`` or ``"streaming"``; ``context``: chunk length C (the last C − 1 − C/2
    tokens of each chunk are scored); ``labels``: a name per method (default: its specs); ``baselines``: other
    caches scored in the same run, reported after the methods (:class:`Baseline`). Returns the JSON
    report: header fields, the protocol, ``methods`` (one dict per assignment, in order, with the
    statistics of :func:`kvtool.metrics.summarize_next_token`, ``bits_per_element``, ``cache_bytes_*``,
    ``seconds``, and ``warnings``: what a codec reported it could not do as asked, with the number of
    layers) and, at top level, the fields of the first method. ``queries``: how many of the prompt's last
    query positions each method's codecs get in their context; by default what each asks for
    (:meth:`kvtool.codecs.base.Codec.observed_queries`: 128 for most query-based selectors, the whole
    prompt for ``expected``).
    """
    # 1. everything that can be wrong with the input fails before any forward pass
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not assignments:
        raise InputError("give at least one method (--method, or --keys and --values)")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    check_context(loaded, tokens, context)
    in_sample = [plan_overlap(a, tokens, context) for a in assignments]
    methods = [_plan_assignment(loaded, a) for a in assignments]
    for a in methods:  # bad specs and non-streaming selectors
        CodecCache(loaded.model.config, a, mode=mode)
    runs: list[Assignment | Baseline] = [*methods, *baselines]
    names = list(labels) if labels is not None else [_label(a) for a in methods]
    names += [b.label for b in baselines]
    first = context // 2
    wants = [_queries_wanted(loaded.model.config, a, first) if queries is None else queries for a in methods]
    wants += [0] * len(baselines)
    # 2. per chunk: the exact pass, then every run on the same prompt, compared token by token
    chunks = chunk_tokens(tokens, context, _bos_id(loaded.tokenizer))
    tally = _Tally.empty(len(runs), progress, total=len(chunks) * (1 + len(runs)))
    started = time.perf_counter()
    with torch.inference_mode():
        for chunk in chunks:
            _score_chunk(loaded, chunk, runs, mode, wants, tally)
    # 3. the report: one row per run, the first run's figures also at top level
    layers = model_shape(loaded.model.config).num_layers
    rows = [_method_row(names[m], run, tally, m, len(chunks), layers) for m, run in enumerate(runs)]
    for m, row in enumerate(rows):
        row["queries_observed"] = wants[m]
        overlap = in_sample[m] if m < len(in_sample) else None
        row["warnings"] += [overlap["warning"]] if overlap else []
        row["in_sample"] = overlap
    model = loaded.model
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


@dataclass
class _Tally:
    """What the chunks add up to, per run: next-token statistics, stored bytes and elements per role, the
    exact cache's bytes, seconds, the codecs' warnings (each with its layer count summed over chunks); and
    the progress over forward passes."""

    stats: list[list[dict[str, np.ndarray]]]
    sizes: list[dict[str, np.ndarray]]  # per run, per role: [stored bytes, elements]
    exact_bytes: np.ndarray
    seconds: np.ndarray
    warnings: list[dict[str, int]]
    progress: Progress | None
    total: int
    done: int = 0
    seconds_exact: float = 0.0

    @classmethod
    def empty(cls, runs: int, progress: Progress | None, total: int) -> _Tally:
        return cls([[] for _ in range(runs)], [{"keys": np.zeros(2), "values": np.zeros(2)} for _ in range(runs)],
                   np.zeros(runs), np.zeros(runs), [{} for _ in range(runs)], progress, total)

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
                 wants: Sequence[int], tally: _Tally) -> None:
    """One chunk ``(C,)``: the exact prompt pass and its continuation's logits, then each run's continuation
    on the same prompt, compared with the exact logits on the scored tokens. ``wants``: per run, how many of
    the prompt's last queries its codecs get."""
    model = loaded.model
    ids = torch.as_tensor(chunk, device=loaded.device)[None]  # (1, C)
    first = len(chunk) // 2
    targets = chunk[first + 1:]
    t0 = time.perf_counter()
    prefill, records = _exact_prefill(loaded, ids[:, :first], max(wants, default=0))
    exact_logits = _forward(model, ids[:, first:-1], copy.deepcopy(prefill))
    tally.seconds_exact += time.perf_counter() - t0
    tally.tick()
    for m, run in enumerate(runs):
        t0 = time.perf_counter()
        if isinstance(run, Baseline):
            logits, footprint = _baseline_pass(model, run, ids, first)
        else:
            logits, footprint, notes = _method_pass(model, run, mode, ids, first, prefill,
                                                    _last_queries(records, wants[m]), wants[m])
            for note, count in notes.items():
                tally.warnings[m][note] = tally.warnings[m].get(note, 0) + count
        stats = metrics.next_token_stats(exact_logits, logits, targets)
        tally.add(m, stats, footprint, model.dtype, time.perf_counter() - t0)
        del logits
        tally.tick()


def _method_row(label: str, run: Assignment | Baseline, tally: _Tally, m: int, chunks: int,
                layers: int) -> dict[str, Any]:
    """One run's row of the report: the next-token statistics over all chunks, stored bits, bytes, seconds,
    and the codecs' warnings (with how many of the model's ``layers`` each concerned)."""
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
        "warnings": [f"{note} ({count // chunks} of {layers} layers)" for note, count in tally.warnings[m].items()],
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


def _layers(config: Any) -> int:
    return model_shape(config).num_layers


def _queries_wanted(config: Any, assignment: Assignment, prompt: int) -> int:
    """The prompt's last query positions ``assignment``'s codecs ask for (all of them: ``prompt``)."""
    counts = [assignment.codec(i, role).observed_queries() for i in range(_layers(config)) for role in ROLES]
    most = most_queries(counts)
    return prompt if most is None else min(most, prompt)


def _last_queries(records: dict[int, QueryRecord], n: int) -> dict[int, QueryRecord]:
    """The last ``n`` recorded queries of each layer."""
    if not n:
        return {}
    return {i: QueryRecord(r.queries[:, :, -n:], r.positions[-n:], r.scaling) for i, r in records.items()}


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


def _exact_prefill(loaded: LoadedModel, prompt: Any, queries: int) -> tuple[Any, dict[int, QueryRecord]]:
    """The prompt's exact forward pass: (its DynamicCache, the last ``queries`` queries per layer)."""
    cache, rec = run_and_record(loaded, prompt, keep_last=min(queries, int(prompt.shape[1])))
    n = int(prompt.shape[1])
    records = {}
    for layer, q in rec.queries.items():
        positions = np.arange(n - q.shape[1], n)
        records[layer] = QueryRecord(q[None].float(), positions, rec.scaling.get(layer))
    cache.kvtool_ropes = dict(rec.rope)
    return cache, records


def _forward(model: Any, ids: Any, cache: Any, *, logits: bool = True) -> Any:
    """Feed ``ids`` ``(1, t)`` to ``model`` with ``cache``; return the logits ``(t, vocab)`` (or the last)."""
    kwargs: dict[str, Any] = {forward_cache_kwarg(model): cache, "use_cache": True}
    if not logits:
        kwargs["logits_to_keep"] = 1
    return model(input_ids=ids, **kwargs).logits[0]


def _method_pass(model: Any, assignment: Assignment, mode: str, ids: Any, first: int, prefill: Any,
                 records: dict[int, QueryRecord],
                 queries: int) -> tuple[Any, dict[str, dict[str, int]], dict[str, int]]:
    """The continuation's logits ``(context − 1 − first, vocab)`` with the method's cache, the cache's
    :meth:`~kvtool.cache.CodecCache.footprint` (prefill: the coded prompt; streaming: the whole chunk) and
    its codecs' warnings (:func:`_warnings`)."""
    with codec_attention(model):
        if mode == "prefill":
            cache = CodecCache.from_cache(model, assignment, prefill, queries=records,
                                          ropes=getattr(prefill, "kvtool_ropes", None))
            footprint = cache.footprint()  # the coded prompt, before the continuation is appended precise
            return _forward(model, ids[:, first:-1], cache), footprint, _warnings(cache)
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
        return torch.cat(pieces, dim=0), cache.footprint(), _warnings(cache)


def _baseline_pass(model: Any, baseline: Baseline, ids: Any, first: int) -> tuple[Any, dict[str, dict[str, int]]]:
    cache = baseline.make(model)
    _forward(model, ids[:, :first], cache, logits=False)
    footprint = baseline.footprint(cache)
    return _forward(model, ids[:, first:-1], cache), footprint


def _exact_bytes(footprint: dict[str, dict[str, int]], dtype: Any) -> float:
    """The same elements as the model holds them."""
    return float(sum(fp["elements"] for fp in footprint.values()) * dtype.itemsize)
