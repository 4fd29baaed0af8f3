"""The per-layer measuring primitives that ``compress``, ``sweep`` and ``plan`` share.

One layer at a time: split its captured queries into the ones codecs see and the ones attention is scored
on (:func:`split_queries`, checked and described by :func:`query_split`), build the context a codec is
fitted with (:func:`layer_context`), fit + encode + decode one tensor (:func:`encode_tensor`), the exact
attention of the held-out queries (:func:`reference_for`), and the report of one tensor, one layer and the
totals over layers (:func:`tensor_report`, :func:`layer_report`, :func:`totals`). Every figure ``compress``,
``sweep`` and ``plan`` print comes from these functions, so the same spec measures the same in all three.

Below: :mod:`kvtool.metrics` (the formulas), :mod:`kvtool.codecs` (the codecs), :mod:`kvtool.store` (the
layer data). Above: :mod:`kvtool.compress`, :mod:`kvtool.sweep`, :mod:`kvtool.plan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtool import metrics
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.base import ROLES, Codec, Encoded, LayerContext
from kvtool.errors import InputError
from kvtool.store import QUERY_POSITIONS, CacheReader, LayerData, StoreInfo

#: (queries (q_heads, n, d), positions (n,)) or none
Queries = tuple[np.ndarray, np.ndarray] | None  # (queries (q_heads, n, d), positions (n,)) or none


def encode_tensor(codec: Codec, x: np.ndarray, context: LayerContext,
                  state: dict[str, np.ndarray] | None = None) -> tuple[Encoded, np.ndarray]:
    """Fit ``codec`` to ``x`` ``(kv_heads, T, head_dim)``, encode and decode: (stored, reconstruction).

    ``state``: shared state fitted elsewhere (``--fit-on``). It is restored before ``fit`` (codecs then fit
    only what belongs to ``x``) and again after it, for a codec that refits regardless.
    """
    if state is not None:
        codec.load_shared_state(state)
    codec.fit(x, context)
    if state is not None:
        codec.load_shared_state(state)
    enc = codec.encode(x)
    return enc, codec.decode(enc)


def split_queries(data: LayerData, observe: int) -> tuple[Queries, Queries]:
    """(observed, held out): the first ``observe`` captured queries and the rest (either may be None)."""
    if data.queries is None or data.query_positions is None:
        return None, None
    q, pos = data.queries, data.query_positions
    seen = (q[:, :observe], pos[:observe]) if observe > 0 else None
    held = (q[:, observe:], pos[observe:]) if observe < pos.size else None
    return seen, held


def query_split(info: StoreInfo, assignment: Assignment | list[Assignment], chosen: list[int], sequence: int,
                observe: int | None) -> dict[str, Any]:
    """Check ``observe`` against the captured queries and describe the split (the report's ``query_split``).

    ``observe`` of the ``Tq`` queries of each layer (the earliest) are given to the codecs; the other
    ``Tq − observe`` (the latest) score attention. Default (``None``): ``Tq // 2`` when a codec of the
    assignment (of any of a list of assignments: a sweep scores every spec on the same queries) uses
    queries, else 0. Raises InputError for a split that leaves no held-out query, or a
    query-using codec on a cache without queries.
    """
    layer_info = info.sequences[sequence].layers[chosen[0]] if chosen else None
    tq = layer_info.num_queries if layer_info is not None else 0
    assignments = assignment if isinstance(assignment, list) else [assignment]
    wants = any(a.codec(i, role).uses_queries() for a in assignments for i in chosen for role in ROLES)
    if tq == 0:
        if observe:
            raise InputError(f"--observe {observe}: the cache holds no captured queries; capture with "
                             "`kvtool capture --queries last:N`")
        if wants:
            raise InputError("a codec of this spec scores tokens with the model's queries, but the cache "
                             "holds none; capture with `kvtool capture --queries last:N`")
        return {"observe": 0, "captured": 0, "default": observe is None, "observed_positions": [],
                "heldout_positions": []}
    default = observe is None
    if default:
        observe = tq // 2 if wants else 0
    if not 0 <= observe < tq:  # type: ignore[operator]
        raise InputError(f"--observe {observe} leaves no held-out queries for the attention metrics: the "
                         f"cache holds {tq} queries per layer; use 0..{tq - 1}")
    if wants and observe == 0:
        raise InputError(f"--observe 0 gives no queries to a codec of this spec that scores tokens with them; "
                         f"use 1..{tq - 1} (default {tq // 2})")
    with CacheReader(info.path) as reader:
        group = reader.layer_group(chosen[0], sequence)
        positions = reader.read_dataset(group, QUERY_POSITIONS, sequence, chosen[0]).astype(int).tolist()
    seen, held = positions[:observe], positions[observe:]
    note = (f"codecs saw the first {observe} of the {tq} captured queries (positions {seen[0]}..{seen[-1]}); "
            f"attention metrics use the other {len(held)} (positions {held[0]}..{held[-1]})"
            if observe else "")
    return {"observe": observe, "captured": tq, "default": default, "observed_positions": seen,
            "heldout_positions": held, "note": note}


def layer_context(data: LayerData, role: str, observed: Queries = None) -> LayerContext:
    """The context codecs are fitted with: the layer's keys, values and positions, and only the
    ``observed`` queries (None: no queries)."""
    queries, positions = observed if observed is not None else (None, None)
    rope = data.rope
    return LayerContext(layer=data.layer, role=role, queries=queries,
                        query_positions=positions, key_positions=data.key_positions,
                        keys=data.keys, values=data.values, scaling=data.scaling,
                        sliding_window=data.sliding_window, keys_prerope=data.keys_prerope, rope=rope,
                        rope_inv_freq=rope.inv_freq if rope is not None and
                        rope.rotary_dim == data.keys.shape[-1] else None)


def reference_for(data: LayerData, heldout: Queries, topk: int) -> metrics.AttentionReference | None:
    """The exact attention of the ``heldout`` queries of a layer (None without them)."""
    if heldout is None:
        return None
    queries, positions = heldout
    return metrics.reference_attention(queries, data.keys, data.values, positions, data.key_positions,
                                       scaling=data.scaling, sliding_window=data.sliding_window, topk=topk,
                                       reference_mask=data.kept)


def tensor_report(codec: Codec, x: np.ndarray, enc: Encoded, x_hat: np.ndarray) -> dict[str, Any]:
    """Bits, bytes and reconstruction error of one tensor; ``heads`` holds per-head rel_mse/cosine.

    For a token selector also ``kept_fraction``, ``kept_tokens`` (per head) and ``rel_mse_kept`` (the
    error of the rows that exist; ``rel_mse`` counts evicted rows as lost)."""
    rec = metrics.reconstruction(x, x_hat)
    before = x.size * 2  # the same elements in fp16
    state = int(sum(a.nbytes for a in codec.shared_state().values()))
    report = {
        "spec": codec.spec(),
        "bits_per_element": enc.bits_per_element(),
        "bits_per_element_with_state": 8.0 * (enc.nbytes + state) / max(enc.elements, 1),
        "bytes_before": before,
        "bytes_after": enc.nbytes,
        "ratio": before / enc.nbytes if enc.nbytes else float("inf"),
        "shared_state_bytes": state,
        **rec,
    }
    resolved = codec.report(enc)
    if resolved:
        report["resolved"] = resolved
    mask = codec.token_mask(enc)
    if mask is not None:
        kept = x[mask]  # (kept rows, head_dim)
        ref = float(np.square(kept, dtype=np.float64).sum())
        err = float(np.square(kept - x_hat[mask], dtype=np.float64).sum())
        report.update(kept_fraction=float(mask.mean()), kept_tokens=mask.sum(axis=1).tolist(),
                      rel_mse_kept=err / ref if ref > 0 else float(err > 0))
    return report


def layer_report(data: LayerData, keys: tuple, values: tuple, topk: int,
                  reference: metrics.AttentionReference | None = None,
                  heldout: Queries | None = None) -> dict[str, Any]:
    """keys/values: (codec, enc, reconstruction). Metrics of one layer, per head and in total; attention
    is scored on the ``heldout`` queries (default: all the layer's queries).

    ``reference``: the exact attention of those queries when the caller already computed it (``sweep``
    compares many codecs with one reference; the figures are those of a fresh one)."""
    (kc, ke, kx), (vc, ve, vx) = keys, values
    k_rep, v_rep = tensor_report(kc, data.keys, ke, kx), tensor_report(vc, data.values, ve, vx)
    heads = [{"head": h, "keys_rel_mse": kh["rel_mse"], "keys_cosine": kh["cosine"],
              "values_rel_mse": vh["rel_mse"], "values_cosine": vh["cosine"]}
             for h, (kh, vh) in enumerate(zip(k_rep.pop("heads"), v_rep.pop("heads"), strict=True))]
    report: dict[str, Any] = {"layer": data.layer, "tokens": int(data.keys.shape[1]),
                              "layer_type": data.layer_type, "keys": k_rep, "values": v_rep}
    mask = joint_mask(kc.token_mask(ke), vc.token_mask(ve))
    if mask is not None:
        report["kept_fraction"] = float(mask.mean())
    if reference is None:
        if heldout is None and data.queries is not None:
            heldout = (data.queries, data.query_positions)
        reference = reference_for(data, heldout, topk)
    if reference is not None:
        att = metrics.compare_attention(reference, kx, vx, key_mask=mask)
        for row, head_att in zip(heads, att.pop("heads"), strict=True):
            row.update(head_att)
        report.update(att)
    report["heads"] = heads
    return report


def joint_mask(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    return a if b is None else a & b


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else 0.0


def _kept_total(rows: list[dict[str, Any]], total: dict[str, Any], weights: list[int]) -> None:
    """Token-weighted kept fraction over the rows that have one (token selectors)."""
    pairs = [(r["kept_fraction"], w) for r, w in zip(rows, weights, strict=True) if "kept_fraction" in r]
    if pairs:
        total["kept_fraction"] = sum(f * w for f, w in pairs) / max(sum(w for _, w in pairs), 1)


def _tensor_total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    state = sum(r["shared_state_bytes"] for r in rows)
    total = {"bits_per_element": 16.0 * after / before if before else 0.0,
             "bits_per_element_with_state": 16.0 * (after + state) / before if before else 0.0,
             "bytes_before": before, "bytes_after": after, "ratio": before / after if after else float("inf"),
             "shared_state_bytes": state, "rel_mse": _mean(rows, "rel_mse"), "cosine": _mean(rows, "cosine")}
    _kept_total(rows, total, [r["bytes_before"] for r in rows])
    return total


def totals(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes summed over layers; error metrics averaged over layers (``*_max``: the worst layer)."""
    keys, values = _tensor_total([r["keys"] for r in layers]), _tensor_total([r["values"] for r in layers])
    before, after = keys["bytes_before"] + values["bytes_before"], keys["bytes_after"] + values["bytes_after"]
    state = keys["shared_state_bytes"] + values["shared_state_bytes"]
    total: dict[str, Any] = {"keys": keys, "values": values, "bytes_before": before, "bytes_after": after,
                             "shared_state_bytes": state,
                             "bits_per_element": 16.0 * after / before if before else 0.0,
                             "bits_per_element_with_state": 16.0 * (after + state) / before if before else 0.0,
                             "ratio": before / after if after else float("inf"),
                             "averaging": "mean over layers"}
    _kept_total(layers, total, [r["tokens"] for r in layers])
    with_att = [r for r in layers if "attention_output_rel_error" in r]
    if with_att:
        total.update({k: _mean(with_att, k) for k in metrics.ATTENTION_KEYS})
        total["attention_output_rel_error_max"] = max(r["attention_output_rel_error"] for r in with_att)
        total["attention_output_cosine_min"] = min(r["attention_output_cosine"] for r in with_att)
    return total
