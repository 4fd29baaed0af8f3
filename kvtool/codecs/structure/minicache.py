"""``minicache``: adjacent layers share per-token directions, each keeps its own magnitudes
(MiniCache, arXiv 2405.14366)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvtool.codecs.base import Encoded, LayerContext, check_input, pack_selection, register, selection_mask
from kvtool.codecs.structure.crosslayer import PARTNER_PREFIX, PairCodec
from kvtool.errors import CodecError

#: The arrays of the first layer of a pair that the second reads (stored once).
SHARED = ("direction", "merged", "merged_counts", "retained", "retained_counts")


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(directions, norms) of ``x`` ``(heads, T, d)``; a zero vector keeps a zero direction."""
    norms = np.linalg.norm(x, axis=-1)  # (heads, T)
    return x / np.where(norms > 0, norms, 1.0)[..., None], norms


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation of unit vectors ``a``, ``b`` ``(..., d)``: ``t = 0`` gives ``a``, 1 gives ``b``."""
    cos = np.clip((a * b).sum(-1, keepdims=True), -1.0, 1.0)
    omega = np.arccos(cos)
    sin = np.sin(omega)
    small = sin < 1e-6  # (nearly) the same direction: linear interpolation is exact enough
    wa = np.where(small, 1.0 - t, np.sin((1.0 - t) * omega) / np.where(small, 1.0, sin))
    wb = np.where(small, t, np.sin(t * omega) / np.where(small, 1.0, sin))
    out = wa * a + wb * b
    return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def _pack(mask: np.ndarray) -> dict[str, np.ndarray]:
    """The merged/retained split ``(heads, T)`` (True = retained) as the indices of the smaller side:
    ``merged`` or ``retained`` (+ ``_counts`` when heads differ), smallest unsigned dtype."""
    name = "retained" if mask.sum() < (~mask).sum() else "merged"
    packed = pack_selection(mask if name == "retained" else ~mask)
    return {name + k[len("kept"):]: v for k, v in packed.items()}


def _retained(arrays: dict[str, np.ndarray], prefix: str, shape: tuple[int, ...]) -> np.ndarray:
    """Invert :func:`_pack` (arrays under ``prefix``): the retained-token mask ``(heads, T)``."""
    name = "retained" if prefix + "retained" in arrays else "merged"
    packed = {"kept" + k[len(prefix + name):]: v for k, v in arrays.items() if k.startswith(prefix + name)}
    mask = selection_mask(packed, shape)
    return mask if name == "retained" else ~mask


@register
@dataclass
class MiniCache(PairCodec):
    """``minicache:start=-1,t=0.6,threshold=0.1`` — from layer ``start`` on, layer pairs share directions.

    MiniCache (Liu et al., arXiv 2405.14366, §4): the pairs ``(start, start+1)``, ``(start+2, start+3)``, ...
    split each token's vector into its norm and unit direction; the two directions are merged by SLERP at
    ``t`` (0: the first layer's, 1: the second's; the paper uses 0.6) and stored once, each layer keeps its
    own norms. Tokens whose directions are further apart than ``threshold`` (angular distance
    ``arccos(cos)/π``, 0..1) are kept unmerged in both layers — kvtool's absolute rule in place of the paper's
    γ relative to the spread of distances. ``start=-1`` is the middle layer (the paper's choice). Layers before
    ``start`` (and a last unpaired layer) are stored in fp16. Stored: first layer ``direction`` (fp16, the
    merged tokens), the split as indices of its smaller side (``merged`` or ``retained``, + ``_counts`` when
    heads differ), ``norms`` (fp16, merged tokens) and ``rows`` (fp16, retained tokens); second layer
    ``norms`` and ``rows`` only.
    """

    name = "minicache"
    start: int = -1
    t: float = 0.6
    threshold: float = 0.1

    def validate(self, head_dim: int | None = None) -> None:
        if self.start < -1:
            raise CodecError(f"start must be a layer index or -1 (the middle layer), got {self.start}")
        if not 0.0 <= self.t <= 1.0:
            raise CodecError(f"t must be in [0, 1], got {self.t:g}")
        if not 0.0 <= self.threshold <= 1.0:
            raise CodecError(f"threshold must be in [0, 1] (angular distance / π), got {self.threshold:g}")

    def _start(self, num_layers: int) -> int:
        return num_layers // 2 if self.start < 0 else self.start

    def check_layers(self, num_layers: int) -> None:
        if self.start > num_layers - 2:
            raise CodecError(f"minicache start={self.start} is out of range: the model has layers "
                             f"0..{num_layers - 1} and a pair needs start <= {num_layers - 2}")

    def pair_of(self, layer: int, num_layers: int) -> int | None:
        start = self._start(num_layers)
        if layer < start:
            return None
        other = layer + 1 if (layer - start) % 2 == 0 else layer - 1
        return other if other < num_layers else None

    # -- one layer alone ---------------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        return Encoded({"data": x.astype(np.float16)}, x.shape)

    # -- a pair ------------------------------------------------------------------------------------------
    def encode_pair(self, first: np.ndarray, second: np.ndarray, first_context: LayerContext | None = None,
                    second_context: LayerContext | None = None) -> tuple[Encoded, Encoded]:
        a, b = check_input(first), check_input(second)
        if a.shape != b.shape:
            raise CodecError(f"minicache pairs layers of the same shape, got {a.shape} and {b.shape}")
        ua, na = _unit(a.astype(np.float64))
        ub, nb = _unit(b.astype(np.float64))
        distance = np.arccos(np.clip((ua * ub).sum(-1), -1.0, 1.0)) / math.pi  # (heads, T)
        merged = distance <= self.threshold
        retained = ~merged
        shared = _pack(retained)
        shared["direction"] = slerp(ua[merged], ub[merged], self.t).astype(np.float16)  # (Σ merged, d)
        own_a = {"norms": na[merged].astype(np.float16), "rows": a[retained].astype(np.float16)}
        own_b = {"norms": nb[merged].astype(np.float16), "rows": b[retained].astype(np.float16)}
        return Encoded({**shared, **own_a}, a.shape), Encoded(own_b, b.shape)

    def decode(self, enc: Encoded) -> np.ndarray:
        if "data" in enc.arrays:
            return enc.arrays["data"].astype(np.float32).reshape(enc.shape)
        prefix = PARTNER_PREFIX if PARTNER_PREFIX + "direction" in enc.arrays else ""
        if prefix + "direction" not in enc.arrays:
            raise CodecError("minicache: the second layer of a pair decodes with its partner's arrays "
                             "(kvtool.codecs.structure.crosslayer.with_partner)")
        retained = _retained(enc.arrays, prefix, enc.shape)
        out = np.zeros(enc.shape, dtype=np.float32)
        direction = enc.arrays[prefix + "direction"].astype(np.float32)
        out[~retained] = direction * enc.arrays["norms"].astype(np.float32)[:, None]
        out[retained] = enc.arrays["rows"].astype(np.float32).reshape(-1, enc.shape[2])
        return out

    def report(self, enc: Encoded) -> dict[str, object]:
        """The share of token rows merged with the partner layer (0 for a layer coded alone)."""
        rows = enc.shape[0] * enc.shape[1]
        return {"merged": 0.0 if "data" in enc.arrays else enc.arrays["norms"].size / max(rows, 1)}

    def pair_report(self, first: Encoded, second: Encoded) -> dict[str, object]:
        shared = int(sum(first.arrays[k].nbytes for k in SHARED if k in first.arrays))
        return {"merged_fraction": first.arrays["norms"].size / max(first.shape[0] * first.shape[1], 1),
                "shared_bytes": shared}
