"""``kvquant``: KVQuant — keys quantized per channel before RoPE, values per token, dense-and-sparse
outliers, the attention sink in fp16.

Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization",
arXiv 2401.18079: key outliers sit in fixed channels *before* RoPE; RoPE mixes each channel pair with a
position-dependent angle, which smears those channels' magnitudes over pairs and makes per-channel
ranges wider after it (§3.2, "Pre-RoPE Key Quantization"). So keys are rotated back to pre-RoPE with the
layer's recorded RoPE, quantized per channel (§3.1), and rotated again when decoded; values are quantized
per token. The largest ``outliers`` share of each head's entries is kept in fp16 with its indices
(§3.4, dense-and-sparse); the first ``sink`` positions stay in fp16 (§3.5, "attention sink-aware").
The paper's non-uniform datatype (nuq, sensitivity-weighted k-means) is not implemented: the dense part
uses min/max uniform levels (``uniform``'s quantizer), per channel over all tokens of the tensor for keys
(``group`` tokens per group when ``group`` > 0) and per token over ``group`` channels for values
(0 = the whole head_dim).

Stored (all counted): the codes and fp16 scale/zero of the dense part (``q.``), outlier indices and
values, the sink rows, and the RoPE needed to rotate back (``inv_freq``, the attention factor) as shared
state. Without a recorded RoPE (a model with several bases outside ``kvtool eval``, or a cache captured
without it) keys are quantized post-RoPE and the report says ``prerope=none`` with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np

from kvtool.codecs.base import Codec, Encoded, LayerContext, check_input, check_int_range, register
from kvtool.codecs.quant.outliers import merge_outliers, split_outliers
from kvtool.codecs.quant.uniform import Uniform
from kvtool.errors import CodecError
from kvtool.rope import RopeParams

INNER, SINK = "q.", "sink"


@register
@dataclass
class KVQuant(Codec):
    """``kvquant:bits=3,outliers=0.01,sink=1,group=0,prerope=true`` — KVQuant's key and value quantizer.

    ``bits`` 1..8 for the dense part; ``outliers`` the share of each head's entries kept in fp16 (0..0.5);
    ``sink`` leading positions in fp16; ``group`` tokens per key channel group / channels per value group
    (0 = all); ``prerope`` quantize keys before RoPE (values ignore it). ``role`` is set by
    :meth:`for_role` (``auto``: per channel for keys, per token for values).
    """

    name = "kvquant"
    bits: int = 3
    outliers: float = 0.01
    sink: int = 1
    group: int = 0
    prerope: bool = True
    role: Literal["auto", "keys", "values"] = "auto"
    #: the form `kvtool plan`'s preset uses (kvtool.codecs.presets): without dense-and-sparse outliers. On
    #: Gemma 3 the fp16 outliers (1 % of entries, with their indices) cost 0.08 bits per element and lower
    #: the KLD by less than its standard error; the per-channel pre-RoPE keys are what helps (FIDELITY.md).
    sweep_variants: ClassVar[tuple[str, ...]] = ("outliers=0",)

    def validate(self, head_dim: int | None = None) -> None:
        check_int_range("bits", self.bits, 1, 8)
        if not 0 <= self.outliers < 0.5:
            raise CodecError(f"outliers must be in [0, 0.5) (a share of the entries), got {self.outliers:g}")
        if self.sink < 0 or self.group < 0:
            raise CodecError(f"sink and group must be at least 0, got sink={self.sink}, group={self.group}")
        if self.role not in ("auto", "keys", "values"):
            raise CodecError(f"role must be one of auto, keys, values, got {self.role!r}")
        self._dense().validate(head_dim)

    def for_role(self, role: str) -> Codec:
        return replace(self, role=role) if self.role == "auto" else replace(self)

    def _keys(self) -> bool:
        if self.role == "auto":
            raise CodecError("kvquant needs a role: use --keys/--values/--method (keys per channel before "
                             "RoPE, values per token)")
        return self.role == "keys"

    def _dense(self) -> Uniform:
        axis = "channel" if self.role == "keys" else "token"
        return Uniform(bits=self.bits, axis=axis, group=self.group)

    def fit(self, x: np.ndarray, context: LayerContext | None = None) -> KVQuant:
        x = check_input(x)
        super().fit(x, context)
        tokens = x.shape[1]
        positions = context.key_positions if context is not None else None
        if positions is None or len(positions) != tokens:
            positions = np.arange(tokens)
        self._positions = np.asarray(positions, dtype=np.int64)
        rope = context.rope if context is not None else None
        if rope is None and context is not None and context.rope_inv_freq is not None:
            rope = RopeParams(np.asarray(context.rope_inv_freq, dtype=np.float32), 1.0)
        self._rope = rope if self.prerope and self._keys() else None
        return self

    def _sink_rows(self) -> int:
        return int((getattr(self, "_positions", np.arange(0)) < self.sink).sum())

    def encode(self, x: np.ndarray) -> Encoded:
        x = check_input(x)
        positions = getattr(self, "_positions", None)
        if positions is None or len(positions) != x.shape[1]:
            positions = np.arange(x.shape[1])
            self._positions = positions
        if len(positions) > 1 and (np.diff(positions) != 1).any():
            raise CodecError("kvquant codes consecutive positions only (it re-applies RoPE from the first)")
        rope = getattr(self, "_rope", None)
        sink = self._sink_rows()
        arrays: dict[str, np.ndarray] = {}
        if sink:
            arrays[SINK] = x[:, :sink].astype(np.float16)
        rest = x[:, sink:]
        if rope is not None and rest.shape[1]:
            rest = rope.invert(rest, positions[sink:]).astype(np.float32)
        meta: dict[str, int | float | str] = {"pos0": int(positions[0]) if len(positions) else 0,
                                              "prerope": int(rope is not None)}
        if rest.shape[1]:
            sparse, dense = split_outliers(rest, self.outliers)
            arrays.update(sparse)
            inner = self._dense().encode(dense)
            arrays.update({INNER + k: v for k, v in inner.arrays.items()})
        return Encoded(arrays, x.shape, meta)

    def decode(self, enc: Encoded) -> np.ndarray:
        heads, tokens, dim = enc.shape
        out = np.empty(enc.shape, dtype=np.float32)
        sink = enc.arrays[SINK].shape[1] if SINK in enc.arrays else 0
        out[:, :sink] = enc.arrays[SINK] if sink else 0
        if tokens > sink:
            shape = (heads, tokens - sink, dim)
            inner = Encoded({k[len(INNER):]: v for k, v in enc.arrays.items() if k.startswith(INNER)}, shape)
            rest = merge_outliers(enc.arrays, self._dense().decode(inner))
            if enc.meta.get("prerope"):
                rope = getattr(self, "_rope", None)
                if rope is None:
                    raise CodecError("kvquant: these keys were coded before RoPE; load the layer's shared "
                                     "state (inv_freq) to decode them")
                pos0 = int(enc.meta.get("pos0", 0))
                rest = rope.apply(rest, np.arange(pos0 + sink, pos0 + tokens))
            out[:, sink:] = rest
        return out

    def report(self, enc: Encoded) -> dict[str, object]:
        if not self._keys():
            return {}
        if enc.meta.get("prerope") or not self.prerope:
            return {"prerope": "rotated" if enc.meta.get("prerope") else "none"}
        return {"prerope": "none", "warning": "kvquant: no RoPE recorded for the layer, so its keys were "
                "quantized after RoPE (as prerope=false)"}

    def shared_state(self) -> dict[str, np.ndarray]:
        rope = getattr(self, "_rope", None)
        if rope is None:
            return {}
        return {"inv_freq": np.asarray(rope.inv_freq, dtype=np.float32),
                "rope_factor": np.asarray([rope.attention_factor], dtype=np.float32)}

    def load_shared_state(self, state: dict[str, np.ndarray]) -> Codec:
        unknown = set(state) - {"inv_freq", "rope_factor"}
        if unknown:
            raise CodecError(f"codec 'kvquant' has no shared state {sorted(unknown)}")
        if "inv_freq" in state:
            self._rope = RopeParams(np.asarray(state["inv_freq"], dtype=np.float32),
                                    float(np.asarray(state.get("rope_factor", [1.0])).reshape(-1)[0]))
        return self
