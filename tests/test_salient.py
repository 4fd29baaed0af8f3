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


# -- heads that keep different numbers of rows: each head's rows coded on their own ---------------------------

RAGGED_SELECT = "knorm:keep=0.4,per_head=true"  # on _ragged_x: heads keep 16, 24 and 200 of 200 rows


def _ragged_x(seed: int = 3, offsets: float = 0.0) -> np.ndarray:
    """(heads, tokens, head_dim) whose heads knorm's shared budget splits unevenly; ``offsets`` adds a
    per-head mean of that norm (a different direction in each head)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((HEADS, TOKENS, DIM)).astype(np.float32)
    x *= rng.uniform(0.2, 3.0, size=(HEADS, TOKENS, 1)).astype(np.float32)
    x[0] *= 4.0
    x[2] *= 0.05  # knorm keeps short keys: head 2 keeps all of its rows, so its `lo` piece is empty
    mean = rng.standard_normal((HEADS, 1, DIM)).astype(np.float32)
    return x + offsets * mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def _alone(spec: str, rows: np.ndarray):
    """``spec`` fitted on and coding ``rows`` ``(1, n, d)`` by itself: (encoded, decoded)."""
    codec = parse_spec(spec).for_role("keys")
    codec.fit(rows)
    enc = codec.encode(rows)
    return enc, codec.decode(enc)


def test_ragged_mask_codes_each_head_on_its_own() -> None:
    """Each head gets its own centre and sink rows: the decode equals coding each head's rows alone, exactly."""
    hi, lo = "turboquant:bits=3,center=true,sink=4", "turboquant:bits=1,center=true"
    x = _ragged_x(offsets=3.0)
    codec, enc, y = _round_trip(f"salient:select=[{RAGGED_SELECT}],hi=[{hi}],lo=[{lo}]", x)
    mask = np.unpackbits(enc.arrays["mask"], axis=1, count=TOKENS).astype(bool)
    assert mask.sum(axis=1).tolist() == [16, 24, 200] and enc.meta["layout"] == "per_head"
    for part, spec, sel in (("hi", hi, mask), ("lo", lo, ~mask)):
        for h in range(HEADS):
            rows = x[h][sel[h]][None]  # (1, n_h, d), in position order
            if not rows.shape[1]:  # nothing stored for a head without rows in the part
                assert not [k for k in enc.arrays if k.startswith(f"{part}.{h}.")]
                continue
            alone, y_alone = _alone(spec, rows)
            assert alone.arrays.keys() == {k[len(f"{part}.{h}."):] for k in enc.arrays
                                           if k.startswith(f"{part}.{h}.")}
            for k, v in alone.arrays.items():
                np.testing.assert_array_equal(enc.arrays[f"{part}.{h}.{k}"], v)
            np.testing.assert_array_equal(y[h][sel[h]], y_alone[0])
    assert enc.arrays["hi.1.mean"].shape == (1, DIM) and enc.arrays["hi.1.sink_rows"].shape == (1, 4, DIM)
    np.testing.assert_array_equal(enc.arrays["hi.1.sink_rows"][0], x[1][mask[1]][:4].astype(np.float16))
    fresh = parse_spec(codec.spec())  # decode needs nothing fit left behind
    np.testing.assert_array_equal(fresh.decode(enc), y)
    assert fresh.token_mask(enc) is None  # every row restored


def _old_layout(spec: str, hi: str, x: np.ndarray):
    """What salient stored before the per-head layout: the mask, and ``hi``'s rows of all heads coded as one
    sequence ``(1, Σ n_h, d)`` under ``hi.``, no ``layout`` meta (``lo=[drop]`` stores nothing)."""
    from kvtool.codecs.base import Encoded

    select = parse_spec(spec).for_role("keys")._selector
    select.fit(x)
    mask = select.keep_mask(x)
    alone, y_alone = _alone(hi, x[mask][None])
    arrays = {"mask": np.packbits(mask, axis=1), **{f"hi.{k}": v for k, v in alone.arrays.items()}}
    return Encoded(arrays, x.shape, {f"hi.{k}": v for k, v in alone.meta.items()}), mask, y_alone[0]


def test_per_head_centres_beat_one_sequence_and_the_old_layout_still_decodes() -> None:
    hi = "turboquant:bits=3,center=true,sink=4"
    spec = f"salient:select=[{RAGGED_SELECT}],hi=[{hi}],lo=[drop]"
    x = _ragged_x(offsets=8.0)  # heads with very different means
    _, enc, y = _round_trip(spec, x)
    old, mask, y_old_rows = _old_layout(spec, hi, x)
    y_old = parse_spec(spec).decode(old)
    np.testing.assert_array_equal(y_old[mask], y_old_rows)  # the old file decodes as it was written
    assert (y_old[~mask] == 0).all() and (parse_spec(spec).token_mask(old) == mask).all()
    assert "hi.mean" in old.arrays and old.arrays["hi.mean"].shape == (1, DIM)  # one centre for all heads
    err, err_old = float(((y - x)[mask] ** 2).sum()), float(((y_old - x)[mask] ** 2).sum())
    assert err < 0.5 * err_old


def test_per_head_shared_state_round_trips_and_bytes_are_counted() -> None:
    """Fractional bits: each head's outlier channels are shared state under ``hi.<h>.``; a fresh codec that
    loads them decodes the same tensor. Every stored array is counted in the bits."""
    hi, lo = "turboquant:bits=3.25,center=true,sink=4,norm_bits=8,unbiased=true", "turboquant:bits=1.5"
    spec = f"salient:select=[{RAGGED_SELECT}],hi=[{hi}],lo=[{lo}]"
    x = _ragged_x(offsets=3.0)
    codec, enc, y = _round_trip(spec, x)
    state = codec.shared_state()
    assert {k: v.shape for k, v in state.items()} == {
        "hi.0.outlier_channels": (1, 16), "hi.1.outlier_channels": (1, 16), "hi.2.outlier_channels": (1, 16),
        "lo.0.outlier_channels": (1, 32), "lo.1.outlier_channels": (1, 32)}  # head 2 has no `lo` rows
    fresh = parse_spec(spec).for_role("keys")
    with pytest.raises(CodecError, match="outlier channel set"):
        fresh.decode(enc)
    np.testing.assert_array_equal(fresh.load_shared_state(state).decode(enc), y)
    with pytest.raises(CodecError, match="no shared state"):
        parse_spec(spec).load_shared_state({"mid.0.outlier_channels": state["hi.0.outlier_channels"]})

    # compress --fit-on's order (load, fit, load, encode) keeps the loaded channels; a state for a head
    # with no rows in the part here (the calibration cache's head 2 had `lo` rows) is not stored again
    from kvtool.measure import encode_tensor

    again = parse_spec(spec).for_role("keys")
    calibration = {**state, "lo.2.outlier_channels": state["lo.0.outlier_channels"]}
    enc_again, y_again = encode_tensor(again, x, None, calibration)
    np.testing.assert_array_equal(y_again, y)
    assert again.shared_state().keys() == state.keys()

    counts = np.unpackbits(enc.arrays["mask"], axis=1, count=TOKENS).astype(bool).sum(axis=1)
    # per head, m = n - 4 coded rows: codes; 4 sink rows and the mean in fp16; a log-norm byte a row and
    # channel set, with its fp16 (lo, hi) range; one `centred` bit a row, packed
    per_head_hi = [(n - 4) * (3.25 * DIM + 2 * 8) + 5 * 16 * DIM + 2 * 2 * 16 + 8 * -(-(n - 4) // 8) for n in counts]
    assert enc.nbytes == sum(a.nbytes for a in enc.arrays.values())
    report = codec.report(enc)
    assert report["hi_tokens"] == counts.sum() and report["lo_tokens"] == HEADS * TOKENS - counts.sum()
    lo_bits = sum((TOKENS - n) * (1.5 * DIM + 2 * 16) for n in counts if n < TOKENS)
    hi_bits = sum(8 * v.nbytes for k, v in enc.arrays.items() if k.startswith("hi."))
    assert report["hi_bits_per_element"] == pytest.approx(hi_bits / (counts.sum() * DIM))
    assert report["lo_bits_per_element"] == pytest.approx(lo_bits / ((HEADS * TOKENS - counts.sum()) * DIM))
    assert hi_bits == pytest.approx(sum(per_head_hi))
    assert enc.nbytes * 8 == hi_bits + lo_bits + 8 * enc.arrays["mask"].nbytes


def test_per_head_layout_survives_compress_and_decompress(tmp_path) -> None:
    from _synth_cache import HEAD_DIM, KV_HEADS, gaussian, write_cache

    from kvtool.codecs import parse_pair
    from kvtool.compress import compress, decompress, read_tensor
    from kvtool.store import CacheReader

    rng = np.random.default_rng(5)

    def layer(i: int):
        k = gaussian(rng, KV_HEADS, 64, HEAD_DIM) + 3.0 * gaussian(rng, KV_HEADS, 1, HEAD_DIM)
        k[0] *= 4.0  # head 0's keys are long: knorm's shared budget goes mostly to head 1
        return k, gaussian(rng, KV_HEADS, 64, HEAD_DIM), None

    src, out, back = write_cache(tmp_path / "c.h5", 1, 64, layer), tmp_path / "c.z.h5", tmp_path / "c.d.h5"
    spec = "salient:select=[knorm:keep=0.5,per_head=true],hi=[turboquant:bits=3.25,center=true,sink=4],lo=[drop]"
    keys, values = parse_pair(keys=spec, values="fp16")
    compress(src, keys, values, output=out)
    with CacheReader(src) as reader:
        x = reader.layer(0).keys
    codec, enc, y = _round_trip(spec, x)
    assert enc.meta["layout"] == "per_head" and "hi.1.outlier_channels" in codec.shared_state()
    with CacheReader(out) as reader:
        np.testing.assert_array_equal(read_tensor(reader, 0, "keys"), y)
    decompress(out, back)
    with CacheReader(back) as reader:
        np.testing.assert_array_equal(reader.layer(0).keys, y)
