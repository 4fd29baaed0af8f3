"""Rotary position embeddings (RoPE, arXiv 2104.09864) as recorded from a model: re-apply and undo them.

Capture records, per layer, what the model's own rotary module used — its inverse frequencies and
attention factor (the scale transformers folds into cos/sin for YaRN/LongRoPE; 1.0 otherwise) — read from
the module's buffers after the forward pass, so dynamic and per-layer-type variants (Gemma 3's local and
global bases) are what really ran. Each layer's parameters are checked against the ``cos``/``sin`` the
model actually handed to that layer's attention; a layer whose rotary embedding does not match this
layout (interleaved pairs, multimodal sections) gets none recorded rather than a wrong one.

Layout (transformers' ``rotate_half`` convention): with ``n = len(inv_freq)`` the first ``2n`` channels
rotate, channel ``i < n`` paired with ``i + n`` at angle ``position · inv_freq[i]``; channels from ``2n``
on pass through (partial rotary). ``post = attention_factor · R(position) · pre``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: cos/sin rows kept per layer to check the recorded parameters against what the model used.
_CHECK_ROWS = 16


@dataclass(frozen=True, eq=False)
class RopeParams:
    """One layer's rotary embedding. ``inv_freq`` ``(n,)`` float32 rotates the first ``2n`` channels."""

    inv_freq: np.ndarray
    attention_factor: float = 1.0

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, RopeParams) and self.attention_factor == other.attention_factor
                and np.array_equal(np.asarray(self.inv_freq, np.float32), np.asarray(other.inv_freq, np.float32)))

    __hash__ = None  # type: ignore[assignment]

    @property
    def rotary_dim(self) -> int:
        return 2 * int(np.asarray(self.inv_freq).shape[0])

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``cos``, ``sin`` ``(T, n)`` float64 at absolute ``positions`` ``(T,)``, without the factor.

        The angle is formed in float32 as transformers forms it (``position.float() * inv_freq``), so the
        rotation is the one the model applied, not a more precise one (they differ by ~1e-4 rad at 2k).
        """
        angle = np.asarray(positions, dtype=np.float32)[:, None] * np.asarray(self.inv_freq, np.float32)[None]
        angle = angle.astype(np.float64)
        return np.cos(angle), np.sin(angle)

    def _check(self, x: np.ndarray) -> None:
        if x.shape[-1] < self.rotary_dim:
            raise ValueError(f"RoPE rotates {self.rotary_dim} channels but the vectors have {x.shape[-1]}")

    def apply(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Pre-RoPE ``x`` ``(heads, T, d)`` at ``positions`` ``(T,)`` → post-RoPE, float32."""
        return self._rotate(x, positions, +1.0, self.attention_factor)

    def invert(self, y: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Post-RoPE ``y`` ``(heads, T, d)`` → pre-RoPE (the rotation is orthogonal: undo it exactly)."""
        return self._rotate(y, positions, -1.0, 1.0 / self.attention_factor)

    def _rotate(self, x: np.ndarray, positions: np.ndarray, sign: float, factor: float) -> np.ndarray:
        x = np.asarray(x)
        self._check(x)
        n = self.rotary_dim // 2
        cos, sin = self.cos_sin(positions)  # (T, n)
        sin = sign * sin
        x1, x2 = x[..., :n].astype(np.float64), x[..., n:2 * n].astype(np.float64)
        out = np.array(x, dtype=np.float32, copy=True)
        out[..., :n] = factor * (x1 * cos - x2 * sin)
        out[..., n:2 * n] = factor * (x2 * cos + x1 * sin)
        return out

    def matches(self, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, tol: float = 2e-3) -> bool:
        """Whether these parameters give the model's own ``cos``/``sin`` ``(T, 2n)`` (factor folded in)."""
        if cos.shape[-1] != self.rotary_dim:
            return False
        c, s = self.cos_sin(positions)
        want_c = self.attention_factor * np.concatenate([c, c], axis=-1)
        want_s = self.attention_factor * np.concatenate([s, s], axis=-1)
        scale = max(abs(self.attention_factor), 1e-6)
        return bool(np.abs(want_c - cos).max() <= tol * scale and np.abs(want_s - sin).max() <= tol * scale)


# ------------------------------------------------------------------------------------- from a live model


def rope_candidates(model: Any) -> list[RopeParams]:
    """Every (inverse frequencies, attention factor) pair held by a rotary-embedding module of ``model``.

    transformers' rotary classes keep ``inv_freq`` and ``attention_scaling``; those with one basis per
    layer type (Gemma 3) keep ``<type>_inv_freq`` and ``<type>_attention_scaling``
    (``ROPE_INIT_FUNCTIONS`` fills both). The ``original_`` copies are the pre-dynamic-update values.
    """
    out: list[RopeParams] = []
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        for name, buf in module.named_buffers(recurse=False):
            if not name.endswith("inv_freq") or "original" in name:
                continue
            prefix = name[: -len("inv_freq")]
            factor = getattr(module, prefix + "attention_scaling", 1.0)
            inv = buf.detach().float().cpu().numpy().astype(np.float32)
            out.append(RopeParams(inv, float(factor if factor is not None else 1.0)))
    return out


class RopeRecorder:
    """Forward pre-hooks noting the ``position_embeddings`` (cos, sin) each attention layer receives.

    Use around one forward pass; :meth:`params` then maps each layer to the module parameters that
    reproduce what it received (``None`` for a layer none reproduces).
    """

    def __init__(self, model: Any) -> None:
        self.seen: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._handles = []
        for module in model.modules():
            layer = getattr(module, "layer_idx", None)
            if layer is None or not hasattr(module, "forward"):
                continue
            self._handles.append(module.register_forward_pre_hook(self._hook(int(layer)), with_kwargs=True))

    def _hook(self, layer: int):
        def note(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            emb = kwargs.get("position_embeddings")
            if layer in self.seen or not isinstance(emb, (tuple, list)) or len(emb) != 2:
                return
            cos, sin = emb
            if getattr(cos, "ndim", 0) < 2:
                return
            cos, sin = cos.reshape(-1, cos.shape[-2], cos.shape[-1])[0], sin.reshape(-1, sin.shape[-2],
                                                                                    sin.shape[-1])[0]
            t = int(cos.shape[0])
            rows = np.unique(np.linspace(0, t - 1, min(_CHECK_ROWS, t)).round().astype(np.int64))
            pos = kwargs.get("position_ids")
            positions = (pos.reshape(-1)[rows].cpu().numpy() if pos is not None and pos.numel() == t
                         else rows)
            self.seen[layer] = (positions, cos[rows].float().cpu().numpy(), sin[rows].float().cpu().numpy())

        return note

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def params(self, model: Any) -> dict[int, RopeParams]:
        """Per layer, the first rotary-module parameters matching the cos/sin that layer received."""
        candidates = rope_candidates(model)
        found: dict[int, RopeParams] = {}
        for layer, (positions, cos, sin) in self.seen.items():
            for cand in candidates:
                if cand.matches(positions, cos, sin):
                    found[layer] = cand
                    break
        return found
