"""The hook for codecs that code two adjacent layers together (cross-layer sharing, MiniCache).

:func:`kvtool.compress.compress` streams a cache one layer at a time. When the codec of a layer's keys or
values is a :class:`PairCodec` whose :meth:`~PairCodec.pair_of` names the next layer (with the same spec),
compress holds that layer until the next one is read — two layers in memory, never more — and calls
:meth:`~PairCodec.encode_pair` once for both. What the pair shares is stored once, in the first layer's
group; the second layer's group records ``meta.partner`` (the first layer's index) and its decode reads
the first layer's stored arrays under the prefix ``partner.`` (:func:`with_partner`). ``decompress`` does
the same from the file, so the shared part is counted once and read by both.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np

from kvtool.codecs.base import Codec, Encoded, LayerContext

#: Meta key of the second layer of a pair: the index of the first, whose arrays it reads.
PARTNER = "partner"
#: Prefix of the first layer's arrays inside the second layer's Encoded while decoding.
PARTNER_PREFIX = "partner."


class PairCodec(Codec):
    """A codec that may code layer ``l`` together with an adjacent layer.

    On its own (a layer outside every pair) it codes one tensor with :meth:`encode`/:meth:`decode` like any
    codec. In a pair, :meth:`encode_pair` codes both tensors; :meth:`decode` of the second receives the first
    one's stored arrays prefixed ``partner.``.
    """

    #: A growing cache codes each layer's blocks on their own (kvtool.CodecCache): no pair to share with.
    streaming: ClassVar[bool] = False

    @abstractmethod
    def pair_of(self, layer: int, num_layers: int) -> int | None:
        """The layer coded together with ``layer`` (``layer ± 1``), or None when it is coded alone."""

    @abstractmethod
    def check_layers(self, num_layers: int) -> None:
        """Raise CodecError when the parameters name layers the model does not have."""

    @abstractmethod
    def encode_pair(self, first: np.ndarray, second: np.ndarray, first_context: LayerContext | None = None,
                    second_context: LayerContext | None = None) -> tuple[Encoded, Encoded]:
        """Code two layers' tensors ``(heads, tokens, head_dim)`` together: (first's, second's) Encoded.
        What both share is in the first's arrays only; the second's meta holds ``partner``."""

    @abstractmethod
    def pair_report(self, first: Encoded, second: Encoded) -> dict[str, object]:
        """What sharing did for this pair (JSON values), with ``shared_bytes``: the stored bytes of the first
        layer's arrays that the second reads instead of storing its own. (compress adds ``stored_bytes``,
        ``fp16_bytes`` and ``bytes_saved`` = fp16 − stored for the two tensors.)"""


def with_partner(second: Encoded, first: Encoded) -> Encoded:
    """The second layer's Encoded with the first layer's stored arrays added under ``partner.``, for decode."""
    arrays = {**second.arrays, **{PARTNER_PREFIX + k: v for k, v in first.arrays.items()}}
    return Encoded(arrays, second.shape, dict(second.meta))
