"""Running a task grid with the exact cache and with codecs inside the model's cache.

Protocol, per prompt (``eval``'s ``prefill`` protocol, with generation in place of teacher forcing):

1. One exact forward pass over the prompt minus its last token, shared by every method; it records the last
   ``queries`` post-RoPE queries per layer for the codecs' context (the question is among them, which is
   what query-aware selectors such as SnapKV use).
2. Per method, :meth:`kvtool.cache.CodecCache.from_cache` codes a copy of that cache as a compressed prompt
   is coded in ``prefill`` mode. The prompt's last token is then fed through the coded cache and the answer
   is generated greedily; generated tokens are appended precise. Every answer token is therefore produced
   by attention over the coded prompt (the last prompt token included), as every scored token is in
   ``eval``.
3. The exact cache continues the same way from the uncoded prefill: the reference.

Generation stops at a newline, at a special token (EOS, end of turn) or after ``max_new_tokens`` (default:
the longest answer's tokens + 4). Replies are scored by :func:`kvtool.tasks.scoring.is_match`.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.cache import DEFAULT_QUERIES, CodecCache
from kvtool.capture import read_text
from kvtool.codecs.assignment import Assignment
from kvtool.errors import InputError
from kvtool.evaluate import exact_prefill, forward_logits, method_label, plan_assignment, reconstruction_wanted
from kvtool.hooks import codec_attention
from kvtool.models import LoadedModel, model_shape
from kvtool.reconstruct import reconstruction_scores
from kvtool.report import header, json_safe
from kvtool.tasks.core import Haystack, Prompt, Task, build_prompts, check_grid, make_template
from kvtool.tasks.kinds import parse_task
from kvtool.tasks.scoring import reply_line, summarize

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: ``progress(done, total)`` over forward work units (one prefill, one generation per method and exact).
Progress = Callable[[int, int], None]
PROTOCOL = ("prompt minus its last token prefilled exactly once; per method that cache coded as in prefill "
            "mode (CodecCache.from_cache); the last prompt token and a greedy answer generated through it; "
            "exact continues from the uncoded prefill")


def load_haystack(tokenizer: Any, text: str | Path | Haystack) -> Haystack:
    """A :class:`Haystack` from a text file (or text containing a newline, or one already built)."""
    if isinstance(text, Haystack):
        return text
    source = read_text(Path(text)) if isinstance(text, Path) or "\n" not in str(text) else None
    if source is None:
        return Haystack.from_text(tokenizer, str(text), "text")
    return Haystack.from_text(tokenizer, source.text, source.source)


def _assignment(loaded: LoadedModel, method: Any) -> Assignment:
    if isinstance(method, str):
        return Assignment.of(method, method)
    return plan_assignment(loaded, method)


def check_lengths(loaded: LoadedModel, lengths: Sequence[int], max_new_tokens: int) -> None:
    """One-line error for a prompt length the model's context cannot hold with the answer."""
    limit = loaded.max_context
    for n in lengths:
        if limit and n + max_new_tokens > limit:
            raise InputError(f"length {n} + {max_new_tokens} answer tokens exceeds the model's context of "
                             f"{limit} tokens; give lengths up to {limit - max_new_tokens}")


def answer_budget(tokenizer: Any, prompts: Sequence[Prompt]) -> int:
    """Tokens enough for the longest answer plus a little room (punctuation, a newline)."""
    return max(len(tokenizer(" " + p.answer, add_special_tokens=False)["input_ids"]) for p in prompts) + 4


def greedy(model: Any, tokenizer: Any, cache: Any, first: Any, max_new_tokens: int, stops: set[int]) -> str:
    """Feed ``first`` ``(1, t)`` through ``cache`` and generate greedily; the decoded reply."""
    import torch

    out: list[int] = []
    ids = first
    for _ in range(max_new_tokens):
        logits = forward_logits(model, ids, cache, logits=False)  # (1, vocab): the last position's
        token = int(logits[-1].argmax())
        if token in stops:
            break
        out.append(token)
        if "\n" in tokenizer.decode(out):
            break
        ids = torch.tensor([[token]], device=first.device)
    return tokenizer.decode(out, skip_special_tokens=True)


def run_tasks(loaded: LoadedModel, task: str | Task, haystack: str | Path | Haystack,
              methods: Sequence[Any], *, lengths: Sequence[int] = DEFAULT_LENGTHS,
              depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 1, seed: int = 0,
              labels: Sequence[str] | None = None, template: str = "auto", queries: int = DEFAULT_QUERIES,
              max_new_tokens: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run ``task`` over the grid lengths × depths × samples with the exact cache and each method.

    ``loaded``: a :class:`kvtool.models.LoadedModel`; ``task``: a spec (``"passkey"``,
    ``"multikey:keys=8"``) or a :class:`Task`; ``haystack``: a text file (or a :class:`Haystack`);
    ``methods``: codec specs (both roles), :class:`Assignment` s or :class:`kvtool.plan.Plan` s; ``lengths``:
    prompt lengths in tokens; ``depths``: where the asked needle sits (0..1 of the haystack). Returns the
    JSON report (``kind "task"``; schema in docs/TASKS.md): ``exact`` and ``methods`` with accuracy,
    agreement with exact, Wilson 95 % intervals, per (length, depth) ``cells``; ``items`` per prompt.
    """
    import torch

    task = parse_task(task)
    check_grid(lengths, depths, samples)
    assignments = [_assignment(loaded, m) for m in methods]
    model, tokenizer = loaded.model, loaded.tokenizer
    for a in assignments:  # bad specs fail before any forward pass
        CodecCache(model.config, a, mode="prefill")
    rebuilds = [reconstruction_wanted(model.config, a) for a in assignments]
    labels = list(labels) if labels is not None else [method_label(a) for a in assignments]
    if len(labels) != len(assignments):
        raise InputError(f"{len(labels)} labels for {len(assignments)} methods")
    check_lengths(loaded, lengths, max_new_tokens or 1)
    hay = load_haystack(tokenizer, haystack)
    tpl = make_template(tokenizer, template)
    prompts = build_prompts(tokenizer, task, hay, lengths, depths, samples, seed, tpl)
    max_new = max_new_tokens or answer_budget(tokenizer, prompts)
    check_lengths(loaded, lengths, max_new)
    stops = {int(i) for i in (tokenizer.all_special_ids or [])}
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))

    replies: list[list[str]] = [[] for _ in assignments]
    exact_replies: list[str] = []
    bits = [[] for _ in assignments]
    seconds = np.zeros(len(assignments))
    seconds_exact = 0.0
    total, done = len(prompts) * (2 + len(assignments)), 0
    started = time.perf_counter()

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    with torch.inference_mode():
        for p in prompts:
            ids = torch.as_tensor(p.ids, device=loaded.device)[None]  # (1, length)
            t0 = time.perf_counter()
            prefill, records = exact_prefill(loaded, ids[:, :-1], queries)
            seconds_exact += time.perf_counter() - t0
            tick()
            t0 = time.perf_counter()
            rebuilt = None  # kvzip's scores: its pass's time is counted in the seconds of each method reading them
            if any(rebuilds):
                rebuilt = reconstruction_scores(model, tokenizer, functools.partial(copy.deepcopy, prefill),
                                                p.ids[:-1], model_shape(model.config).num_layers, loaded.device)
            seconds_rebuild = time.perf_counter() - t0
            for m, a in enumerate(assignments):
                t0 = time.perf_counter()
                with codec_attention(model):
                    cache = CodecCache.from_cache(model, a, prefill, queries=records,
                                                  ropes=getattr(prefill, "kvtool_ropes", None), reconstruction=rebuilt)
                    fp = cache.footprint()
                    replies[m].append(reply_line(greedy(model, tokenizer, cache, ids[:, -1:], max_new, stops)))
                stored = sum(f["stored_bytes"] for f in fp.values())
                elements = sum(f["elements"] for f in fp.values())
                bits[m].append(8.0 * stored / max(elements, 1))
                del cache
                seconds[m] += time.perf_counter() - t0 + (seconds_rebuild if rebuilds[m] else 0.0)
                tick()
            t0 = time.perf_counter()
            exact_replies.append(reply_line(greedy(model, tokenizer, prefill, ids[:, -1:], max_new, stops)))
            seconds_exact += time.perf_counter() - t0
            tick()

    items = [{"length": p.length, "depth": p.depth, "sample": p.sample, "tokens": int(len(p.ids)),
              "needle_position": p.needle_position, "needle_depth": p.needle_depth, "answer": p.answer,
              "exact": exact_replies[i], "methods": [r[i] for r in replies]} for i, p in enumerate(prompts)]
    exact = {"label": "exact", "assignment": None,
             **summarize(items, exact_replies, None, lengths, depths), "seconds": seconds_exact}
    out_methods = []
    for m, a in enumerate(assignments):
        summary = summarize(items, replies[m], exact_replies, lengths, depths)
        cells = summary.pop("cells")
        out_methods.append({"label": labels[m], "assignment": a.describe(), **summary,
                            "bits_per_element": float(np.mean(bits[m])), "seconds": float(seconds[m]),
                            "cells": cells})
    headline = {k: v for k, v in (out_methods[0] if out_methods else exact).items()
                if k.startswith(("accuracy", "agreement"))}
    report = header("task", model=loaded.spec, model_source=loaded.source, model_architecture=loaded.architecture)
    report.update({
        "task": task.name, "task_params": task.params(), "haystack": hay.source, "haystack_sha256": hay.sha256,
        "seed": seed, "lengths": list(lengths), "depths": list(depths), "samples": samples,
        "prompts": len(prompts), "template": tpl.kind, "max_new_tokens": max_new, "queries": queries,
        "device": str(loaded.device), "model_dtype": str(model.dtype).replace("torch.", ""),
        "protocol": PROTOCOL, **headline, "exact": exact, "methods": out_methods, "items": items,
        "seconds": time.perf_counter() - started,
    })
    return json_safe(report)
