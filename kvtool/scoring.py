"""The model's output head, applied a slice of positions at a time, so scoring never holds (tokens × vocab).

A causal LM's forward pass ends with its head (``model.get_output_embeddings()``, the LM head) turning the
final hidden states ``(1, T, hidden)`` into logits ``(1, T, vocab)``: at 8,192 tokens and a 49,152-token
vocabulary that is 1.6 GB of float32, at a 262,144-token vocabulary 8.6 GB. kvtool's scoring only needs the
hidden states, which are ``vocab / hidden`` times smaller (85× for SmolLM2), and applies the head itself to
a few rows at a time (:func:`kvtool.metrics.sliced_next_token_stats`).

How, for any family, without forking model code: during the pass a forward pre-hook on the head records
what the head reads — the final hidden states, after whatever the model does before its head (its final
norm) — and hands the head only the last position, so the model computes one row of logits.
:class:`LogitHead` then runs the same head module on any slice, followed by the transforms known families
apply after their head (Gemma 2/3: ``final_logit_softcapping``; Cohere: ``logit_scale``; Granite:
``logits_scaling``).

That this reproduces the model's logits is checked, not assumed: :meth:`LogitHead.for_model` compares the
sliced head against the model's own logits on a few tokens. A family that does something else after its
head fails the check and is scored from the model's full logits, as before (memory tokens × vocabulary);
``LogitHead.form`` says which (``"sliced"`` or ``"logits"``) and eval reports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

import torch

from kvtool import metrics
from kvtool.compat import forward_cache_kwarg

SLICED = "sliced"
LOGITS = "logits"
#: Agreement needed between the sliced head and the model's own logits (relative to their largest
#: magnitude): both are the same module on the same rows, so in practice they agree bit for bit.
CHECK_TOLERANCE = 1e-4


#: glibc's mallopt parameter for the size above which allocations are mmapped (and unmapped when freed).
_M_MMAP_THRESHOLD = -3
#: The fixed threshold :func:`bounded_heap` sets. The float64 slices of the head's output are 4-32 MiB each,
#: and each layer's cache grows a piece at a time through blocks of every size on the way (SmolLM2: 384 KiB
#: per 512 positions, 3 MiB at 4k, 6 MiB at 8k): from the heap, each freed block would stay resident.
MMAP_THRESHOLD = 1 << 20
_heap_bounded = False


def bounded_heap() -> None:
    """Make large allocations go straight to the OS and back (glibc only; elsewhere a no-op).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which blocks of
    that size come from the heap instead; the many same-sized temporaries of sliced scoring, interleaved
    with small long-lived arrays, then fragment the heap and the process keeps hundreds of MiB it does not
    use (measured: 1.46 GB instead of 0.62 GB for a 262,144-token vocabulary). A fixed threshold turns the
    adjustment off: every block of 1 MiB or more is mapped when allocated and returned when freed.
    """
    global _heap_bounded
    if _heap_bounded or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt: nothing to tune
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _heap_bounded = True


class LogitHead:
    """The model's head as a function of its input: ``(rows, hidden)`` → logits ``(rows, vocab)``.

    In ``"logits"`` form (a model whose logits kvtool cannot reproduce from its head) the "hidden states"
    are the logits themselves and the head is the identity.
    """

    def __init__(self, model: Any, form: str = SLICED) -> None:
        self.model = model
        self.module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.form = form if self.module is not None else LOGITS
        config = model.config
        weight = getattr(self.module, "weight", None)
        self.vocab = int(weight.shape[0]) if weight is not None else int(getattr(config, "vocab_size", 0) or 0)
        self._softcap = getattr(config, "final_logit_softcapping", None)
        scale = getattr(model, "logit_scale", None)  # Cohere multiplies its logits by a float
        self._scale = float(scale) if isinstance(scale, (int, float)) else None
        div = getattr(config, "logits_scaling", None)  # Granite divides them
        self._divide = float(div) if isinstance(div, (int, float)) and div not in (0, 1) else None

    @classmethod
    def for_model(cls, model: Any, sample_ids: torch.Tensor) -> LogitHead:
        """The sliced head if it reproduces the model's logits on ``sample_ids`` ``(1, t)``, else the
        ``"logits"`` form."""
        head = cls(model)
        if head.form == SLICED and not head.reproduces(sample_ids):
            head = cls(model, LOGITS)
        return head

    @property
    def rows(self) -> int:
        """Positions per slice: a ``(rows, vocab)`` float64 block stays near :data:`metrics.SLICE_ELEMENTS`."""
        return metrics.slice_rows(self.vocab) if self.form == SLICED else metrics.LOGIT_BLOCK

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``(rows, vocab)`` of hidden states ``(rows, hidden)``."""
        if self.form == LOGITS:
            return hidden
        weight = getattr(self.module, "weight", None)
        if weight is not None:  # an offloaded head (weights on "meta") gets its input moved by accelerate
            hidden = hidden.to(dtype=weight.dtype) if weight.device.type == "meta" else hidden.to(
                device=weight.device, dtype=weight.dtype)
        logits = self.module(hidden)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        if self._scale is not None:
            logits = logits * self._scale
        if self._divide is not None:
            logits = logits / self._divide
        return logits

    def reproduces(self, sample_ids: torch.Tensor) -> bool:
        """Whether the head on recorded hidden states gives the model's own logits for ``sample_ids``."""
        with torch.inference_mode():
            full = self.model(input_ids=sample_ids, use_cache=False).logits[0].float()  # (t, vocab)
            seen: list[torch.Tensor] = []
            with self.recording(seen):
                self.model(input_ids=sample_ids, use_cache=False)
            if len(seen) != 1 or seen[0].shape[-2] != sample_ids.shape[1]:
                return False
            mine = self(seen[0][0]).float()
        if mine.shape != full.shape:
            return False
        scale = float(full.abs().max()) or 1.0
        return float((mine.cpu() - full.cpu()).abs().max()) <= CHECK_TOLERANCE * scale

    def recording(self, seen: list[torch.Tensor]) -> Any:
        """A context in which the head's input is appended to ``seen`` and the head computes only the last
        position (the model's forward then returns ``(1, 1, vocab)`` logits)."""

        def keep_last(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            seen.append(args[0])
            return (args[0][..., -1:, :], *args[1:])

        return _Hooked(self.module, keep_last)


class _Hooked:
    def __init__(self, module: Any, hook: Any) -> None:
        self.module, self.hook, self.handle = module, hook, None

    def __enter__(self) -> None:
        self.handle = self.module.register_forward_pre_hook(self.hook)

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


#: Positions per forward call when a pass may be split (:func:`forward_hidden` with ``pieces``): the
#: activations of one call (MLP intermediates, the attention mask) then stop growing with the pass.
PIECE = 512


def forward_hidden(model: Any, ids: torch.Tensor, cache: Any, head: LogitHead, *, pieces: bool = False
                   ) -> torch.Tensor:
    """Feed ``ids`` ``(1, t)`` to ``model`` with ``cache``; return what ``head`` reads at each position,
    ``(t, hidden)`` (in ``"logits"`` form: the logits ``(t, vocab)``).

    ``pieces``: feed at most :data:`PIECE` positions per forward call. Teacher-forced decoding with a cache
    gives the same states whatever the split (up to float rounding); only pass it for a cache that appends
    what it is given (an exact ``DynamicCache``, a prefill-mode ``CodecCache`` after its prompt).
    """
    step = PIECE if pieces else int(ids.shape[1])
    parts = [_forward_hidden(model, ids[:, s:s + step], cache, head) for s in range(0, int(ids.shape[1]), step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _forward_hidden(model: Any, ids: torch.Tensor, cache: Any, head: LogitHead) -> torch.Tensor:
    kwargs: dict[str, Any] = {forward_cache_kwarg(model): cache, "use_cache": True}
    if head.form == LOGITS:
        return model(input_ids=ids, **kwargs).logits[0]
    seen: list[torch.Tensor] = []
    with head.recording(seen):
        model(input_ids=ids, **kwargs)
    if len(seen) != 1 or seen[0].shape[-2] != ids.shape[1]:
        raise RuntimeError(f"the model's head read {[tuple(s.shape) for s in seen]} for {tuple(ids.shape)} "
                           "input ids; expected one (1, t, hidden) input")
    return seen[0][0]
