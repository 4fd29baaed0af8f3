"""Choose a codec per layer, KV head and role under an average stored-bits budget; plan files.

:func:`measure` reads each layer once, computes its exact attention once and, for every candidate spec and
each role, codes the keys (values exact) or the values (keys exact) and records per KV head the true stored
bytes (arrays + shared state) and the squared attention-output error ``‖ô_h − o_h‖²``. With
``granularity="head"`` every head is also coded on its own, as the per-head codec ``heads[...]``
(:mod:`kvtool.codecs.compose.heads`) will code it, so costs and errors are those of what gets applied.

:func:`make_plan` turns the table into a multiple-choice knapsack (:mod:`kvtool.knapsack`, exact DP over a
discretised budget): one group per (layer, role) or per (layer, head, role), one option per candidate, cost
= stored bytes, value = the option's share of the objective:

* ``attention``: ``Σ_layers e_l²`` with ``e_l² = Σ_{h, role} ‖ô − o‖² / ‖o_l‖²`` — the squared
  relative attention-output error of each layer, modelled as the sum of its keys' and values' errors;
* ``kld``: ``Σ_{layer, role} s_{l,r} · e_{l,r}²``, where ``s_{l,r}`` (the sensitivity of the layer's keys
  or values) is the next-token KL divergence the model showed with only that tensor compressed, divided by
  its ``e_{l,r}²`` under the same codec — measured by ``kvtool eval`` on a short text
  (:func:`kvtool.plan.sensitivities`). Keys and values get their own sensitivities because the attention
  error does not rank them alike in every model: on Gemma 3 keys' attention-output errors cost about five
  times more KLD per unit than values' (docs/FIDELITY.md).

The plan file (:class:`Plan`, JSON, ``kvtool_plan`` = :data:`PLAN_VERSION`) carries the model identity,
the geometry, the candidates and the choice of every layer and role as a codec spec; :meth:`Plan.assignment`
turns it into the :class:`~kvtool.codecs.assignment.Assignment` that ``compress``, ``eval`` and
``CodecCache`` take. docs/PLAN.md describes the format.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kvtool import knapsack, metrics
from kvtool.codecs import Codec, parse_spec
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.base import ROLES
from kvtool.codecs.compose.heads import CLOSE, OPEN, SEP, head_context
from kvtool.codecs.planfile import GEOMETRY, Plan, save_plan
from kvtool.codecs.presets import PRESETS, expand
from kvtool.codecs.structure.crosslayer import PairCodec
from kvtool.compress import compress
from kvtool.errors import InputError, KvtoolError
from kvtool.evaluate import evaluate
from kvtool.measure import encode_tensor, layer_context, query_split, reference_for, split_queries
from kvtool.report import json_safe, store_header
from kvtool.store import KIND_CACHE, CacheReader, LayerData, StoreInfo
from kvtool.sweep import EVAL_KEYS, EvalText, load_eval, pareto_frontier

OBJECTIVES = ("attention", "kld")
#: how the attention objective weighs a unit of keys' error against one of values' (:func:`role_weights`)
ROLE_WEIGHTS = ("measure", "equal")
GRANULARITIES = ("head", "layer")
MAX_BITS = 16.0
#: the candidates `kvtool plan` uses when none are given (a preset name, see kvtool.codecs.presets)
DEFAULT_CANDIDATES = "plan"
Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Option:
    """One candidate for one tensor (a layer's keys or values): what it stores and what it costs."""

    cost: int  # stored bytes: the codec's arrays + its shared state
    errors: list[float]  # per KV head: ‖ô_h − o_h‖² with only this tensor coded


@dataclass
class Measurements:
    """Per (layer, role, candidate): the whole tensor coded at once (``full``) and, in head mode, each head
    coded on its own (``heads``: per head ``(cost, error)``); ``energy[layer][h]`` = ``‖o_h‖²``."""

    info: StoreInfo
    candidates: list[str]
    layers: list[int]
    granularity: str
    tokens: int
    observe: int = 0  # codecs were fitted with the first `observe` queries, errors use the rest
    sequence: int = 0
    energy: dict[int, list[float]] = field(default_factory=dict)
    full: dict[tuple[int, str, int], Option] = field(default_factory=dict)
    heads: dict[tuple[int, str, int], list[tuple[int, float]]] = field(default_factory=dict)
    separable: dict[tuple[int, str, int], bool] = field(default_factory=dict)
    #: the prompt length the budget holds at (0: the capture's own); ``short[(layer, role, candidate)]`` =
    #: stored bytes of the tensor's first ``min(held, budget_tokens)`` rows coded alone
    budget_tokens: int = 0
    short: dict[tuple[int, str, int], int] = field(default_factory=dict)
    screened: list[int] = field(default_factory=list)  # the sample layers of the prescreen
    dropped: list[str] = field(default_factory=list)  # candidates the prescreen dropped
    seconds: float = 0.0


def _stored(codec: Codec, enc: Any) -> int:
    return int(enc.nbytes + sum(a.nbytes for a in codec.shared_state().values()))


def _role_errors(ref: metrics.AttentionReference, role: str, x_hat: np.ndarray, mask: np.ndarray | None
                 ) -> list[float]:
    """‖ô_h − o_h‖² per KV head with only ``role`` replaced by ``x_hat``."""
    k_hat, v_hat = (x_hat, None) if role == "keys" else (None, x_hat)
    return metrics.output_errors(ref, k_hat, v_hat, key_mask=mask)


def _measure_tensor(m: Measurements, data: LayerData, ref: metrics.AttentionReference, role: str,
                    n: int, spec: str, seen: Any) -> None:
    x = data.keys if role == "keys" else data.values
    ctx = layer_context(data, role, seen)
    codec = parse_spec(spec).for_role(role)
    enc, x_hat = encode_tensor(codec, x, ctx)
    mask = codec.token_mask(enc)
    errors = _role_errors(ref, role, x_hat, mask)
    m.full[(data.layer, role, n)] = Option(_stored(codec, enc), errors)
    rows = _short_rows(m, data.layer)
    if rows < x.shape[1]:  # what the tensor stores at the shorter prompt the budget holds at
        short = parse_spec(spec).for_role(role)
        m.short[(data.layer, role, n)] = _stored(short, encode_tensor(short, x[:, :rows], _cut(ctx, rows))[0])
    else:
        m.short[(data.layer, role, n)] = m.full[(data.layer, role, n)].cost
    if m.granularity != "head":
        return
    parts, costs, masks = [], [], []
    kv_heads = x.shape[0]
    for h in range(kv_heads):
        part = parse_spec(spec).for_role(role)
        enc_h, x_h = encode_tensor(part, x[h:h + 1], head_context(ctx, h, kv_heads))
        parts.append(x_h)
        costs.append(_stored(part, enc_h))
        mh = part.token_mask(enc_h)
        masks.append(np.ones((1, x.shape[1]), bool) if mh is None else mh)
    x_heads = np.concatenate(parts, axis=0)
    mask_heads = None if mask is None and all(m_.all() for m_ in masks) else np.concatenate(masks, axis=0)
    same = (np.array_equal(x_heads, x_hat) and sum(costs) == m.full[(data.layer, role, n)].cost
            and (mask is None) == (mask_heads is None)
            and (mask is None or np.array_equal(mask, mask_heads)))
    m.separable[(data.layer, role, n)] = same
    head_errors = errors if same else _role_errors(ref, role, x_heads, mask_heads)
    m.heads[(data.layer, role, n)] = list(zip(costs, head_errors, strict=True))


def _cut(ctx: Any, rows: int) -> Any:
    """The layer context of a tensor's first ``rows`` rows (keys, values, positions; the same queries)."""
    def cut(a: np.ndarray | None, axis: int) -> np.ndarray | None:
        return None if a is None else np.take(a, np.arange(rows), axis=axis)

    return replace(ctx, keys=cut(ctx.keys, 1), values=cut(ctx.values, 1), keys_prerope=cut(ctx.keys_prerope, 1),
                   key_positions=cut(ctx.key_positions, 0))


def _short_rows(m: Measurements, layer: int) -> int:
    """Rows the layer holds at the budget's prompt length (a sliding-window layer holds at most its window,
    which its captured rows already are when the capture is longer)."""
    held = _layer_tokens(m, layer)
    return held if not m.budget_tokens else min(held, m.budget_tokens)


def measure(
    path: Path | str,
    candidates: Sequence[str],
    *,
    granularity: str = "layer",
    sequence: int = 0,
    prescreen: int = 0,
    budget_tokens: int | None = None,
    progress: Progress | None = None,
) -> Measurements:
    """Cost and error of every candidate for every layer's keys and values (see the module docstring).

    One read and one reference attention per layer. With ``prescreen`` = k > 0, k evenly spaced layers are
    measured first with every candidate, and only the candidates on the keys or values Pareto frontier
    there (stored bytes against error, summed over those layers) are measured on the other layers.
    ``progress(done, total)`` counts (layer, candidate) pairs. Raises InputError for a cache without
    queries, CodecError for a bad candidate.

    ``budget_tokens``: the prompt length the plan's budget must hold at (default: half the capture, the
    prompt ``kvtool eval --context T`` codes in a ``T``-token chunk). A shorter cache amortises fixed costs
    (fp16 sinks, per-channel scales, means, codebooks) over fewer tokens, so each candidate is also coded on
    the first ``budget_tokens`` rows alone, for its bytes; in head mode each head's share of those bytes is
    its share at full length.
    """
    started = time.perf_counter()
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    names = expand([c for c in candidates if c.strip()])
    if not names:
        raise InputError(f"no candidates: give codec specs or a preset name ({', '.join(PRESETS)})")
    with CacheReader(path, kinds=(KIND_CACHE,)) as reader:
        info = reader.info
        reader.check_layer(0, sequence)
        if not info.has_queries:
            raise InputError(f"{path}: the cache has no captured queries; plan measures attention error, "
                             "capture with --queries last:N")
        assignments = [Assignment.of(name, name) for name in names]
        for name, a in zip(names, assignments, strict=True):
            a.validate(info.head_dim, info.num_layers)
            if isinstance(parse_spec(name), PairCodec):
                raise InputError(f"candidate {name!r} codes two layers together, but plan measures and "
                                 "chooses one layer at a time; leave it out")
        layers = list(range(info.num_layers))
        observe = query_split(info, assignments, layers, sequence, None)["observe"]  # compress's default
        tokens = info.sequences[sequence].num_tokens
        short = tokens // 2 if budget_tokens is None else budget_tokens
        if short < 1:
            raise InputError(f"--budget-tokens must be at least 1, got {short}")
        m = Measurements(info, names, layers, granularity, tokens, observe, sequence,
                         budget_tokens=short if short < tokens else 0)
        sample = sample_layers(len(layers), prescreen) if len(names) > 1 else []
        order = sample + [i for i in layers if i not in sample]
        done, steps = 0, len(layers) * len(names)
        for i in order:
            if sample and i == order[len(sample)]:  # the sample is measured: keep the frontier candidates
                m = _restrict(m, _screen(m, sample))
                steps = done + (len(layers) - len(sample)) * len(m.candidates)
            data = reader.layer(i, sequence)
            seen, held = split_queries(data, observe)
            ref = reference_for(data, held, topk=1)
            if ref is None:
                raise InputError(f"{path}: layer {i} has no captured queries")
            m.energy[i] = ref.output_energy()
            for n, name in enumerate(m.candidates):
                for role in ROLES:
                    _measure_tensor(m, data, ref, role, n, name, seen)
                done += 1
                if progress is not None:
                    progress(done, steps)
    m.screened = sample
    m.dropped = [n for n in names if n not in m.candidates]
    m.seconds = time.perf_counter() - started
    return m


def sample_layers(num_layers: int, k: int) -> list[int]:
    """``k`` evenly spaced layers, first and last included (none when ``k`` is 0 or covers them all)."""
    if k <= 0 or k >= num_layers:
        return []
    return sorted({round(x) for x in np.linspace(0, num_layers - 1, k)})


def _screen(m: Measurements, sample: list[int]) -> list[int]:
    """Candidates on the keys or the values frontier of (stored bytes, relative squared output error)
    summed over the ``sample`` layers; the others are dropped before the remaining layers are measured."""
    keep: set[int] = set()
    for role in ROLES:
        points = [(sum(m.full[(i, role, n)].cost for i in sample),
                   sum(sum(m.full[(i, role, n)].errors) / max(sum(m.energy[i]), 1e-30) for i in sample))
                  for n in range(len(m.candidates))]
        keep |= {n for n, on in enumerate(pareto_frontier(points)) if on}
    return sorted(keep)


def _restrict(m: Measurements, keep: list[int]) -> Measurements:
    """``m`` with only the candidates ``keep`` (indices renumbered)."""
    new = {old: n for n, old in enumerate(keep)}

    def remap(table: dict) -> dict:
        return {(i, r, new[n]): v for (i, r, n), v in table.items() if n in new}

    return Measurements(m.info, [m.candidates[n] for n in keep], m.layers, m.granularity, m.tokens, m.observe,
                        m.sequence,
                        energy=m.energy, full=remap(m.full), heads=remap(m.heads), separable=remap(m.separable),
                        budget_tokens=m.budget_tokens, short=remap(m.short))


# ------------------------------------------------------------------------------------------- solving


Sensitivity = Mapping[Any, float]  # by (layer, role), or by layer for both roles


def _weights(m: Measurements, sensitivity: Sensitivity | None) -> dict[tuple[int, str], float]:
    """Objective weight of a squared output error of each layer's keys and values: ``s_{l,r} / ‖o_l‖²``
    (``sensitivity`` keyed by ``(layer, role)``, or by layer for both roles)."""
    out = {}
    for i in m.layers:
        energy = sum(m.energy[i])
        for r in ROLES:
            s = 1.0 if sensitivity is None else float(sensitivity[(i, r)] if (i, r) in sensitivity
                                                      else sensitivity[i])
            out[(i, r)] = s / energy if energy > 0 else 0.0
    return out


def _groups(m: Measurements) -> list[tuple[int, str, int | None]]:
    """(layer, role, head or None) of every knapsack group."""
    heads = range(m.info.num_kv_heads)
    if m.granularity == "head":
        return [(i, r, h) for i in m.layers for r in ROLES for h in heads]
    return [(i, r, None) for i in m.layers for r in ROLES]


def _option(m: Measurements, group: tuple[int, str, int | None], n: int) -> tuple[int, float]:
    i, r, h = group
    if h is None:
        opt = m.full[(i, r, n)]
        return opt.cost, float(sum(opt.errors))
    return m.heads[(i, r, n)][h]


def elements(m: Measurements) -> int:
    """Elements of keys and values over the planned layers."""
    return 2 * m.info.num_kv_heads * m.info.head_dim * sum(_layer_tokens(m, i) for i in m.layers)


def short_elements(m: Measurements) -> int:
    """Elements of keys and values over the planned layers at the budget's prompt length."""
    return 2 * m.info.num_kv_heads * m.info.head_dim * sum(_short_rows(m, i) for i in m.layers)


def _budget_cost(m: Measurements, group: tuple[int, str, int | None], n: int) -> int:
    """What an option counts against the budget: its bytes at the budget's prompt length, scaled by
    ``elements / short_elements`` so that a budget of ``b`` bits per element over the capture's elements
    means ``b`` bits per element at that length."""
    cost = _option(m, group, n)[0]
    i, r, _ = group
    full, short = m.full[(i, r, n)].cost, m.short.get((i, r, n))
    if not m.budget_tokens or short is None:
        return cost
    return math.ceil(cost * (short / full if full else 1.0) * elements(m) / short_elements(m))


def _layer_tokens(m: Measurements, layer: int) -> int:
    """Tokens the layer's cache holds (a sliding-window layer holds only its window)."""
    return m.info.sequences[m.sequence].layers[layer].num_tokens


def _choice_specs(m: Measurements, picked: dict[tuple[int, str, int | None], int]) -> dict[int, dict[str, str]]:
    choices: dict[int, dict[str, str]] = {}
    for i in m.layers:
        choices[i] = {}
        for r in ROLES:
            if m.granularity != "head":
                choices[i][r] = m.candidates[picked[(i, r, None)]]
                continue
            per_head = [picked[(i, r, h)] for h in range(m.info.num_kv_heads)]
            n = per_head[0]
            if all(p == n for p in per_head) and m.separable[(i, r, n)]:
                choices[i][r] = m.candidates[n]
            else:
                choices[i][r] = OPEN + SEP.join(m.candidates[p] for p in per_head) + CLOSE
    return choices


def _predict(m: Measurements, picked: dict[tuple[int, str, int | None], int],
             weights: Mapping[tuple[int, str], float]) -> dict[str, Any]:
    """Bytes, bits and errors the chosen options promise, per layer and in total."""
    rows, total_cost = [], 0
    for i in m.layers:
        cost = {r: 0 for r in ROLES}
        err2 = objective = 0.0
        for g, n in picked.items():
            if g[0] == i:
                c, e = _option(m, g, n)
                cost[g[1]] += c
                err2 += e
                objective += weights[(i, g[1])] * e
        energy = sum(m.energy[i])
        rel2 = err2 / energy if energy > 0 else 0.0
        total_cost += cost["keys"] + cost["values"]
        per_tensor = m.info.num_kv_heads * _layer_tokens(m, i) * m.info.head_dim
        rows.append({"layer": i, "keys_bits": 8 * cost["keys"] / per_tensor,
                     "values_bits": 8 * cost["values"] / per_tensor, "stored_bytes": cost["keys"] + cost["values"],
                     "attention_output_rel_error": math.sqrt(rel2), "objective": objective})
    short = sum(m.short.get((g[0], g[1], n), 0) for g, n in picked.items() if g[2] is None)
    at_budget = ({"budget_tokens": m.budget_tokens, "stored_bits_at_budget_tokens": 8 * short / short_elements(m)}
                 if m.budget_tokens and m.granularity == "layer" else {})
    return {"stored_bytes": total_cost, "stored_bits": 8 * total_cost / elements(m), **at_budget,
            "attention_output_rel_error": float(np.mean([r["attention_output_rel_error"] for r in rows])),
            "objective": float(sum(r["objective"] for r in rows)), "layers": rows}


def uniform_options(m: Measurements, weights: Mapping[tuple[int, str], float]) -> list[dict[str, Any]]:
    """Every candidate applied to every layer and both roles (the whole tensor at once), predicted from
    the same measurements; sorted by stored bytes."""
    out = []
    for n, spec in enumerate(m.candidates):
        picked = {(i, r, None): n for i in m.layers for r in ROLES}
        flat = Measurements(m.info, m.candidates, m.layers, "layer", m.tokens, m.observe, m.sequence, energy=m.energy,
                            full=m.full, budget_tokens=m.budget_tokens, short=m.short)
        out.append({"spec": spec, **_predict(flat, picked, weights),
                    "budget_cost": sum(_budget_cost(flat, g, n) for g in picked)})
    return sorted(out, key=lambda u: u["stored_bytes"])


def make_plan(m: Measurements, budget_bits: float, *, objective: str = "attention",
              sensitivity: Sensitivity | None = None,
              roles: Mapping[str, float] | None = None) -> tuple[Plan, dict[str, Any]]:
    """Solve the knapsack at ``budget_bits`` average stored bits; return the plan and the solver's
    account (budget bytes, DP unit, predicted figures of the plan and of the best uniform candidate).
    ``sensitivity`` (objective ``kld``): per ``(layer, role)``, or per layer for both roles. ``roles``
    (objective ``attention``): one weight per role for every layer (:func:`role_weights`; None: equal)."""
    if objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "kld" and sensitivity is None:
        raise InputError("objective kld needs per-layer sensitivities (kvtool plan --eval-text FILE)")
    if objective == "kld":
        weights = _weights(m, sensitivity)
    else:
        weights = _weights(m, None if roles is None else {(i, r): roles[r] for i in m.layers for r in ROLES})
    groups = _groups(m)
    opts = [[_option(m, g, n) for n in range(len(m.candidates))] for g in groups]
    costs = [[_budget_cost(m, g, n) for n in range(len(m.candidates))] for g in groups]
    n_el = elements(m)
    cheapest = sum(min(c) for c in costs)
    low = 8 * cheapest / n_el
    if not (0 < budget_bits <= MAX_BITS):
        raise InputError(f"--budget-bits must be in {low:.3f}..{MAX_BITS:g} (stored bits per element), "
                         f"got {budget_bits:g}")
    budget = math.floor(budget_bits * n_el / 8)
    if cheapest > budget:
        raise InputError(f"--budget-bits {budget_bits:g} is below the cheapest candidates ({low:.3f} stored "
                         f"bits per element); allowed: {low:.3f}..{MAX_BITS:g}")
    values = [[weights[(g[0], g[1])] * e for _, e in o] for g, o in zip(groups, opts, strict=True)]
    sol = knapsack.solve(costs, values, budget)
    picked = dict(zip(groups, sol.choice, strict=True))
    predicted = _predict(m, picked, weights)
    info = m.info
    plan = Plan({"model": info.model, "model_source": info.model_source,
                 "model_architecture": info.model_architecture},
                {g: int(getattr(info, g)) for g in GEOMETRY}, list(m.candidates), _choice_specs(m, picked),
                budget_bits, objective, m.granularity, str(info.path), m.tokens,
                {k: v for k, v in predicted.items() if k != "layers"}, m.observe)
    uniform = uniform_options(m, weights)
    fitting = [u for u in uniform if u["budget_cost"] <= budget]
    best = min(fitting, key=lambda u: u["objective"]) if fitting else None
    at_uniform = None
    if best is not None and best["budget_cost"] >= cheapest:  # the plan held to the uniform's own bytes
        same = knapsack.solve(costs, values, best["budget_cost"])
        at_uniform = _predict(m, dict(zip(groups, same.choice, strict=True)), weights)
        at_uniform.pop("layers")
    account = {"budget_bytes": budget, "elements": n_el, "budget_tokens": m.budget_tokens or m.tokens,
               "solver": "exact DP over a discretised budget",
               "dp_unit_bytes": sol.unit, "dp_exact": sol.exact, "groups": len(groups), "predicted": predicted,
               "best_uniform": best, "plan_at_uniform_bits": at_uniform,
               "uniform": [{k: v for k, v in u.items() if k != "layers"} for u in uniform]}
    return plan, account


# ------------------------------------------------------------------------------------------- the command


def plan(
    path: Path | str,
    budget_bits: float,
    candidates: Sequence[str],
    *,
    objective: str = "attention",
    granularity: str = "layer",
    sequence: int = 0,
    eval_text: EvalText | None = None,
    output: Path | str | None = None,
    force: bool = False,
    verify: bool = True,
    prescreen: int = 0,
    budget_tokens: int | None = None,
    roles: str = "measure",
    model_setup: EvalText | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure, solve, optionally write the plan file and verify it by compressing (plan and best uniform).

    ``roles`` (objective ``attention``): ``"measure"`` weighs the keys' and the values' attention-output
    errors by what a unit of each costs in the model (:func:`role_weights`: two coded passes over
    ``eval_text``, else over the cache's own first tokens, with the model and chunking of ``model_setup``;
    default: the cache's model, 1,024 tokens in chunks of 512); ``"equal"`` weighs them alike and loads no
    model. ``"measure"`` falls back to equal, with a ``role_weights.warning``, when the cache names no model
    weights (``model_source``) and none is given, or the model cannot be loaded.

    ``budget_tokens``: the prompt length the budget holds at (default: half the capture; :func:`measure`).
    ``objective="kld"`` needs ``eval_text``: the layers' sensitivities are measured in the model on it
    (:func:`sensitivities`). With ``eval_text`` and ``verify`` the plan and the best uniform spec are also
    scored in the model (``kvtool eval``), whatever the objective.

    Returns a ``plan`` report: the plan's JSON form, the predicted figures, the best uniform candidate at
    the same budget, and with ``verify`` the figures ``compress`` (and eval) measure for both.
    """
    started = time.perf_counter()
    path = Path(path)
    if not 0 < budget_bits <= MAX_BITS:  # before measuring; the lower end is known only after
        raise InputError(f"--budget-bits must be in (0, {MAX_BITS:g}] stored bits per element, got {budget_bits:g}")
    if objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "kld" and eval_text is None:
        raise InputError("--objective kld measures each layer's sensitivity in the model: give --eval-text FILE")
    if roles not in ROLE_WEIGHTS:
        raise InputError(f"--role-weights must be one of {', '.join(ROLE_WEIGHTS)}, got {roles!r}")
    if output is not None and Path(output).exists() and not force:
        raise InputError(f"{output} exists; use --force to overwrite it")
    m = measure(path, candidates, granularity=granularity, sequence=sequence, prescreen=prescreen,
                budget_tokens=budget_tokens, progress=progress)
    loaded = tokens = sens = None
    if eval_text is not None:
        loaded, tokens = load_eval(m.info, eval_text)
    if objective == "kld":
        sens = sensitivities(m, loaded, tokens, eval_text, reference_choices(m, budget_bits),  # type: ignore[arg-type]
                             progress=progress)
    weighed = None
    if objective == "attention" and roles == "measure":
        weighed = _role_weights(m, budget_bits, eval_text, model_setup, loaded, tokens, progress)
    the_plan, account = make_plan(m, budget_bits, objective=objective,
                                  sensitivity=None if sens is None else sensitivity_table(sens["sensitivity"]),
                                  roles=None if weighed is None else weighed.get("weights"))
    if output is not None:
        save_plan(the_plan, output, force=force)
    report: dict[str, Any] = {**store_header("plan", m.info), "source": str(path), "sequence": sequence,
                              "output": str(output) if output is not None else None,
                              "plan": the_plan.to_json(), **account, "measure_seconds": m.seconds,
                              "prescreen": {"layers": m.screened, "dropped": m.dropped}}
    if sens is not None:
        report["sensitivity"] = sens
    if weighed is not None:
        report["role_weights"] = weighed
    if verify:
        # scored on the held-out queries the prediction used
        report["verify"] = {"plan": _measured(compress(path, plan=the_plan, sequence=sequence))}
        best = account["best_uniform"]
        if best is not None:
            report["verify"]["best_uniform"] = _measured(compress(path, assignment=Assignment.of(
                best["spec"], best["spec"]), sequence=sequence, observe=m.observe))
        if loaded is not None:
            methods = [the_plan] + ([Assignment.of(best["spec"], best["spec"])] if best is not None else [])
            scored = evaluate(loaded, tokens, methods, context=eval_text.context,  # type: ignore[union-attr]
                              labels=["plan", "best uniform"][:len(methods)], source=str(eval_text.text),  # type: ignore[union-attr]
                              progress=progress)
            for key, row in zip(("plan", "best_uniform"), scored["methods"], strict=False):
                report["verify"][key]["eval"] = {k: row[k] for k in EVAL_KEYS if k in row}
            report["verify"]["eval"] = {k: scored[k] for k in ("text", "context", "chunks", "tokens_scored")}
            if sens is not None:  # the kld objective's sensitivities came from these very tokens
                report["verify"]["warning"] = ("in-sample: the kld objective's sensitivities were measured on "
                                               "the same --eval-text tokens this verification scores; score "
                                               "the plan on held-out text with `kvtool eval --plan`")
    report["seconds"] = time.perf_counter() - started
    return json_safe(report)


def _role_weights(m: Measurements, budget_bits: float, eval_text: EvalText | None, setup: EvalText | None,
                  loaded: Any, tokens: Any, progress: Progress | None) -> dict[str, Any]:
    """:func:`role_weights` on ``eval_text`` (already loaded) or on the cache's own tokens; a report with a
    ``warning`` and no ``weights`` where the model is not at hand (the objective then weighs roles alike)."""
    if eval_text is not None:
        scored_on = eval_text
    else:
        scored_on = replace(setup, text=None) if setup is not None else EvalText(None)
        if not m.info.model_source and scored_on.model is None:
            return {"warning": "keys and values weighed alike: the cache names no model weights to measure "
                               "them in (give --model or --eval-text, or --role-weights equal)"}
        try:
            loaded, tokens = load_eval(m.info, scored_on, m.sequence)
        except KvtoolError as e:
            return {"warning": f"keys and values weighed alike: the model could not be loaded ({e})"}
    return role_weights(m, loaded, tokens, scored_on, reference_choices(m, budget_bits), progress=progress)


def role_weights(m: Measurements, loaded: Any, tokens: Any, setup: EvalText,
                 references: Mapping[int, Mapping[str, str]], progress: Progress | None = None) -> dict[str, Any]:
    """What a unit of squared relative attention-output error costs in the model, per role:
    ``w_r = KLD_r / Σ_l e_{l,r}²``, where ``KLD_r`` is the next-token KL divergence (``kvtool eval``,
    prefill, one exact pass) with every layer's keys (``r`` = keys), or every layer's values, coded by
    ``references[l][r]`` and the other role exact, and ``e_{l,r}²`` that tensor's squared relative error
    under the same codec on the cache. Two coded passes.

    Why: the attention-output error does not cost the same KL whichever tensor caused it. A key error moves
    the attention weights, so its output error lies along differences of the very value vectors the next
    layers read; a value codec's error is spread over every direction. On Qwen2.5-Coder-0.5B, with the
    roles weighed alike, the plan kept values near 3 bits and keys at 2-3 and scored KLD 0.017, where 4-bit
    keys with 1.5-bit values score 0.007 (docs/PLAN.md). One weight per role, pooled over layers, keeps the
    per-layer balance of the attention objective (per-layer weights, ``--objective kld``, starve layers).
    ``weights`` is absent (roles weighed alike) when a role's reference codes it without error."""
    methods = [Assignment("none", "none", {i: {"keys": "none", "values": "none", r: references[i][r]}
                                           for i in m.layers}) for r in ROLES]
    source = "the cache's own tokens" if setup.text is None else str(setup.text)
    scored = evaluate(loaded, tokens, methods, context=setup.context, labels=[f"every layer's {r}" for r in ROLES],
                      source=source, progress=progress)
    out: dict[str, Any] = {"reference": {i: dict(references[i]) for i in m.layers}, "kld": {}, "e2": {},
                           "eval": {k: scored[k] for k in ("text", "context", "chunks", "tokens_scored", "seconds")}}
    for r, row in zip(ROLES, scored["methods"], strict=True):
        out["kld"][r] = float(row["kld_mean"])
        out["e2"][r] = sum(_rel2(m, i, r, m.candidates.index(references[i][r])) for i in m.layers)
    if all(out["kld"][r] > 0 and out["e2"][r] > 0 for r in ROLES):
        out["weights"] = {r: out["kld"][r] / out["e2"][r] for r in ROLES}
        out["keys_over_values"] = out["weights"]["keys"] / out["weights"]["values"]
    else:
        out["warning"] = "keys and values weighed alike: a role's reference codec made no error to weigh"
    return out


def _rel2(m: Measurements, layer: int, role: str, n: int) -> float:
    """``e_{l,r}²``: the squared relative attention-output error of the tensor under candidate ``n``."""
    energy = sum(m.energy[layer])
    return sum(m.full[(layer, role, n)].errors) / energy if energy > 0 else 0.0


def reference_choices(m: Measurements, budget_bits: float) -> dict[int, dict[str, str]]:
    """The codecs the sensitivities are measured with: the attention objective's plan at the same budget,
    per layer and role — errors of the size the kld plan will make (a codec far coarser than the one chosen
    would measure the KL divergence where it no longer grows in proportion to the error)."""
    attention_plan, _ = make_plan(m, budget_bits)
    return {i: {r: _whole_tensor(m, attention_plan.choices[i][r]) for r in ROLES} for i in m.layers}


def _whole_tensor(m: Measurements, spec: str) -> str:
    """``spec`` if it is a candidate, else (a per-head ``heads[...]`` choice) the candidate most of the heads
    took."""
    if spec in m.candidates or not spec.startswith(OPEN):
        return spec
    parts = spec[len(OPEN):-len(CLOSE)].split(SEP)
    return max(set(parts), key=parts.count)


def sensitivities(m: Measurements, loaded: Any, tokens: Any, setup: EvalText,
                  references: Mapping[int, Mapping[str, str]], progress: Progress | None = None) -> dict[str, Any]:
    """Per layer and role ``s_{l,r} = KLD_{l,r} / e_{l,r}²``: the next-token KL divergence of the model
    (``kvtool eval``, prefill, one exact pass shared by every tensor) with only the keys, or only the values,
    of layer ``l`` coded by ``references[l][r]`` (the ``none`` codec elsewhere), over that tensor's squared
    relative attention-output error under the same codec on the cache (``e_{l,r}²``, from the
    measurements). ``Σ s_{l,r} · e_{l,r}²`` is then a first-order estimate of the KLD of any plan. Two coded
    passes per layer, instead of one per (layer, role, head, candidate). A tensor whose reference codes it
    without error (``fp16`` on an fp16 cache) gets the median sensitivity of its role."""
    tensors = [(i, r) for i in m.layers for r in ROLES]
    methods = [Assignment("none", "none", {i: {"keys": "none", "values": "none", r: references[i][r]}})
               for i, r in tensors]
    scored = evaluate(loaded, tokens, methods, context=setup.context,
                      labels=[f"layer {i} {r}" for i, r in tensors], source=str(setup.text), progress=progress)
    kld, e2 = {r: {} for r in ROLES}, {r: {} for r in ROLES}
    for (i, r), row in zip(tensors, scored["methods"], strict=True):
        e2[r][i] = _rel2(m, i, r, m.candidates.index(references[i][r]))
        kld[r][i] = float(row["kld_mean"])
    sens: dict[str, dict[int, float]] = {}
    for r in ROLES:
        measured = [kld[r][i] / e2[r][i] for i in m.layers if e2[r][i] > 0]
        fallback = float(np.median(measured)) if measured else 1.0
        sens[r] = {i: kld[r][i] / e2[r][i] if e2[r][i] > 0 else fallback for i in m.layers}
    return {"reference": {i: dict(references[i]) for i in m.layers}, "sensitivity": sens, "kld": kld, "e2": e2,
            "eval": {k: scored[k] for k in ("text", "context", "chunks", "tokens_scored", "seconds")}}


def sensitivity_table(sens: Mapping[str, Mapping[int, float]]) -> dict[tuple[int, str], float]:
    """The ``(layer, role) → s`` mapping :func:`make_plan` takes, from :func:`sensitivities`' ``sensitivity``."""
    return {(int(i), r): float(s) for r, per_layer in sens.items() for i, s in per_layer.items()}  # JSON: str keys


def _measured(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a compress report that a plan predicts."""
    t = report["total"]
    return {"stored_bytes": t["bytes_after"] + t["shared_state_bytes"], "bytes_after": t["bytes_after"],
            "stored_bits": t["bits_per_element_with_state"],
            "attention_output_rel_error": t["attention_output_rel_error"], "attention_kl": t["attention_kl"],
            "attention_output_cosine": t["attention_output_cosine"],
            "layers": [{"layer": r["layer"], "attention_output_rel_error": r["attention_output_rel_error"]}
                       for r in report["layers"]]}
