"""kvtool's attention hooks: everything kvtool registers with transformers' ``AttentionInterface``, in one place.

kvtool never forks model code. Where it must see inside attention it registers an attention function under
a name of its own (and the matching ``AttentionMaskInterface`` entry, so transformers still builds the
masks), switches the model to it, and calls the model's real attention from inside. Two functions do so:

* **Recording** (``kvtool capture``, and ``kvtool eval``'s exact prefill): :func:`recording` routes one
  forward pass through a :class:`Recorder`, which notes each layer's post-RoPE queries and the attention
  scaling the model passed, then calls the real attention.
* **Codec attention** (:class:`kvtool.cache.CodecCache`): :func:`install_attention` /
  :func:`restore_attention` / :func:`codec_attention` wrap the current implementation in a function that,
  for the key tensor a :class:`~kvtool.cache.CodecLayer` returned (linked to it by :func:`link_layer`),
  applies that layer's per-head key mask (evicted tokens: masked, never zeroed) and hands the layer the
  queries its codecs' :class:`~kvtool.codecs.base.LayerContext` needs. With any other cache it only calls
  the real attention.

:func:`real_attention` finds the function an implementation name stands for: sdpa, flash and flex from
transformers' registry; "eager" from the calling modeling module's own ``eager_attention_forward``
(softcapping and other model-specific details live there).

The layer objects this module talks to are duck-typed (``observe(query, scaling)``, ``returned_keep``,
``mask_applied``), so it imports nothing from kvtool above it.
"""

from __future__ import annotations

import contextlib
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvtool.errors import KvtoolError

#: Prefix of the attention name registered while a forward pass is recorded.
RECORD_PREFIX = "kvtool_capture_"
#: Prefix of the attention name installed for a CodecCache.
CACHE_PREFIX = "kvtool_cache_"
EAGER = "eager"
#: Attention implementations whose mask kvtool can extend with a per-head key mask.
MASKABLE = ("sdpa", "eager")
_LINK = "_kvtool_layer"  # attribute of the key tensor a CodecLayer returns: a weakref to that layer

#: Progress callback of a recorded pass ``(stage, done, total)``; stage is "forward" or "write".
ProgressFn = Callable[[str, int, int], None]
#: Test/research hook called for every attention call:
#: ``(layer, query, key, value, attention_output)`` with the tensors the model used.
AttentionHook = Callable[[int, Any, Any, Any, Any], None]


# ------------------------------------------------------------------------------ the real attention


def real_attention(base: str) -> Callable[..., Any]:
    """The attention function that implementation name ``base`` stands for, for wrappers to call.

    Registered implementations (sdpa, flash, flex) come from transformers' registry. "eager" is not
    registered: each modeling module defines its own ``eager_attention_forward`` (softcapping and
    other model-specific details live there), so it is looked up from the calling module.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]

    def eager(module: Any, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise KvtoolError(f"{type(module).__name__} has no eager attention function kvtool can wrap")
        return fn(module, *args, **kwargs)

    return eager


def _register(name: str, function: Callable[..., Any], base: str) -> None:
    """Register ``function`` as attention ``name``, with ``base``'s mask function (eager's if it has none):
    transformers builds no mask for attention names it does not know, which would break sliding-window
    layers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, function)
    mask_base = base if base in ALL_MASK_ATTENTION_FUNCTIONS else EAGER
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])


# ------------------------------------------------------------------------------------ recording


class Recorder:
    """Collects queries (and calls an optional hook) while one forward pass runs.

    After the pass (or the calls of a pass fed in pieces): ``queries[layer]``
    ``(q_heads, keep_last, head_dim)`` post-RoPE on the host,
    ``scaling[layer]`` (the scaling the model passed; ``head_dim ** -0.5`` when it passed none),
    ``q_heads``. ``prerope`` and ``rope`` are filled by ``kvtool capture`` (forward hooks, the rotary module).
    """

    def __init__(self, num_layers: int, keep_last: int, progress: ProgressFn | None = None,
                 hook: AttentionHook | None = None) -> None:
        self.base: Callable[..., Any] | None = None  # the real attention, set by recording()
        self.num_layers = num_layers
        self.keep_last = keep_last
        self.progress = progress
        self.hook = hook
        self.queries: dict[int, Any] = {}
        self.scaling: dict[int, float] = {}
        self.prerope: dict[int, Any] = {}
        self.rope: dict[int, Any] = {}  # layer -> kvtool.rope.RopeParams, where the model's RoPE is reproducible
        self.q_heads = 0
        #: a pass fed in pieces: the attention calls made by earlier pieces, and the calls of the whole pass
        self.calls_before = 0
        self.calls_total = num_layers

    def __call__(self, module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                 **kwargs: Any) -> Any:
        out = self.base(module, query, key, value, attention_mask, **kwargs)  # type: ignore[misc]
        layer = int(module.layer_idx)
        self.q_heads = int(query.shape[1])
        if self.keep_last:
            # query: (batch=1, q_heads, T, head_dim), post-RoPE
            q = query[0, :, -self.keep_last:, :].detach().to("cpu", copy=True)
            before = self.queries.get(layer)  # a pass fed in pieces: the last keep_last over all of them
            self.queries[layer] = q if before is None else torch.cat([before, q], dim=1)[:, -self.keep_last:]
        scaling = kwargs.get("scaling", getattr(module, "scaling", None))
        self.scaling[layer] = float(scaling) if scaling is not None else float(query.shape[-1]) ** -0.5
        if self.hook is not None:
            self.hook(layer, query, key, value, out[0])
        if self.progress is not None:
            self.progress("forward", self.calls_before + layer + 1, self.calls_total)
        return out


_ACTIVE: dict[str, Recorder] = {}  # registered name -> the recorder of the pass running under it


@contextlib.contextmanager
def recording(model: Any, recorder: Recorder) -> Iterator[Recorder]:
    """Inside: every attention call of ``model`` goes through ``recorder`` (which calls the real attention);
    after: the previous implementation again, whatever happened."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = model.config._attn_implementation or EAGER
    base = previous if previous in ALL_ATTENTION_FUNCTIONS else EAGER
    name = RECORD_PREFIX + re.sub(r"\W", "_", base)

    def recording_attention(module: Any, *args: Any, **kwargs: Any) -> Any:
        return _ACTIVE[name](module, *args, **kwargs)

    _register(name, recording_attention, base)
    recorder.base = real_attention(base)
    _ACTIVE[name] = recorder
    model.set_attn_implementation(name)
    try:
        yield recorder
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.pop(name, None)


# ------------------------------------------------------------------------------ codec attention


def link_layer(keys: torch.Tensor, layer: Any) -> None:
    """Mark the key tensor a cache layer hands attention, so kvtool's attention finds that layer (weakly)."""
    setattr(keys, _LINK, weakref.ref(layer))


def _linked_layer(keys: Any) -> Any:
    ref = getattr(keys, _LINK, None)
    return ref() if ref is not None else None


def extend_mask(mask: torch.Tensor | None, keep: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``mask`` (``(B, 1|Hq, Tq, Tk)`` bool or additive float, or None = plain causal) with the key rows
    where ``keep`` ``(B, Hkv, Tk)`` is False masked out for every query head reading them (GQA)."""
    batch, q_heads, q_len, _ = query.shape
    keep_q = keep.repeat_interleave(q_heads // keep.shape[1], dim=1)[:, :, None, :]  # (B, Hq, 1, Tk)
    if mask is None:  # transformers skipped a causal mask: the queries are the last q_len positions
        k_len = keep.shape[-1]
        qpos = torch.arange(k_len - q_len, k_len, device=keep.device)[:, None]
        mask = torch.arange(k_len, device=keep.device)[None, :] <= qpos  # (Tq, Tk)
        mask = mask[None, None]
    if mask.dtype == torch.bool:
        return mask & keep_q
    return mask.masked_fill(~keep_q, torch.finfo(mask.dtype).min)


def _codec_wrapper(base_name: str) -> Callable[..., Any]:
    """kvtool's attention around ``base_name``: a linked layer's key mask and query recording, then the real
    attention."""
    base = real_attention(base_name)

    def kvtool_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
        layer = _linked_layer(key)
        if layer is not None:
            scaling = kwargs.get("scaling", getattr(module, "scaling", None))
            layer.observe(query, scaling)
            keep = layer.returned_keep
            if keep is not None:
                if base_name not in MASKABLE:
                    raise KvtoolError(f"token eviction needs attention {' or '.join(MASKABLE)}, the model uses "
                                      f"{base_name!r}; load it with attn_implementation='sdpa'")
                attention_mask = extend_mask(attention_mask, keep.to(query.device), query)
                layer.mask_applied = True
            if getattr(layer, "awaiting_codes", False):  # a compact layer with attention="codes" reads its codes
                return layer.attend(query, attention_mask, scaling, kwargs), None
        return base(module, query, key, value, attention_mask, **kwargs)

    return kvtool_attention


def install_attention(model: Any) -> str:
    """Switch ``model`` to kvtool's attention function wrapping its current one; return the previous name.

    The wrapper applies CodecCache eviction masks and records queries for the codecs' context; with any
    other cache it just calls the real attention. Idempotent. Undo with :func:`restore_attention`.
    """
    current = model.config._attn_implementation or EAGER
    if current.startswith(CACHE_PREFIX):
        return current[len(CACHE_PREFIX):]
    name = CACHE_PREFIX + re.sub(r"\W", "_", current)
    _register(name, _codec_wrapper(current), current)
    model.set_attn_implementation(name)
    return current


def restore_attention(model: Any) -> None:
    """Undo :func:`install_attention` (no-op if kvtool's attention is not installed)."""
    current = model.config._attn_implementation or ""
    if current.startswith(CACHE_PREFIX):
        model.set_attn_implementation(current[len(CACHE_PREFIX):])


@contextlib.contextmanager
def codec_attention(model: Any) -> Iterator[None]:
    """Context manager: kvtool's attention on ``model`` inside, the previous implementation after."""
    was_installed = (model.config._attn_implementation or "").startswith(CACHE_PREFIX)
    install_attention(model)
    try:
        yield
    finally:
        if not was_installed:
            restore_attention(model)
