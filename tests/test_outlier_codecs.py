"""The outlier-channel codecs on synthetic keys: dense-and-sparse indices past 65,536 entries, KVQuant's
pre-RoPE round trip, smoothing's scales."""

from __future__ import annotations

import numpy as np

from kvtool.codecs import LayerContext, parse_spec
from kvtool.codecs.quant.outliers import BLOCKS, IDX, split_outliers
from kvtool.rope import RopeParams


def keys(tokens: int = 300, d: int = 256, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((1, tokens, d)).astype(np.float32)
    x[:, :, [3, d // 2 + 7]] *= 40.0  # two outlier channels, as Gemma 3's keys have
    return x


def test_outlier_indices_past_65536_entries_cost_16_bits_and_come_back() -> None:
    x = keys()  # 76,800 entries in the head
    arrays, dense = split_outliers(x, 0.01)
    k = arrays[IDX].shape[1]
    assert arrays[IDX].dtype == np.uint16 and arrays[BLOCKS].shape == (1, 2) and arrays[BLOCKS].sum() == k
    codec = parse_spec("outliers:frac=0.01+uniform:bits=8")
    y = codec.decode(codec.encode(x))
    kept = np.abs(x) >= np.sort(np.abs(x).ravel())[-k]
    np.testing.assert_allclose(y[kept], x[kept], rtol=1e-3)  # the outliers, fp16-exact
    assert (dense[kept] == 0).all()


def test_kvquant_quantizes_keys_before_rope_and_rotates_them_back() -> None:
    d, tokens = 64, 200
    inv = (10000.0 ** (-np.arange(d // 2) * 2.0 / d)).astype(np.float32)
    rope = RopeParams(inv, 1.0)
    pre = np.random.default_rng(1).standard_normal((2, tokens, d)).astype(np.float32)
    pre[:, :, 5] = 30.0  # a constant outlier channel before RoPE: per channel it costs nothing
    positions = np.arange(100, 100 + tokens)
    post = rope.apply(pre, positions).astype(np.float32)
    ctx = LayerContext(key_positions=positions, rope=rope)
    err = {}
    for spec in ("kvquant:bits=3,role=keys,outliers=0", "kvquant:bits=3,role=keys,outliers=0,prerope=false"):
        codec = parse_spec(spec).fit(post, ctx)
        enc = codec.encode(post)
        fresh = parse_spec(spec).load_shared_state(codec.shared_state())
        y = fresh.decode(enc)
        err[spec] = float(np.square(y - post).sum() / np.square(post).sum())
        assert codec.report(enc)["prerope"] == ("rotated" if "prerope=false" not in spec else "none")
    assert err["kvquant:bits=3,role=keys,outliers=0"] < 0.5 * err["kvquant:bits=3,role=keys,outliers=0,prerope=false"]


def test_smooth_divides_channels_by_their_peak_and_undoes_it() -> None:
    x = keys(64, 64)
    codec = parse_spec("smooth:alpha=0.5")
    enc = codec.encode(x)
    s = enc.arrays["smooth_scale"].astype(np.float64)
    assert s[0, 3] > 3 * np.median(s) and abs(np.log(s).mean()) < 0.01
    np.testing.assert_allclose(codec.decode(enc), x, rtol=2e-3, atol=2e-3)  # alone: fp16 payload
