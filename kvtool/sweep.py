"""Many codec specs over one cache in one pass: stored bits against error, and the Pareto frontier.

:func:`sweep` reads each layer once, computes its exact attention once
(:func:`kvtool.metrics.reference_attention`) and measures every spec against it with the very functions
:func:`kvtool.compress.compress` uses (:mod:`kvtool.measure`), so a spec's figures here are the figures
``compress --method SPEC`` reports. Each spec codes keys and values (KIVI picks its axis per role, as with
``--method``). When a spec fits on queries (token selectors), every spec is scored on the same held-out
queries: the split is compress's default ``--observe`` and the report's ``query_split`` records it.

Bits: ``stored_bits`` counts every byte written for a tensor — the codec's arrays *and* its shared state
(outlier tables, bases, codebooks) — over the elements (compress's ``bits_per_element_with_state``);
``bits_per_element`` (arrays only) is kept beside it. The frontier is drawn on ``stored_bits`` against the
attention-output error (mean over layers; the keys/values relative MSE when the cache holds no queries).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtool import metrics
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.presets import expand
from kvtool.errors import CodecError, InputError
from kvtool.evaluate import check_context, evaluate, tokenize_text
from kvtool.measure import encode_tensor, layer_context, layer_report, query_split, reference_for, split_queries, totals
from kvtool.models import load_model
from kvtool.report import json_safe, store_header
from kvtool.store import KIND_CACHE, CacheReader
from kvtool.util import atomic_write

Progress = Callable[[int, int], None]
ATTENTION_ERROR = "attention_output_rel_error"
RECONSTRUCTION_ERROR = "rel_mse"
#: the eval statistics a sweep keeps per spec (kvtool.metrics.summarize_next_token)
#: ``bits_per_element`` there is what the codec stored inside the model (the eval's prompts, which may be
#: shorter than the capture: a learned codebook or a mean is amortised over fewer tokens there).
EVAL_KEYS = ("kld_mean", "kld_stderr", "delta_ppl_pct", "delta_ppl_pct_stderr", "top1_agreement", "ppl_exact",
             "ppl_compressed", "tokens_scored", "bits_per_element")


@dataclass
class EvalText:
    """What ``sweep --eval-text`` and ``plan --objective kld`` score in the model (``kvtool eval``'s
    protocol, prefill mode): ``text`` cut to ``max_tokens`` tokens, chunks of ``context`` (``text=None``:
    the cache's own captured tokens, what ``plan`` weighs keys against values on without ``--eval-text``);
    ``model`` defaults to the cache's own model spec. The other fields are :func:`kvtool.models.load_model`'s
    options (the same as ``capture``'s and ``eval``'s ``--model-dtype``, ``--device``, ...)."""

    text: Path | str | None
    model: str | None = None
    max_tokens: int | None = 1024
    context: int = 512
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: Path | str | None = None
    trust_remote_code: bool = False


def load_eval(info: Any, setup: EvalText, sequence: int = 0) -> tuple[Any, Any]:
    """(loaded model, token ids) for ``setup``; refuses a model other than the one the cache was captured
    with when both identify their weights. ``setup.text=None``: the first ``max_tokens`` tokens the cache's
    ``sequence`` was captured from."""
    loaded = load_model(setup.model or info.model, dtype=setup.dtype, device=setup.device,
                        device_map=setup.device_map, max_memory=setup.max_memory,
                        offload_folder=setup.offload_folder, trust_remote_code=setup.trust_remote_code)
    if info.model_source and loaded.source and info.model_source != loaded.source:
        raise InputError(f"the cache was captured with {info.model!r} ({info.model_source}), but the eval model "
                         f"{loaded.spec!r} is {loaded.source}")
    if setup.text is None:
        with CacheReader(info.path) as reader:
            tokens = reader.tokens(sequence).astype("int64")[:setup.max_tokens]
    else:
        tokens = tokenize_text(loaded, setup.text, setup.max_tokens)
    check_context(loaded, tokens, setup.context)
    return loaded, tokens


def eval_specs(info: Any, specs: Sequence[str], setup: EvalText, progress: Progress | None = None
               ) -> dict[str, Any]:
    """``kvtool eval`` of every spec (keys and values) in one run sharing the exact pass: the eval report."""
    loaded, tokens = load_eval(info, setup)
    return evaluate(loaded, tokens, [Assignment.of(s, s) for s in specs], context=setup.context,
                    labels=list(specs), source=str(setup.text), progress=progress)


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For ``(cost, error)`` points: True where no other point is at most as costly and at most as wrong
    and strictly better in one of the two (equal points are all on the frontier)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    on = [False] * len(points)
    best = float("inf")  # lowest error among strictly cheaper points seen so far
    i = 0
    while i < len(order):
        j = i
        cost = points[order[i]][0]
        while j < len(order) and points[order[j]][0] == cost:
            j += 1
        group = order[i:j]  # equal cost, ascending error: only the lowest error(s) of the group can win
        low = points[group[0]][1]
        for k in group:
            on[k] = points[k][1] == low and low < best
        best = min(best, low)
        i = j
    return on


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    keep = {"layer": row["layer"], "keys_bits": row["keys"]["bits_per_element"],
            "values_bits": row["values"]["bits_per_element"], "keys_rel_mse": row["keys"]["rel_mse"],
            "values_rel_mse": row["values"]["rel_mse"]}
    keep.update({k: row[k] for k in metrics.ATTENTION_KEYS if k in row})
    return keep


def _error(total: dict[str, Any], attention: bool) -> float:
    if attention:
        return float(total[ATTENTION_ERROR])
    return 0.5 * (total["keys"]["rel_mse"] + total["values"]["rel_mse"])


def sweep(
    path: Path | str,
    specs: Sequence[str],
    *,
    layers: list[int] | None = None,
    sequence: int = 0,
    topk: int = 8,
    eval_text: EvalText | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every spec in ``specs`` (codec specs or preset names, see :mod:`kvtool.codecs.presets`) on
    ``layers`` (default all) of ``sequence``; one read and one reference attention per layer.

    Returns a ``sweep`` report: ``results`` sorted by ``stored_bits``, each with the spec, ``stored_bits``,
    ``error`` (``error_metric``), ``frontier`` (on the Pareto frontier), compress's ``total`` and compact
    per-layer rows. ``progress(done, total)`` counts (layer, spec) pairs, then eval's forward passes.

    With ``eval_text`` every spec is also scored inside the model (:func:`eval_specs`, one exact pass for
    all): each result gains ``eval`` (KLD, Δppl, top-1 agreement) and ``frontier_kld``/``frontier_ppl``.
    """
    started = time.perf_counter()
    path = Path(path)
    names = expand(specs)
    if not names:
        raise CodecError("no codec specs to sweep; give specs or a preset name")
    assignments = [Assignment.of(s, s) for s in names]
    with CacheReader(path, kinds=(KIND_CACHE,)) as reader:
        info = reader.info
        chosen = list(range(info.num_layers)) if layers is None else sorted(set(layers))
        if not chosen:
            raise InputError("no layers to sweep")
        for i in chosen:
            reader.check_layer(i, sequence)
        for a in assignments:
            a.validate(info.head_dim, info.num_layers)
        split = query_split(info, assignments, chosen, sequence, None)  # one split for every spec
        rows: list[list[dict[str, Any]]] = [[] for _ in names]
        done, steps = 0, len(chosen) * len(names)
        for i in chosen:
            data = reader.layer(i, sequence)
            seen, held = split_queries(data, split["observe"])
            ref = reference_for(data, held, topk)
            for n, a in enumerate(assignments):
                kc, vc = a.codec(i, "keys"), a.codec(i, "values")
                keys = (kc, *encode_tensor(kc, data.keys, layer_context(data, "keys", seen)))
                values = (vc, *encode_tensor(vc, data.values, layer_context(data, "values", seen)))
                rows[n].append(layer_report(data, keys, values, topk, ref, held))
                done += 1
                if progress is not None:
                    progress(done, steps)
    attention = info.has_queries
    results = []
    for name, spec_rows in zip(names, rows, strict=True):
        total = totals(spec_rows)
        results.append({"spec": name, "keys_spec": spec_rows[0]["keys"]["spec"],
                        "values_spec": spec_rows[0]["values"]["spec"],
                        "stored_bits": total["bits_per_element_with_state"],
                        "bits_per_element": total["bits_per_element"], "error": _error(total, attention),
                        "total": total, "layers": [_compact(r) for r in spec_rows]})
    evaluated = None
    if eval_text is not None:
        evaluated = eval_specs(info, names, eval_text, progress)
        for r, m in zip(results, evaluated["methods"], strict=True):
            r["eval"] = {k: m[k] for k in EVAL_KEYS if k in m}
    results.sort(key=lambda r: (r["stored_bits"], r["error"]))
    for r, on in zip(results, pareto_frontier([(r["stored_bits"], r["error"]) for r in results]), strict=True):
        r["frontier"] = on
    if evaluated is not None:
        for key, metric in (("frontier_kld", "kld_mean"), ("frontier_ppl", "delta_ppl_pct")):
            # against the bits stored in the model's cache on the eval's prompts, not on the capture
            marks = pareto_frontier([(r["eval"]["bits_per_element"], r["eval"][metric]) for r in results])
            for r, on in zip(results, marks, strict=True):
                r[key] = on
    report = {**store_header("sweep", info), "source": str(path), "sequence": sequence, "layers": chosen,
              "attention": attention, "error_metric": ATTENTION_ERROR if attention else RECONSTRUCTION_ERROR,
              "topk": topk, "query_split": split, "results": results, "seconds": time.perf_counter() - started}
    if evaluated is not None:
        report["eval"] = {k: evaluated[k] for k in ("text", "mode", "context", "chunks", "tokens_in_text",
                                                    "scored_per_chunk", "ppl_exact", "seconds") if k in evaluated}
        report["eval"]["model"] = evaluated["model"]
    return json_safe(report)


def _family(spec: str) -> str:
    return spec.split(":")[0].split("+")[0]


def _panel(ax: Any, results: list[dict[str, Any]], value: Callable[[dict[str, Any]], float], frontier: str,
           ylabel: str, bits: Callable[[dict[str, Any]], float] = lambda r: r["stored_bits"],
           xlabel: str = "stored bits per element (arrays + shared state)") -> None:
    """Every spec as a point (stored bits, value), coloured by codec; the frontier as a staircase, named."""
    from matplotlib import colormaps

    families = sorted({_family(r["spec"]) for r in results})
    palette = colormaps["tab20"]  # 20 distinct colours: every codec family its own
    for n, fam in enumerate(families):
        pts = [r for r in results if _family(r["spec"]) == fam]
        ax.scatter([bits(r) for r in pts], [value(r) for r in pts], s=22, label=fam,
                   alpha=0.8, color=palette(n % 20))
    front = sorted((r for r in results if r[frontier] and value(r) > 0), key=bits)  # a log axis has no room for 0
    ax.step([bits(r) for r in front], [value(r) for r in front], where="post", color="black", lw=1,
            zorder=0, label="Pareto frontier")
    for r in front:  # names never resize the axes (a long age-band spec would squeeze them to nothing)
        ax.annotate(_short(r["spec"]), (bits(r), value(r)), fontsize=7, xytext=(4, 3),
                    textcoords="offset points", annotation_clip=True).set_in_layout(False)
    hidden = [_short(r["spec"]) for r in results if value(r) <= 0]
    if hidden:
        ax.text(0.99, 0.01, f"≤ 0, not drawn: {', '.join(hidden)}", transform=ax.transAxes, fontsize=7,
                ha="right", va="bottom").set_in_layout(False)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, not over points


def _short(spec: str, limit: int = 36) -> str:
    """A spec cut to ``limit`` characters for a label on the plot (the report holds the whole spec)."""
    return spec if len(spec) <= limit else spec[: limit - 1] + "…"


def plot_frontier(report: dict[str, Any], output: Path | str) -> Path:
    """A PNG of a sweep report: every spec as a point (stored bits, error), the frontier drawn and named;
    with eval results a second panel of KLD.

    Written to a temporary file beside ``output`` and renamed, so no partial PNG is left behind.
    """
    from matplotlib.figure import Figure

    output = Path(output)
    results = report["results"]
    with_eval = "eval" in report
    fig = Figure(figsize=(10, 10 if with_eval else 5.5), layout="constrained")
    axes = fig.subplots(2 if with_eval else 1, 1, squeeze=False)[:, 0]
    metric = "attention-output error ‖ô−o‖/‖o‖ (mean over layers)" if report["attention"] else \
        "relative MSE of keys and values (mean over layers)"
    _panel(axes[0], results, lambda r: r["error"], "frontier", metric)
    axes[0].set_title(f"kvtool sweep: {Path(report['source']).name}, {len(results)} specs", fontsize=10)
    if with_eval:
        _panel(axes[1], results, lambda r: r["eval"]["kld_mean"], "frontier_kld",
               "next-token KL divergence (kvtool eval, mean)", bits=lambda r: r["eval"]["bits_per_element"],
               xlabel="stored bits per element in the model's cache (the eval's prompts)")
        axes[1].set_title(f"in the model: {Path(report['eval']['text']).name}, {report['eval']['chunks']} chunk(s) "
                          f"of {report['eval']['context']} tokens", fontsize=10)
    # temp file + rename; a full disk or a file-size limit is one InputError line, nothing left behind
    return atomic_write(output, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), "the plot")
