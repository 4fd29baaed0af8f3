"""``heads[a|b|...]``: one codec per KV head, as plans write them; an ordinary codec to every consumer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from kvtool.codecs import Encoded, LayerContext, parse_spec
from kvtool.codecs.base import Selector
from kvtool.codecs.compose.heads import PerHead, head_context
from kvtool.errors import CodecError

SPEC = "heads[turboquant:bits=2.5|kivi:bits=2,group=16,residual=8|fp16]"


def tensor(heads: int = 3, tokens: int = 48, d: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((heads, tokens, d)).astype(np.float32)


def test_each_head_is_coded_alone_and_bytes_add_up() -> None:
    x = tensor()
    codec = parse_spec(SPEC).for_role("keys")
    assert isinstance(codec, PerHead) and parse_spec(codec.spec()).spec() == codec.spec()
    assert "axis=channel" in codec.spec()  # KIVI resolved its axis for the role, inside the composite
    codec.fit(x)
    enc = codec.encode(x)
    x_hat = codec.decode(enc)
    total = 0
    for h, spec in enumerate(["turboquant:bits=2.5", "kivi:bits=2,group=16,residual=8", "fp16"]):
        part = parse_spec(spec).for_role("keys").fit(x[h:h + 1])
        part_enc = part.encode(x[h:h + 1])
        np.testing.assert_array_equal(x_hat[h:h + 1], part.decode(part_enc))
        total += part_enc.nbytes
    assert enc.nbytes == total and all(k.startswith(("h0.", "h1.", "h2.")) for k in enc.arrays)
    state = codec.shared_state()
    assert list(state) == ["h0.outlier_channels"]
    fresh = parse_spec(codec.spec()).load_shared_state(state)  # what decompress does
    np.testing.assert_array_equal(fresh.decode(enc), x_hat)


def test_bad_per_head_specs() -> None:
    x = tensor()
    with pytest.raises(CodecError, match="holds 2 codec"):
        parse_spec("heads[fp16|fp16]").encode(x)
    for bad, message in (("heads[fp16||fp16]", "empty codec spec"), ("heads[fp16|fp8", "heads\\[SPEC"),
                         ("heads[heads[fp16]|fp16]", "cannot be nested"),
                         ("heads[uniform:bits=9]", "bits must be one of")):
        with pytest.raises(CodecError, match=message):
            parse_spec(bad)


@dataclass
class _KeepFirst(Selector):
    """Keeps the first ``n`` tokens (a test selector)."""

    n: int = 8
    name: ClassVar[str] = "keepfirst"

    def select(self, x: np.ndarray) -> np.ndarray:
        return np.tile(np.arange(self.n), (x.shape[0], 1))


def test_token_mask_joins_the_parts() -> None:
    x = tensor(heads=2, tokens=16)
    codec = PerHead((_KeepFirst(), parse_spec("fp16")))
    enc = codec.fit(x).encode(x)
    mask = codec.token_mask(enc)
    assert mask.shape == (2, 16) and mask[0, :8].all() and not mask[0, 8:].any() and mask[1].all()
    assert PerHead((parse_spec("fp16"), parse_spec("fp16"))).token_mask(Encoded({}, (2, 16, 32))) is None


def test_context_is_cut_to_the_head() -> None:
    q = np.arange(6 * 4 * 2, dtype=np.float32).reshape(6, 4, 2)  # 6 query heads over 3 KV heads
    k = np.arange(3 * 5 * 2, dtype=np.float32).reshape(3, 5, 2)
    ctx = LayerContext(layer=2, role="keys", queries=q, query_positions=np.arange(4), key_positions=np.arange(5),
                       keys=k)
    cut = head_context(ctx, 1, 3)
    np.testing.assert_array_equal(cut.queries, q[2:4])
    np.testing.assert_array_equal(cut.keys, k[1:2])
    np.testing.assert_array_equal(cut.key_positions, np.arange(5))
    assert cut.layer == 2 and head_context(None, 0, 3) is None


def test_parts_may_hold_bracketed_values() -> None:
    spec = "heads[age:bands=[0-16:fp16;16-:turboquant:bits=4]|fp16]"
    codec = parse_spec(spec)
    assert isinstance(codec, PerHead) and len(codec.parts) == 2 and codec.parts[0].name == "age"
    assert parse_spec(codec.spec()).spec() == codec.spec()
