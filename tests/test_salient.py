"""``salient``: the selector's tokens coded by ``hi``, the others by ``lo`` (kvtool.codecs.compose.salient)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.codecs import parse_spec
from kvtool.errors import CodecError

HEADS, TOKENS, DIM = 3, 200, 64


def _x(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((HEADS, TOKENS, DIM)).astype(np.float32)  # (heads, tokens, head_dim)
    x *= rng.uniform(0.2, 3.0, size=(HEADS, TOKENS, 1)).astype(np.float32)  # norms knorm can rank
    return x


def _round_trip(spec: str, x: np.ndarray):
    codec = parse_spec(spec).for_role("keys")
    codec.fit(x)
    enc = codec.encode(x)
    return codec, enc, codec.decode(enc)


def test_selected_rows_go_to_hi_the_rest_to_lo() -> None:
    x = _x()
    keep = parse_spec("knorm:keep=0.3").for_role("keys")
    keep.fit(x)
    mask = keep.keep_mask(x)  # (heads, tokens)
    _, enc, y = _round_trip("salient:select=[knorm:keep=0.3],hi=[fp16],lo=[turboquant:bits=1]", x)
    np.testing.assert_array_equal(y[mask], x[mask].astype(np.float16).astype(np.float32))
    assert not np.allclose(y[~mask], x[~mask], atol=1e-2)  # 1-bit rows are coarse, but restored
    cos = (y[~mask] * x[~mask]).sum(-1) / np.linalg.norm(y[~mask], axis=-1) / np.linalg.norm(x[~mask], axis=-1)
    assert cos.mean() > 0.7  # 1-bit TurboQuant keeps each row's direction roughly (≈ 0.8 for Gaussians)
    np.testing.assert_array_equal(np.unpackbits(enc.arrays["mask"], axis=1, count=TOKENS).astype(bool), mask)


def test_cheaper_than_fp16_and_closer_than_eviction() -> None:
    x = _x(1)
    _, enc, y = _round_trip("salient:select=[knorm:keep=0.3],hi=[turboquant:bits=4],lo=[turboquant:bits=1]", x)
    _, enc_evict, y_evict = _round_trip("knorm:keep=0.3+turboquant:bits=4", x)
    err, err_evict = float(((y - x) ** 2).sum()), float(((y_evict - x) ** 2).sum())
    assert err < 0.5 * err_evict  # evicted rows count as their whole energy
    n = round(0.3 * TOKENS)
    expected = (HEADS * n * (4 * DIM + 16) + HEADS * (TOKENS - n) * (DIM + 16) + 8 * HEADS * -(-TOKENS // 8))
    assert enc.nbytes * 8 == expected  # codes, norms, the mask: every bit counted


def test_head_adaptive_selection_and_evicting_lo() -> None:
    x = _x(2)
    x[0] *= 4.0  # head 0 wins most of the layer's shared budget
    codec, enc, y = _round_trip("salient:select=[knorm:keep=0.25,per_head=true],hi=[fp16],"
                                "lo=[knorm:keep=0.5+fp16]", x)
    mask = np.unpackbits(enc.arrays["mask"], axis=1, count=TOKENS).astype(bool)
    counts = mask.sum(axis=1)
    assert counts.sum() == HEADS * round(0.25 * TOKENS) and len(set(counts.tolist())) > 1
    restored = codec.token_mask(enc)
    assert restored is not None and restored[mask].all() and not restored[~mask].all()
    np.testing.assert_array_equal(y[restored], x[restored].astype(np.float16).astype(np.float32))
    assert (y[~restored] == 0).all()


@pytest.mark.parametrize("spec,message", [
    ("salient:select=[turboquant:bits=3]", "must be a token selector"),
    ("salient:select=[knorm:keep=2]", "keep must be in"),
    ("salient:hi=[turboquant:bits=9]", "salient hi"),
])
def test_bad_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        parse_spec(spec)


def test_spec_round_trips() -> None:
    codec = parse_spec("salient:select=[expected:keep=0.4],hi=[turboquant:bits=3],lo=[turboquant:bits=1]")
    again = parse_spec(codec.spec())
    assert again.spec() == codec.spec() and again.uses_queries() and again.observed_queries() == 1
    assert again.query_moments() == 4  # the selector reads the moments of the prompt's queries from its sink on


def test_in_the_cache_mask_eviction_equals_the_selector_with_indices() -> None:
    """``salient`` with ``lo=[drop]`` inside the model's cache keeps the rows the selector keeps: the same
    logits as the plain selector (fp16 kept rows both), with a cheaper stored selection."""
    import torch
    from test_evict_cache import tiny

    from kvtool.cache import CodecCache
    from kvtool.compat import forward_cache_kwarg
    from kvtool.hooks import restore_attention

    model = tiny()
    x = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    logits = {}
    for spec in ("expected:keep=0.5", "salient:select=[expected:keep=0.5],hi=[fp16],lo=[drop]"):
        with torch.inference_mode():
            cache = CodecCache(model, spec)
            model(input_ids=x[:, :20], use_cache=True, **{forward_cache_kwarg(model): cache})
            logits[spec] = model(input_ids=x[:, 20:], use_cache=True, **{forward_cache_kwarg(model): cache}).logits
        for layer in cache.layers:
            assert (layer.tracks["keys"].mask[0, :, :20].sum(dim=1) == 10).all()
        restore_attention(model)
    plain, masked = logits.values()
    assert torch.allclose(plain, masked, atol=1e-5)
