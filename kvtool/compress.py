"""Compress a captured cache with a pair of codecs, measure what it costs, optionally write the result.

:func:`compress` streams the cache one layer at a time: read keys/values (and queries), fit each codec,
encode, decode, measure and, with ``output``, write the stored arrays to a ``kind="compressed"`` file.
:func:`decompress` turns such a file back into an ordinary cache file. The measuring itself (query split,
fitting context, one tensor's and one layer's report, totals) is :mod:`kvtool.measure`, shared with
``sweep`` and ``plan``.

The layout of the codec groups is defined in :mod:`kvtool.store` (module docstring, "compressed file").

Layers outside ``layers`` are written with the ``fp16`` codec so the file stays complete; the report
covers only the selected layers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.codecs import Codec, Encoded, parse_spec
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.base import ROLES
from kvtool.codecs.planfile import Plan, load_plan
from kvtool.codecs.structure.crosslayer import PARTNER, PairCodec, with_partner
from kvtool.errors import CodecError, InputError, StoreError
from kvtool.measure import (
    Queries,
    encode_tensor,
    joint_mask,
    layer_context,
    layer_report,
    query_split,
    split_queries,
    totals,
)
from kvtool.report import json_safe, store_header
from kvtool.store import (
    CODEC_ATTR,
    DAMAGED_HINT,
    KEYS,
    KIND_CACHE,
    KIND_COMPRESSED,
    META_PREFIX,
    QUERIES,
    QUERY_POSITIONS,
    SHARED_PREFIX,
    STORED_BYTES_ATTR,
    VALUES,
    CacheReader,
    CacheWriter,
    LayerData,
    StoreInfo,
    check_finite,
    copy_sequence,
    derived_writer,
)

PASSTHROUGH = "fp16"
Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------- the file


def _write_tensor(writer: CacheWriter, j: int, data: LayerData, name: str, codec: Codec,
                  enc: Encoded) -> None:
    arrays = dict(enc.arrays)
    arrays.update({SHARED_PREFIX + k: v for k, v in codec.shared_state().items()})
    attrs: dict[str, Any] = {CODEC_ATTR: codec.spec(), STORED_BYTES_ATTR: enc.nbytes}
    attrs.update({META_PREFIX + k: v for k, v in enc.meta.items()})
    writer.write_encoded(j, data.layer, name, arrays, attrs, shape=enc.shape, layer_type=data.layer_type,
                         sliding_window=data.sliding_window, key_start=int(data.key_positions[0])
                         if data.key_positions.size else 0, rope=data.rope)


def _write_layer(writer: CacheWriter, j: int, data: LayerData, keys: tuple, values: tuple) -> None:
    _write_tensor(writer, j, data, KEYS, keys[0], keys[1])
    _write_tensor(writer, j, data, VALUES, values[0], values[1])
    if data.queries is not None:
        writer.write_queries(j, data.layer, data.queries, data.query_positions)


def _passthrough(writer: CacheWriter, j: int, data: LayerData) -> None:
    codec = parse_spec(PASSTHROUGH)
    _write_layer(writer, j, data, (codec, codec.encode(data.keys)), (codec, codec.encode(data.values)))


# ------------------------------------------------------------------------------------------- --fit-on


def check_same_model(calib: StoreInfo, target: StoreInfo, label: str = "--fit-on") -> None:
    """Refuse a calibration cache of another model or geometry (one line naming what differs)."""
    fields = [("model architecture", "model_architecture"), ("layers", "num_layers"),
              ("query heads", "num_q_heads"), ("kv heads", "num_kv_heads"), ("head_dim", "head_dim")]
    if calib.model_source and target.model_source:
        fields.insert(0, ("model", "model_source"))
    elif calib.model != target.model:
        fields.insert(0, ("model", "model"))
    for what, name in fields:
        a, b = getattr(calib, name), getattr(target, name)
        if a != b:
            raise InputError(f"{label} {calib.path}: {what} differs ({a} there, {b} here); fit on a cache of "
                             "the same model")


def fit_shared_state(reader: CacheReader, assignment: Assignment, layer: int, sequence: int = 0
                     ) -> dict[str, dict[str, np.ndarray]]:
    """Fit fresh codecs of ``layer`` to a calibration cache (every query of it is observed: it is not the
    cache being scored): ``{"keys": state, "values": state}``."""
    data = reader.layer(layer, sequence)
    observed = (data.queries, data.query_positions) if data.queries is not None else None
    out = {}
    for role, x in (("keys", data.keys), ("values", data.values)):
        codec = assignment.codec(layer, role)
        codec.fit(x, layer_context(data, role, observed))
        out[role] = codec.shared_state()
    return out


def _calibration(fit_on: Path | str, info: StoreInfo) -> CacheReader:
    """Open the ``--fit-on`` cache and check it belongs to the same model and geometry."""
    reader = CacheReader(fit_on, kinds=(KIND_CACHE,))
    try:
        check_same_model(reader.info, info)
    except BaseException:
        reader.close()
        raise
    return reader


def _fitted_on(calib: CacheReader | None, info: StoreInfo, sequence: int) -> tuple[Any, list[str]]:
    """The report's ``fitted_on`` and the notes that go with it."""
    if calib is None:
        return "self", []
    seq = calib.info.sequences[0]
    fitted = {"file": str(calib.path), "sequence": 0, "text_sha256": seq.text_sha256}
    notes = []
    if seq.text_sha256 == info.sequences[sequence].text_sha256:
        notes.append(f"--fit-on {calib.path}: its text is this cache's text (sha256 {seq.text_sha256[:12]}…), "
                     "so the fit is not out-of-sample")
    return fitted, notes


# ------------------------------------------------------------------------------------------- public API


def compress(
    path: Path | str,
    keys_codec: Codec | None = None,
    values_codec: Codec | None = None,
    output: Path | str | None = None,
    layers: list[int] | None = None,
    progress: Progress | None = None,
    *,
    force: bool = False,
    sequence: int = 0,
    require_attention: bool = False,
    topk: int = 8,
    assignment: Assignment | None = None,
    observe: int | None = None,
    plan: Plan | Path | str | None = None,
    fit_on: Path | str | None = None,
) -> dict[str, Any]:
    """Compress the cache at ``path`` with ``keys_codec``/``values_codec`` and report what it costs.

    ``assignment`` (instead of the codec pair) chooses the codec of each layer and role; every layer is
    coded by a fresh codec instance either way. ``plan`` (a :class:`kvtool.codecs.planfile.Plan` or a plan file's
    path, instead of both) is checked against the cache's model and geometry and applied as its assignment.
    ``fit_on``: another cache of the same model and geometry (its sequence 0) to fit the codecs' shared
    state on — a basis, a codebook — which is then applied here; the report's ``fitted_on`` names it
    (``"self"`` without), and a note warns when its text is the text of this cache.

    Measures every layer in ``layers`` (default: all) of sequence ``sequence``; with ``output`` writes a
    compressed file holding every sequence and layer (unselected layers as fp16). ``progress(done, total)``
    is called after each layer. ``require_attention`` raises InputError when the cache has no queries.

    ``observe`` splits the captured queries of each layer (see :func:`query_split`): codecs are fitted
    with the first ``observe`` (token selectors score keys with them), the attention metrics use the
    rest, so no codec is scored on the queries it chose with. ``None`` means half of them when a codec
    uses queries (:meth:`Codec.uses_queries`), else none. The report's ``query_split`` records the
    positions that served each purpose.
    Returns the report dict (see ``docs`` / the module docstring of :mod:`kvtool.compress`).
    """
    started = time.perf_counter()
    path = Path(path)
    if plan is not None:
        if assignment is not None or keys_codec is not None or values_codec is not None:
            raise CodecError("give compress a plan or codecs, not both")
        plan = plan if isinstance(plan, Plan) else load_plan(plan)
        assignment = plan.assignment()
        if observe is None and plan.observe:  # the split the plan was measured with (0: none recorded)
            observe = plan.observe
    if assignment is None:
        if keys_codec is None or values_codec is None:
            raise CodecError("compress needs keys_codec and values_codec, or an assignment")
        assignment = Assignment.of(keys_codec, values_codec)
    with CacheReader(path, kinds=(KIND_CACHE,)) as reader:
        info = reader.info
        if plan is not None:
            plan.check(info, path)
        reader.check_layer(0, sequence)
        chosen = list(range(info.num_layers)) if layers is None else sorted(set(layers))
        for i in chosen:
            reader.check_layer(i, sequence)
        assignment.validate(info.head_dim, info.num_layers)
        split = query_split(info, assignment, chosen, sequence, observe)
        for codec in {assignment.spec(i, r): assignment.codec(i, r) for i in chosen for r in ROLES}.values():
            if isinstance(codec, PairCodec):
                codec.check_layers(info.num_layers)
        pairs: list[dict[str, Any]] = []
        if require_attention and not info.has_queries:
            raise InputError(f"{path}: the cache has no captured queries, so attention metrics cannot be "
                             "computed; capture with --queries last:N")
        with contextlib.ExitStack() as stack:
            calib = stack.enter_context(_calibration(fit_on, info)) if fit_on is not None else None
            fitted_on, notes = _fitted_on(calib, info, sequence)
            writer = None
            if output is not None:
                extra = {"codec_keys": assignment.keys, "codec_values": assignment.values}
                writer = derived_writer(output, info, kind=KIND_COMPRESSED, extra=extra, force=force)
            try:
                rows = _run(reader, assignment, chosen, sequence, writer, progress, topk, split["observe"], pairs,
                            calib)
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            if writer is not None:
                writer.commit()
    report: dict[str, Any] = {**store_header("compress", info), "source": str(path),
                              "output": str(output) if output is not None else None,
                              "keys_spec": assignment.keys, "values_spec": assignment.values,
                              "assignment": assignment.describe(),
                              "fitted_on": fitted_on, "sequence": sequence, "query_split": split,
                              "layers": rows, "total": totals(rows), "notes": notes}
    if plan is not None:
        report["plan"] = {"budget_bits": plan.budget_bits, "objective": plan.objective,
                          "made_from": plan.source, "predicted": plan.predicted}
    if fit_on is not None and report["total"]["shared_state_bytes"] == 0:
        report["notes"].append(f"--fit-on {fit_on}: these codecs keep no shared state, so nothing was fitted "
                               "on it")
    report["attention"] = any("attention_output_rel_error" in r for r in rows)
    if pairs:
        report["cross_layer"] = {"pairs": pairs, "shared_bytes": sum(p["shared_bytes"] for p in pairs),
                                 "bytes_saved": sum(p["bytes_saved"] for p in pairs)}
    if not info.has_queries:
        report["notes"].append("no captured queries: attention metrics skipped")
    if split["observe"]:
        report["notes"].append(split["note"])
    report["seconds"] = time.perf_counter() - started
    return json_safe(report)




def _run(reader: CacheReader, assignment: Assignment, chosen: list[int], sequence: int,
         writer: CacheWriter | None, progress: Progress | None, topk: int,
         observe: int = 0, pairs: list[dict[str, Any]] | None = None,
         calib: CacheReader | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    selected = set(chosen)
    sequences = range(len(reader.info.sequences)) if writer is not None else [sequence]
    total, done = len(chosen), 0
    num_layers = reader.info.num_layers
    for j in sequences:
        if writer is not None:
            copy_sequence(writer, reader, j)
        pending: LayerData | None = None  # a layer waiting for the next one (cross-layer codecs)
        for i in range(num_layers) if writer is not None else chosen:
            data = reader.layer(i, j)
            if i not in selected:
                _passthrough(writer, j, data)  # type: ignore[arg-type]  # only reached with a writer
            elif pending is None and any(_partner(assignment, i, r, num_layers, selected) == i + 1
                                         for r in ROLES):
                pending = data  # coded with the next layer: two layers in memory, never more
            else:
                group = [pending, data] if pending is not None else [data]
                pending = None
                for row in _emit(assignment, group, j, writer, observe, topk, num_layers, selected,
                                 pairs if j == sequence else None, report=j == sequence, calib=calib):
                    rows.append(row)
                    done += 1
                    if progress is not None:
                        progress(done, total)
                del group
            data = None  # type: ignore[assignment]  # released before the next layer is read
    return rows


def _emit(assignment: Assignment, group: list[LayerData], j: int, writer: CacheWriter | None, observe: int,
          topk: int, num_layers: int, selected: set[int], pairs: list[dict[str, Any]] | None, *,
          report: bool, calib: CacheReader | None = None) -> list[dict[str, Any]]:
    """Code one layer (or a cross-layer pair), write it, and return its report rows (with ``report``).

    ``calib``: the ``--fit-on`` cache, whose layers the shared state is fitted on."""
    splits = [split_queries(d, observe) for d in group]
    states = [fit_shared_state(calib, assignment, d.layer) if calib is not None else {} for d in group]
    coded = _code_layers(assignment, group, [seen for seen, _ in splits], num_layers, selected, pairs, states)
    rows = []
    for d, (keys, values), (_, held) in zip(group, coded, splits, strict=True):
        if writer is not None:
            _write_layer(writer, j, d, keys, values)
        if report:
            rows.append(layer_report(d, keys, values, topk, heldout=held))
    return rows


def _partner(assignment: Assignment, layer: int, role: str, num_layers: int, selected: set[int]) -> int | None:
    """The layer that ``layer``'s ``role`` is coded together with (a cross-layer codec with the same spec on
    both, both measured), or None."""
    codec = assignment.codec(layer, role)
    if not isinstance(codec, PairCodec):
        return None
    other = codec.pair_of(layer, num_layers)
    if other is None or other not in selected or assignment.spec(other, role) != assignment.spec(layer, role):
        return None
    return other


def _code_layers(assignment: Assignment, group: list[LayerData], observed: list[Queries], num_layers: int,
                 selected: set[int], pairs: list[dict[str, Any]] | None,
                 states: list[dict[str, dict[str, np.ndarray]]] | None = None) -> list[tuple[tuple, tuple]]:
    """Fit, encode and decode keys and values of one layer, or of two adjacent layers whose codecs share
    (:class:`~kvtool.codecs.structure.crosslayer.PairCodec`). Returns ``[(keys, values)]`` per layer, each a
    ``(codec, stored Encoded, reconstruction)``; ``pairs`` collects what each pair shared."""
    coded: list[dict[str, tuple]] = [{} for _ in group]
    for role in ROLES:
        tensors = [getattr(d, role) for d in group]
        contexts = [layer_context(d, role, seen) for d, seen in zip(group, observed, strict=True)]
        codecs = [assignment.codec(d.layer, role) for d in group]
        if len(group) == 2 and _partner(assignment, group[0].layer, role, num_layers, selected) == group[1].layer:
            first, second = codecs  # type: ignore[misc]
            first.fit(tensors[0], contexts[0])
            enc_a, enc_b = first.encode_pair(*tensors, *contexts)  # type: ignore[attr-defined]
            enc_b.meta[PARTNER] = group[0].layer
            coded[0][role] = (first, enc_a, first.decode(enc_a))
            coded[1][role] = (second, enc_b, second.decode(with_partner(enc_b, enc_a)))  # as a reader would
            if pairs is not None:
                stored, fp16 = enc_a.nbytes + enc_b.nbytes, 2 * (tensors[0].size + tensors[1].size)
                pairs.append({"layers": [group[0].layer, group[1].layer], "role": role,
                              **first.pair_report(enc_a, enc_b),  # type: ignore[attr-defined]
                              "stored_bytes": stored, "fp16_bytes": fp16, "bytes_saved": fp16 - stored})
            continue
        for n, (codec, x, ctx) in enumerate(zip(codecs, tensors, contexts, strict=True)):
            state = states[n].get(role) if states else None  # fitted on the --fit-on cache
            coded[n][role] = (codec, *encode_tensor(codec, x, ctx, state))
    return [(c["keys"], c["values"]) for c in coded]


def decompress(path: Path | str, output: Path | str, *, force: bool = False,
               progress: Progress | None = None) -> dict[str, Any]:
    """Decode a compressed file into an ordinary cache file (float of the source dtype).

    Returns ``{"source", "output", "layers", "sequences", "codec_keys", "codec_values", "seconds"}``.
    """
    started = time.perf_counter()
    path = Path(path)
    with CacheReader(path, kinds=(KIND_COMPRESSED,)) as reader:
        info = reader.info
        with derived_writer(output, info, kind=KIND_CACHE, force=force) as writer:
            total = len(info.sequences) * info.num_layers
            for j in range(len(info.sequences)):
                copy_sequence(writer, reader, j)
                for i in range(info.num_layers):
                    _decompress_layer(reader, writer, j, i)
                    if progress is not None:
                        progress(j * info.num_layers + i + 1, total)
    return {"source": str(path), "output": str(output), "sequences": len(info.sequences),
            "layers": info.num_layers, "codec_keys": str(info.attrs.get("codec_keys", "")),
            "codec_values": str(info.attrs.get("codec_values", "")),
            "seconds": time.perf_counter() - started}


def read_tensor(reader: CacheReader, layer: int, name: str, sequence: int = 0) -> np.ndarray:
    """Decode the ``keys`` or ``values`` group of one layer of a compressed file: ``(kv_heads, T, d)``."""
    return decode_tensor(reader, layer, name, sequence)[0]


def decode_tensor(reader: CacheReader, layer: int, name: str, sequence: int = 0
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`read_tensor` and the codec's token mask ``(kv_heads, T)`` (None when every row exists)."""
    arrays, attrs = reader.read_encoded(layer, name, sequence)
    where = f"{reader.path}: sequence {sequence}, layer {layer}, {name}"
    try:
        codec = parse_spec(str(attrs[CODEC_ATTR]))
    except (KeyError, CodecError) as exc:
        raise StoreError(f"{where}: cannot rebuild its codec ({exc})") from None
    stored = {k: v for k, v in arrays.items() if not k.startswith(SHARED_PREFIX)}
    shared = {k[len(SHARED_PREFIX):]: v for k, v in arrays.items() if k.startswith(SHARED_PREFIX)}
    meta = {k[len(META_PREFIX):]: _scalar(v) for k, v in attrs.items() if k.startswith(META_PREFIX)}
    try:
        shape = tuple(int(s) for s in attrs["shape"])
        codec.load_shared_state(shared)
        enc = Encoded(stored, shape, meta)  # type: ignore[arg-type]
        if PARTNER in meta:  # the second layer of a cross-layer pair also reads what the first stored once
            first, _ = reader.read_encoded(int(meta[PARTNER]), name, sequence)
            partner = Encoded({k: v for k, v in first.items() if not k.startswith(SHARED_PREFIX)}, shape)
            enc = with_partner(enc, partner)
        with np.errstate(all="ignore"):  # damaged scales show up as non-finite output, checked below
            x, mask = codec.decode(enc), codec.token_mask(enc)
    except (KeyError, ValueError, TypeError, IndexError, OverflowError, CodecError) as exc:
        # the file's checksums passed, so its arrays or attributes were written inconsistently
        raise StoreError(f"{where}: the stored arrays do not decode with {codec.spec()} "
                         f"({type(exc).__name__}: {exc})") from None
    check_finite(np.asarray(x), f"{where}: the decoded tensor", DAMAGED_HINT)
    return x, mask


def _scalar(v: Any) -> int | float | str:
    if isinstance(v, np.generic):
        return v.item()
    return v


def _decompress_layer(reader: CacheReader, writer: CacheWriter, j: int, i: int) -> None:
    g = reader.layer_group(i, j)
    layer_info = reader.info.sequences[j].layers[i]
    queries = reader.read_dataset(g, QUERIES, j, i) if QUERIES in g else None
    qpos = reader.read_dataset(g, QUERY_POSITIONS, j, i) if QUERIES in g else None
    keys, keys_mask = decode_tensor(reader, i, KEYS, j)
    values, values_mask = decode_tensor(reader, i, VALUES, j)
    writer.write_layer(j, i, keys, values, queries=queries, query_positions=qpos,
                       layer_type=layer_info.layer_type, sliding_window=layer_info.sliding_window,
                       key_start=layer_info.key_start, kept=joint_mask(keys_mask, values_mask),
                       rope=reader.rope(i, j))

