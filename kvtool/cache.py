"""``kvtool.CodecCache``: a transformers ``Cache`` whose layers hold what kvtool codecs store.

Attention reads the decoded tensors; :meth:`CodecCache.stored_bytes` reports what the codecs really store
(``Encoded.nbytes`` of every coded block, their shared state, and the tokens kept precise). The same codec
objects that ``kvtool compress`` measures offline run inside the model, so ``generate()`` and ``kvtool eval``
see exactly what a reader of a compressed file would rebuild::

    import kvtool
    cache = kvtool.CodecCache(model, "turboquant:bits=3")            # or an Assignment (keys/values/plan)
    out = model.generate(**inputs, cache=cache, max_new_tokens=50)  # past_key_values= before transformers 5.24
                                                                    # (kvtool.compat.generate_cache_kwarg())
    print(cache.stored_bytes())

Two modes:

* ``prefill`` (kvpress's protocol): the tokens of the first forward pass (the prompt) are coded once that
  pass is over — its own attention is exact — and later tokens are appended precise. :meth:`compress`
  codes whatever is precise at any other moment; :meth:`CodecCache.from_cache` builds a coded cache from an
  ordinary one (what ``kvtool eval`` does after one shared exact prefill).
* ``streaming`` (KIVI's and HF ``QuantizedCache``'s protocol): tokens are coded as they arrive. Each codec
  says how (:meth:`kvtool.codecs.base.Codec.streaming_form`): ``(1, codec)`` codes every token at once,
  ``(block, codec)`` keeps new tokens in a 16-bit window (the model's dtype when that has 16 bits, else
  float16) and codes each complete block of ``block`` tokens. Attention reads the cache *after* the
  update — a token just coded is seen coded, even by itself — so feeding several tokens at once equals
  feeding them one by one as long as no block closes inside the piece (:meth:`CodecCache.safe_piece`).

Design notes:

* One :class:`kvtool.codecs.assignment.Assignment` gives one fresh codec per layer and role. Codecs work on
  float32 numpy ``(heads, tokens, head_dim)``; batch rows are coded one at a time. Each coded block is
  decoded once, from its ``Encoded``, into a working tensor of the model's dtype that attention reads (so
  decoding is not repeated at every step; the working tensor is not counted as stored).
* Layers subclass transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` (sliding-window layers
  keep their window; blocks that leave it are dropped). GQA and MQA need nothing special: codecs see the
  cache's kv heads.
* Token eviction (a codec whose ``token_mask`` says rows were dropped, e.g. a :class:`Selector`) is applied
  as a per-head key mask inside kvtool's attention function, registered through transformers'
  ``AttentionInterface`` (:func:`kvtool.hooks.install_attention`), never by zeroing keys. ``CodecCache(model, ...)``
  installs it by itself when the assignment can evict. The same function records the last ``queries``
  post-RoPE queries of each layer for the codecs' :class:`LayerContext` (token selectors need them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kvtool.codecs.assignment import Assignment
from kvtool.codecs.base import DEFAULT_OBSERVED, ROLES, Codec, Composed, Encoded, LayerContext, Selector
from kvtool.codecs.moments import QueryMoments
from kvtool.codecs.planfile import Plan, load_plan
from kvtool.codecs.structure.crosslayer import PARTNER, PairCodec, with_partner
from kvtool.errors import InputError, KvtoolError
from kvtool.hooks import install_attention, link_layer
from kvtool.models import model_shape
from kvtool.rope import RopeParams, rope_candidates
from kvtool.runtime.backends import device_codec
from kvtool.runtime.code_attention import attend_layer
from kvtool.runtime.compact import CompactTrack, Segment
from kvtool.runtime.device import DeviceCodec

MODES = ("prefill", "streaming")
#: How a compact cache's attention reads the coded blocks: decoded per layer, or from the codes.
ATTENTION = ("decode", "codes")
#: Default number of last query positions recorded per layer for the codecs' LayerContext.
DEFAULT_QUERIES = DEFAULT_OBSERVED
#: Blocks with fewer elements than this are coded on one torch thread (see _threads_for).
SMALL_BLOCK = 1 << 20


# ------------------------------------------------------------------------------------- one coded tensor


@dataclass
class QueryRecord:
    """Recorded queries of one layer: ``queries`` ``(batch, q_heads, n, head_dim)`` float32 (post-RoPE) at
    absolute ``positions`` ``(n,)``, with the attention ``scaling`` the model used; ``moments``: those of all
    the prompt's queries where they were streamed (batch 1; :mod:`kvtool.codecs.moments`)."""

    queries: torch.Tensor
    positions: np.ndarray
    scaling: float | None = None
    moments: QueryMoments | None = None


_Segment = Segment  # one coded block (kvtool.runtime.compact.Segment)


@dataclass
class _Track:
    """The keys or the values of one layer: coded segments, then precise tokens, and the working tensor.

    ``buffer`` ``(B, H, T, D)`` (model dtype) is what attention reads: decoded segments followed by the
    ``precise`` newest tokens; ``mask`` ``(B, H, T)`` bool (or None = all rows exist). ``start`` is the
    absolute position of ``buffer[..., 0, :]``.
    """

    codec: Codec
    block: int  # streaming block (0 in prefill mode)
    buffer: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    start: int = 0
    precise: int = 0
    window_dtype: torch.dtype | None = None  # streaming: the 16-bit dtype precise tokens are held in
    segments: list[_Segment] = field(default_factory=list)
    _coder: DeviceCodec | None = None

    @property
    def coder(self) -> DeviceCodec:
        """The codec's device form (kvtool.runtime.backends): coding stays on the model's device."""
        if self._coder is None or self._coder.codec is not self.codec:
            self._coder = device_codec(self.codec)
        return self._coder

    def view(self) -> torch.Tensor:
        """What attention reads: the working tensor ``(B, H, held, D)``."""
        return self.buffer

    def tokens(self, row: int, first: int, n: int) -> torch.Tensor:
        """Batch row ``row``'s tokens at absolute positions ``first .. first + n``: ``(H, n, D)``."""
        return self.buffer[row, :, first - self.start:first - self.start + n, :]

    @property
    def held(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.shape[2])

    @property
    def end(self) -> int:
        return self.start + self.held

    def append(self, x: torch.Tensor) -> None:
        if self.buffer is None:
            self.buffer = x.detach().clone()  # ours: coded blocks are written into it in place
            if self.block and x.dtype.itemsize > 2:
                self.window_dtype = torch.float16
            elif self.block:
                self.window_dtype = x.dtype
        else:
            self.buffer = torch.cat([self.buffer, x.detach()], dim=2)
        if self.mask is not None:
            ones = torch.ones(x.shape[:2] + (x.shape[2],), dtype=torch.bool, device=self.mask.device)
            self.mask = torch.cat([self.mask, ones], dim=2)
        self.precise += int(x.shape[2])

    def round_window(self, newest: int) -> None:
        """Streaming: hold the ``newest`` precise tokens in the 16-bit window dtype."""
        n = min(newest, self.precise)
        if n and self.window_dtype is not None and self.window_dtype != self.buffer.dtype:
            tail = self.buffer[:, :, self.held - n:, :]
            _write(tail, tail.to(self.window_dtype).to(self.buffer.dtype))

    def span(self, n: int) -> tuple[int, int, np.ndarray]:
        """Buffer indices ``a, b`` of the oldest ``n`` precise tokens, and their absolute positions."""
        a = self.held - self.precise
        return a, a + n, np.arange(self.start + a, self.start + a + n)

    def rows(self, a: int, b: int) -> list[np.ndarray]:
        """Per batch row, buffer tokens ``a..b`` as float32 numpy ``(H, b - a, D)``."""
        return [self.buffer[r, :, a:b, :].float().cpu().numpy() for r in range(self.buffer.shape[0])]

    def code(self, n: int, context: Callable[[int, np.ndarray], LayerContext]) -> None:
        """Code the oldest ``n`` precise tokens as one segment and put their decoding in the buffer."""
        a, b, positions = self.span(n)
        coder, coded = self.coder, []
        for r in range(self.buffer.shape[0]):
            x = self.buffer[r, :, a:b, :].float()
            with _threads_for(x.numel()):
                coder.fit(x, positions, (lambda r=r: context(r, positions)) if coder.needs_context else None)
                enc = coder.encode(x)
                coded.append((enc, coder.decode(enc), coder.shared_bytes()))
        self.store(a, b, coded)

    def store(self, a: int, b: int, coded: list[tuple[Encoded, np.ndarray | torch.Tensor, int]]) -> None:
        """Keep the ``(Encoded, decoding, shared-state bytes)`` of each batch row for buffer tokens ``a..b``."""
        masks = []
        for r, (enc, decoded, _) in enumerate(coded):
            masks.append(self.coder.token_mask(enc))  # (H, b - a) bool tensor or None
            _write(self.buffer[r, :, a:b, :], torch.as_tensor(decoded))
        self.segments.append(_Segment(self.start + a, b - a, [c[0] for c in coded], sum(c[2] for c in coded)))
        self.precise -= b - a
        if any(m is not None for m in masks):
            if self.mask is None:
                self.mask = torch.ones(self.buffer.shape[:3], dtype=torch.bool, device=self.buffer.device)
            for r, m in enumerate(masks):
                if m is not None:
                    _write(self.mask[r, :, a:b], m)

    def keep_last(self, n: int) -> None:
        """Sliding window: hold only the newest ``n`` tokens; drop segments that are entirely older."""
        drop = self.held - n
        if drop <= 0:
            return
        self.buffer = self.buffer[:, :, drop:, :]
        if self.mask is not None:
            self.mask = self.mask[:, :, drop:]
        self.start += drop
        self.precise = min(self.precise, n)
        self.segments = [s for s in self.segments if s.end > self.start]

    def footprint(self) -> dict[str, int]:
        """``stored_bytes`` (coded blocks + shared state + precise tokens) and ``elements`` held."""
        if self.buffer is None:
            return {"stored_bytes": 0, "elements": 0, "precise_tokens": 0}
        batch, heads, _, dim = self.buffer.shape
        itemsize = (self.window_dtype or self.buffer.dtype).itemsize
        coded = sum(s.nbytes for s in self.segments)
        return {"stored_bytes": coded + self.precise * batch * heads * dim * itemsize,
                "elements": self.held * batch * heads * dim, "precise_tokens": self.precise}

    def reorder(self, index: torch.Tensor) -> None:
        """Batch rows in the order ``index`` (beam search, ``num_return_sequences``)."""
        if self.buffer is None:
            return
        self.buffer = self.buffer.index_select(0, index.to(self.buffer.device))
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index.to(self.mask.device))
        rows = index.tolist()
        for s in self.segments:
            s.rows = [s.rows[i] for i in rows]


def _shared_bytes(codec: Codec) -> int:
    return sum(int(v.nbytes) for v in codec.shared_state().values())


def code_pair(first: _Track, second: _Track, first_context: Callable[[int, np.ndarray], LayerContext],
              second_context: Callable[[int, np.ndarray], LayerContext], first_layer: int) -> None:
    """Code all precise tokens of two adjacent layers' tracks together with a cross-layer codec
    (:class:`~kvtool.codecs.structure.crosslayer.PairCodec`): what they share is stored once, in the first layer's
    Encoded; the second's records ``meta.partner`` and decodes with the first's arrays, as a reader would."""
    a, b, positions = first.span(first.precise)
    a2, b2, _ = second.span(second.precise)
    out_a, out_b = [], []
    for r, (xa, xb) in enumerate(zip(first.rows(a, b), second.rows(a2, b2), strict=True)):
        with _threads_for(xa.size):
            first.codec.fit(xa, first_context(r, positions))
            enc_a, enc_b = first.codec.encode_pair(xa, xb, first_context(r, positions),
                                                   second_context(r, positions))
            enc_b.meta[PARTNER] = first_layer
            out_a.append((enc_a, first.codec.decode(enc_a), _shared_bytes(first.codec)))
            out_b.append((enc_b, second.codec.decode(with_partner(enc_b, enc_a)), 0))
    first.store(a, b, out_a)
    second.store(a2, b2, out_b)


def _single_rope(model: Any) -> RopeParams | None:
    """The rotary embedding of a model that has exactly one (Llama-like), for codecs that move queries to
    other positions (``expected``); None for a config, no RoPE, or several bases (Gemma 3's local and
    global), where which layer uses which would need a forward pass to tell (``kvtool capture`` does that)."""
    if not hasattr(model, "modules"):
        return None
    found: list[RopeParams] = []
    for cand in rope_candidates(model):
        if not any(cand == f for f in found):
            found.append(cand)
    return found[0] if len(found) == 1 else None


@contextlib.contextmanager
def _threads_for(elements: int) -> Iterator[None]:
    """One torch thread for small blocks: waking a thread pool costs more than coding a few thousand
    values (measured 3-30x slower with 2 threads on a shared machine), and a cache codes many small blocks."""
    threads = torch.get_num_threads()
    if elements >= SMALL_BLOCK or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target[...] = source``, also when ``target`` was made under ``torch.inference_mode``."""
    with torch.inference_mode(target.is_inference()):
        target.copy_(source.to(device=target.device, dtype=target.dtype))


# ---------------------------------------------------------------------------------------------- layers


class CodecLayer(DynamicLayer):
    """A cache layer whose keys and values are coded by kvtool codecs (see the module docstring)."""

    is_croppable = False

    def __init__(self, index: int, keys: Codec, values: Codec, mode: str, queries: int = DEFAULT_QUERIES,
                 sliding_window: int | None = None, compact: bool = False, codes: bool = False) -> None:
        CacheLayerMixin.__init__(self)  # not super(): in CodecSlidingLayer that is the sliding layer's init
        self._init_args = (index, keys, values, mode, queries, sliding_window, compact, codes)
        self.codes = codes  # compact only: attention computed from the codes (kvtool.runtime.code_attention)
        self.awaiting_codes = False
        self._reading: tuple[CompactTrack, CompactTrack] | None = None  # what the pending attention call reads
        self.index = index
        self.rope: RopeParams | None = None  # the model's rotary embedding, when one serves every layer
        self.mode = mode
        self.compact = compact
        self.cumulative_length = 0
        self.window = sliding_window
        track = CompactTrack if compact else _Track  # coded blocks + window only, or a decoded working copy
        self.tracks = {role: track(codec, codec.streaming_form()[0] if mode == "streaming" else 0)
                       for role, codec in (("keys", keys), ("values", values))}
        if mode == "streaming":
            for track in self.tracks.values():
                track.codec = track.codec.streaming_form()[1]
        self.max_queries = queries
        self.query_record: QueryRecord | None = None
        self.reconstruction: np.ndarray | None = None  # (kv_heads, prompt): kvzip's scores, where eval gives them
        self.returned_keep: torch.Tensor | None = None  # (B, Hkv, Tk) for the keys last returned
        self.mask_applied = True

    # -- transformers' layer API --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H, t, D)`` new keys/values; return what attention reads (this layer's whole cache,
        or for a sliding-window layer the window plus the new tokens)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.awaiting_codes:
            raise KvtoolError("the model's attention did not go through kvtool's: attention from codes needs "
                              "kvtool.hooks.install_attention(model) (CodecCache(model, ...) does it)")
        if not self.mask_applied:
            raise KvtoolError("the model's attention did not apply kvtool's eviction mask: token selectors need "
                              "kvtool.hooks.install_attention(model) (CodecCache(model, ...) does it) and a model "
                              "whose attention goes through transformers' AttentionInterface")
        t = int(key_states.shape[2])
        self.cumulative_length += t
        for track, x in ((self.tracks["values"], value_states), (self.tracks["keys"], key_states)):
            if track.buffer is None:
                track.start = self.cumulative_length - t
            track.append(x)
        if self.mode == "streaming":
            for track in (self.tracks["values"], self.tracks["keys"]):  # values first: see compress()
                while track.block and track.precise >= track.block:
                    self._code(track, track.block)
                track.round_window(t)
        self.awaiting_codes = self.codes and any(t.segments for t in self.tracks.values())
        if self.awaiting_codes:  # attention reads the codes itself (attend): hand it the precise windows only
            self._reading = (self.tracks["keys"].snapshot(), self.tracks["values"].snapshot())
            keys, values = self.tracks["keys"].buffer, self.tracks["values"].buffer
        else:
            keys, values = self.tracks["keys"].view(), self.tracks["values"].view()
        self.returned_keep = self._joint_mask()
        self.mask_applied = self.returned_keep is None
        if self.window is not None:  # like DynamicSlidingWindowLayer: return all, hold window - 1
            for track in self.tracks.values():
                track.keep_last(self.window - 1)
        self.keys, self.values = self.tracks["keys"].buffer, self.tracks["values"].buffer
        link_layer(keys, self)  # kvtool's attention finds this layer through its keys
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
               kwargs: Mapping[str, Any]) -> torch.Tensor:
        """Attention output ``(B, Tq, Hq, D)`` from this compact layer's codes (kvtool's attention calls it
        instead of the model's function when :attr:`awaiting_codes`)."""
        self.awaiting_codes = False
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
            raise KvtoolError("attention from codes supports plain softmax attention (no softcap, no learned "
                              "sinks); use CodecCache(..., attention='decode')")
        scaling = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        keys, values = self._reading
        self._reading = None
        return attend_layer(keys, values, query, mask, scaling)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.window is None:
            return self.cumulative_length + query_length, 0
        held = min(self.cumulative_length, self.window - 1)
        return held + query_length, max(self.cumulative_length - self.window + 1, 0)

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        rope = self.rope
        self.__init__(*self._init_args)
        self.rope = rope

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for track in self.tracks.values():
            track.reorder(beam_idx)
        self._sync()

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.tracks["keys"].buffer.shape[0] if self.tracks["keys"].buffer is not None else 0
        self.reorder_cache(torch.arange(rows).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).flatten())

    def crop(self, tokens_to_remove: int) -> None:
        raise KvtoolError("a CodecCache cannot be cropped (coded blocks cannot be shortened); "
                          "assisted and speculative decoding are not supported")

    # -- coding -------------------------------------------------------------------------------------
    def compress(self) -> None:
        """Code every precise token of this layer (values first, so the values codec's context sees the
        keys as they were)."""
        for role in ("values", "keys"):
            track = self.tracks[role]
            if track.precise:
                self._code(track, track.precise)
        self._sync()

    def context(self, role: str) -> Callable[[int, np.ndarray], LayerContext]:
        """``(batch row, absolute positions) -> LayerContext`` for coding this layer's ``role``: the recorded
        queries, the positions, the keys and values as the cache holds them at those positions, scaling,
        window. (Values are coded first: a keys selector that weighs tokens by ``‖v‖`` then sees the values
        codec's decoding, whose evicted rows are zero — so it keeps the tokens the values codec kept.)"""
        keys_track, values_track = self.tracks["keys"], self.tracks["values"]

        def context(row: int, positions: np.ndarray) -> LayerContext:
            rec = self.query_record
            first, n = int(positions[0]), len(positions)
            keys = keys_track.tokens(row, first, n).float().cpu().numpy()
            values = values_track.tokens(row, first, n).float().cpu().numpy()
            return LayerContext(
                layer=self.index, role=role, key_positions=positions, keys=keys, values=values, rope=self.rope,
                queries=rec.queries[row].numpy() if rec is not None else None,
                query_positions=rec.positions if rec is not None else None,
                scaling=rec.scaling if rec is not None else None, sliding_window=self.window,
                query_moments=rec.moments if rec is not None else None, reconstruction=self.reconstruction)

        return context

    def _code(self, track: _Track, n: int) -> None:
        role = "keys" if track is self.tracks["keys"] else "values"
        track.code(n, self.context(role))

    def _joint_mask(self) -> torch.Tensor | None:
        k, v = self.tracks["keys"].mask, self.tracks["values"].mask
        if k is None:
            return v
        return k if v is None else k & v

    def _sync(self) -> None:
        self.keys, self.values = self.tracks["keys"].buffer, self.tracks["values"].buffer

    def observe(self, query: torch.Tensor, scaling: float | None) -> None:
        """Called by kvtool's attention: keep the last ``max_queries`` queries ``(B, Hq, Tq, D)``."""
        if not self.max_queries:
            return
        t = int(query.shape[2])
        q = query.detach()[:, :, -self.max_queries:, :].float().cpu()
        positions = np.arange(self.cumulative_length - t, self.cumulative_length)[-self.max_queries:]
        old = self.query_record
        if old is not None and q.shape[2] < self.max_queries and old.queries.shape[0] == q.shape[0]:
            q = torch.cat([old.queries, q], dim=2)[:, :, -self.max_queries:, :]
            positions = np.concatenate([old.positions, positions])[-self.max_queries:]
        self.query_record = QueryRecord(q, positions, float(scaling) if scaling is not None else None)

    def footprint(self) -> dict[str, dict[str, int]]:
        return {role: track.footprint() for role, track in self.tracks.items()}

    def blocks_until_flush(self) -> int | None:
        """Streaming: how many more tokens can be appended at once without a block closing before the last
        of them (None = any number)."""
        limit = None
        for track in self.tracks.values():
            if track.block > 1:
                room = track.block - track.precise  # the room-th new token closes the block
                n = room - 1 if room > 1 else 1
                limit = n if limit is None else min(limit, n)
        return limit


class CodecSlidingLayer(CodecLayer, DynamicSlidingWindowLayer):
    """:class:`CodecLayer` of a sliding-window layer (holds the last ``sliding_window - 1`` tokens)."""

    is_sliding = True

    def __init__(self, index: int, keys: Codec, values: Codec, mode: str, queries: int = DEFAULT_QUERIES,
                 sliding_window: int | None = None, compact: bool = False, codes: bool = False) -> None:
        CodecLayer.__init__(self, index, keys, values, mode, queries, sliding_window, compact, codes)
        self.sliding_window = sliding_window
        self.record_past = False
        self._sliding_window_tensor = torch.tensor(sliding_window, dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        CodecLayer.lazy_initialization(self, key_states, value_states)
        self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)


# ----------------------------------------------------------------------------------------------- cache


def _as_assignment(assignment: Any, shape: Any = None) -> Assignment:
    """An Assignment from an Assignment, a codec or spec (both roles), or a plan (a ``kvtool.codecs.planfile.Plan``
    or a plan file's ``Path``; checked against the model's geometry ``shape``)."""
    if isinstance(assignment, (Plan, os.PathLike)):
        plan = assignment if isinstance(assignment, Plan) else load_plan(assignment)
        if shape is not None:
            plan.check_geometry({g: getattr(shape, g) for g in plan.geometry}, "the model")
        return plan.assignment()
    if isinstance(assignment, Assignment):
        return assignment
    if isinstance(assignment, (Codec, str)):
        return Assignment.of(assignment, assignment)
    raise InputError(f"a CodecCache needs an Assignment, a codec spec or a plan, got {type(assignment).__name__}")


def _layer_kinds(config: Any) -> list[int | None]:
    """Per layer: None for full attention, the window for a sliding-window layer (as DynamicCache sees it)."""
    probe = DynamicCache(config=config)
    if not probe.layers:
        return [None] * int(config.get_text_config().num_hidden_layers)
    kinds: list[int | None] = []
    for i, layer in enumerate(probe.layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            kinds.append(int(layer.sliding_window))
        elif type(layer) is DynamicLayer:
            kinds.append(None)
        else:
            raise KvtoolError(f"layer {i} keeps a {type(layer).__name__}; kvtool's CodecCache supports "
                              "attention layers with a plain or sliding-window key/value cache")
    return kinds


def can_evict(codec: Codec) -> bool:
    """Whether ``codec`` may drop token rows: a token :class:`Selector`, a codec that says so (class attribute
    ``evicts``), or a composition or wrapper holding one (``Composed``; ``inner_codecs()``)."""
    if isinstance(codec, Selector) or getattr(type(codec), "evicts", False):
        return True
    if isinstance(codec, Composed):
        return can_evict(codec.head) or can_evict(codec.tail)
    inner = getattr(codec, "inner_codecs", None)
    return inner is not None and any(can_evict(c) for c in inner())


def holds_compact(assignment: Assignment, num_layers: int) -> bool:
    """Whether a ``compact=True`` :class:`CodecCache` can hold ``assignment``: every codec but a cross-layer
    one (whose blocks decode from another layer's)."""
    return not any(isinstance(assignment.codec(i, r), PairCodec) for i in range(num_layers) for r in ROLES)


class CodecCache(Cache):
    """A transformers ``Cache`` that stores keys and values through kvtool codecs.

    ``model``: the model (or its config); ``assignment``: an :class:`Assignment` (keys/values specs and
    per-layer overrides), one spec/codec for both, or a plan (:class:`kvtool.codecs.planfile.Plan` or a plan file's
    ``Path``, checked against the model's geometry); ``mode``: ``"prefill"`` or
    ``"streaming"`` (module docstring); ``queries``: how many of the last query positions kvtool's
    attention records per layer for the codecs' context. Given a model whose assignment can evict tokens,
    it installs kvtool's attention on that model (:func:`kvtool.hooks.install_attention`).

    ``compact=True`` holds only what the codecs store: per layer the coded blocks (on the model's device)
    and the precise window, decoded for each attention call and freed after it
    (:mod:`kvtool.runtime.compact`); it records queries only for codecs that read them, and in prefill
    mode drops them once the prompt is coded. The model sees the same keys and values in both modes.
    ``attention="codes"`` (compact only) computes attention from the codes where the codec allows it
    (TurboQuant mse, uniform, KIVI: :mod:`kvtool.runtime.code_attention`), equal to the decoded path up
    to float summation order; it installs kvtool's attention on the model.
    """

    def __init__(self, model: Any, assignment: Any, *, mode: str = "prefill",
                 queries: int = DEFAULT_QUERIES, compact: bool = False, attention: str = "decode") -> None:
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if attention not in ATTENTION:
            raise InputError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        if attention == "codes" and not compact:
            raise InputError("attention='codes' reads a compact cache's codes: use compact=True with it")
        config = getattr(model, "config", model)
        shape = model_shape(config)
        self.assignment = _as_assignment(assignment, shape)
        self.mode = mode
        self.compact = compact
        self.assignment.validate(shape.head_dim, shape.num_layers)
        kinds = _layer_kinds(config)
        if compact and not any(self.assignment.codec(i, r).uses_queries() for i in range(len(kinds)) for r in ROLES):
            queries = 0  # nothing reads them: a compact cache holds no query record
        layers: list[CodecLayer] = []
        for i, window in enumerate(kinds):
            codecs = {role: self.assignment.codec(i, role) for role in ROLES}
            for codec in codecs.values():
                if isinstance(codec, PairCodec):
                    codec.check_layers(len(kinds))
                    if compact:
                        raise InputError(f"compact=True cannot hold the cross-layer codec {codec.name!r} (a "
                                         "layer's blocks would decode from another layer's); use compact=False")
            if mode == "streaming":
                for codec in codecs.values():
                    codec.streaming_form()  # raises, naming the selectors that can stream
            cls = CodecLayer if window is None else CodecSlidingLayer
            layers.append(cls(i, codecs["keys"], codecs["values"], mode, queries, window, compact,
                              attention == "codes"))
        super().__init__(layers=layers)
        rope = _single_rope(model)
        for layer in layers:
            layer.rope = rope
        self._prompt_pending = mode == "prefill"  # the first forward's tokens are coded once it is over
        self.evicts = any(can_evict(t.codec) for layer in layers for t in layer.tracks.values())
        if (self.evicts or attention == "codes") and hasattr(model, "set_attn_implementation"):
            install_attention(model)

    @classmethod
    def from_cache(cls, model: Any, assignment: Assignment | Codec | str, source: Cache, *,
                   queries: Mapping[int, QueryRecord] | None = None,
                   ropes: Mapping[int, RopeParams] | None = None, compact: bool = False,
                   reconstruction: Mapping[int, np.ndarray] | None = None) -> CodecCache:
        """A prefill-mode CodecCache holding what ``source`` holds, coded as if it had been its prompt.

        ``source``: an ordinary transformers cache after a prefill (e.g. a ``DynamicCache``), left as it is;
        ``queries``: per layer, the prompt's recorded queries for the codecs' context; ``ropes``: per layer,
        the RoPE the prefill really used (``kvtool.capture.run_and_record`` records it), which replaces the
        model-wide one where a model has several (Gemma 3's local and global bases); ``reconstruction``: per
        layer, the prompt's reconstruction scores ``(kv_heads, prompt)`` (:mod:`kvtool.reconstruct`) for the
        codecs that read them (``kvzip``).
        """
        cache = cls(model, assignment, mode="prefill", queries=0, compact=compact)
        for i, rope in (ropes or {}).items():
            cache.layers[i].rope = rope
        for i, (layer, src) in enumerate(zip(cache.layers, source.layers, strict=True)):
            keys, values = src.keys, src.values
            if keys is None or keys.numel() == 0:
                continue
            layer.lazy_initialization(keys, values)
            total = int(src.get_seq_length())
            layer.cumulative_length = total
            for track, x in ((layer.tracks["keys"], keys), (layer.tracks["values"], values)):
                track.start = total - int(x.shape[2])
                track.append(x)
            if queries is not None and i in queries:
                layer.query_record = queries[i]
            if reconstruction is not None and i in reconstruction:
                layer.reconstruction = reconstruction[i]
        cache.compress()
        return cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' entry point; in prefill mode, a layer that already holds the prompt starts the second
        forward pass: every layer has the prompt by then, and all are coded together (cross-layer pairs)."""
        if self._prompt_pending and self.layers[layer_idx].cumulative_length:
            self.compress()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- kvtool API ---------------------------------------------------------------------------------
    def compress(self) -> None:
        """Code every token still held precise, in every layer (values first, then keys, so a values codec's
        context sees the keys as they were; adjacent layers whose cross-layer codec pairs them together)."""
        self._prompt_pending = False
        live = [layer for layer in self.layers if layer.is_initialized]
        for role in ("values", "keys"):
            done: set[int] = set()
            for layer in live:
                track = layer.tracks[role]
                if layer.index in done or not track.precise:
                    continue
                partner = self._partner(layer, role)
                if partner is not None:
                    code_pair(track, partner.tracks[role], layer.context(role), partner.context(role), layer.index)
                    done.add(partner.index)
                else:
                    layer._code(track, track.precise)
        for layer in live:
            layer._sync()
            if self.compact and self.mode == "prefill":  # the prompt is coded: its queries are not needed again
                layer.query_record, layer.max_queries = None, 0

    def _partner(self, layer: CodecLayer, role: str) -> CodecLayer | None:
        """The next layer, when ``layer``'s ``role`` codec is a cross-layer codec pairing it with that layer
        (same spec on both) and both hold the same tokens; else None."""
        codec = layer.tracks[role].codec
        if not isinstance(codec, PairCodec):
            return None
        other = codec.pair_of(layer.index, len(self.layers))
        if other != layer.index + 1 or self.assignment.spec(other, role) != self.assignment.spec(layer.index, role):
            return None
        mine, theirs = layer.tracks[role], self.layers[other].tracks[role]
        if theirs.buffer is None or theirs.buffer.shape != mine.buffer.shape or theirs.precise != mine.precise \
                or theirs.start != mine.start:
            return None
        return self.layers[other]

    def _settle(self) -> None:
        if self._prompt_pending and any(layer.cumulative_length for layer in self.layers):
            self.compress()

    def footprint(self) -> dict[str, dict[str, int]]:
        """``{"keys"|"values": {"stored_bytes", "elements", "precise_tokens"}}`` summed over layers; a
        prompt waiting to be coded (prefill mode, right after the first forward) is coded first."""
        self._settle()
        total = {role: {"stored_bytes": 0, "elements": 0, "precise_tokens": 0} for role in ROLES}
        for layer in self.layers:
            for role, fp in layer.footprint().items():
                for k, v in fp.items():
                    total[role][k] += v
        return total

    def stored_bytes(self) -> int:
        """Bytes the codecs store (``Encoded.nbytes``, shared state) plus every token held precise."""
        return sum(fp["stored_bytes"] for fp in self.footprint().values())

    def safe_piece(self) -> int | None:
        """Streaming: how many next tokens one forward pass may take and still give what feeding them one
        by one gives (None = any number)."""
        limits = [n for layer in self.layers if (n := layer.blocks_until_flush()) is not None]
        return min(limits) if limits else None
