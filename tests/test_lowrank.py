"""The ``lowrank`` codec on planted data: exact where it must be, and each option doing what it claims."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kvtool.codecs import LayerContext, parse_spec
from kvtool.codecs.structure.lowrank import LowRank
from kvtool.errors import CodecError
from kvtool.rope import RopeParams

D = 32


def planted(rank: int, heads: int = 2, tokens: int = 300, d: int = D, seed: int = 0) -> np.ndarray:
    """Exactly rank-``rank`` tokens around a per-head offset, with an outlier token 0. (heads, tokens, d)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((heads, tokens, rank))
    w = rng.standard_normal((heads, rank, d))
    x = np.einsum("htr,hrd->htd", z, w) + 3.0 * rng.standard_normal((heads, 1, d))
    x[:, 0] = 40.0 * rng.standard_normal((heads, d))  # an attention-sink-like outlier, off the subspace
    return x.astype(np.float16).astype(np.float32)  # fp16-representable, like a capture


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def code(spec: str | LowRank, x: np.ndarray, ctx: LayerContext | None = None):
    codec = parse_spec(spec) if isinstance(spec, str) else spec
    codec.fit(x, ctx)
    enc = codec.encode(x)
    return codec, enc, codec.decode(enc)


def test_rank_r_data_is_exact_at_rank_r_and_not_below() -> None:
    x = planted(6)
    _, enc, y = code("lowrank:rank=6", x)
    assert rel(x[:, 1:], y[:, 1:]) < 2e-3  # fp16 coefficients and basis: fp16 precision
    assert rel(x[:, 1:], code("lowrank:rank=5", x)[2][:, 1:]) > 0.05
    assert enc.arrays["coeffs"].shape == (2, 299, 6) and enc.arrays["coeffs"].dtype == np.float16


def test_sink_tokens_come_back_bit_exact_and_stay_out_of_the_fit() -> None:
    x = planted(6)
    for n in (1, 3):
        _, enc, y = code(f"lowrank:rank=6,sink={n}", x)
        np.testing.assert_array_equal(y[:, :n], x[:, :n])
        assert enc.arrays["sink_rows"].shape == (2, n, D)
    # token 0 inside the basis: the outlier takes a basis direction and the rank-6 rest is no longer exact
    _, _, y0 = code("lowrank:rank=6,sink=0", x)
    assert rel(x[:, 1:], y0[:, 1:]) > 10 * rel(x[:, 1:], code("lowrank:rank=6", x)[2][:, 1:])


def test_energy_picks_the_smallest_rank_that_reaches_it() -> None:
    rng = np.random.default_rng(1)
    # one head, known variances 8, 4, 2, 1, 0.5, ... along orthogonal directions
    var = 8.0 * 0.5 ** np.arange(D)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    z = rng.standard_normal((20000, D))
    z = (z - z.mean(0)) / z.std(0)
    x = ((z * np.sqrt(var)) @ q.T)[None].astype(np.float32)
    share = np.cumsum(var) / var.sum()  # 0.50, 0.75, 0.875, 0.9375, ...
    for energy, want in ((0.5, 1), (0.7, 2), (0.8, 3), (0.9, 4), (0.95, 5)):
        codec, enc, _ = code(f"lowrank:energy={energy},sink=0", x)
        rep = codec.report(enc)
        assert rep["rank"] == want and rep["rank_needed"] == [want], (energy, rep)
        assert rep["energy_kept"][0] == pytest.approx(share[want - 1], abs=0.01)
    codec, enc, _ = code("lowrank:energy=1,sink=0", x)
    assert codec.report(enc)["rank"] == D  # energy=1 keeps every dimension
    # several heads: the layer's rank is the largest any head needs; each head's need is reported
    two = np.concatenate([x, x * np.r_[np.ones(2), np.zeros(D - 2)]], axis=0)  # head 1: rank 2
    codec, enc, _ = code("lowrank:energy=0.9,sink=0", two)
    assert codec.report(enc)["rank_needed"][0] == 4 and codec.report(enc)["rank"] == 4


def test_default_is_energy_0_9() -> None:
    from kvtool.codecs.structure.lowrank import DEFAULT_ENERGY

    x = planted(20, tokens=400)
    codec, enc, _ = code("lowrank", x)
    assert DEFAULT_ENERGY == 0.9
    assert all(e >= 0.9 for e in codec.report(enc)["energy_kept"])
    assert parse_spec("lowrank").spec() == "lowrank:sink=1,weight=none,group=1,prerope=false"


def test_heads_sharing_one_subspace_are_exact_with_group_all_at_the_joint_rank() -> None:
    rng = np.random.default_rng(2)
    heads, tokens, r = 4, 400, 6
    z = rng.standard_normal((tokens, r))  # one latent per token, read by every head (Palu's setting)
    x = np.stack([z @ rng.standard_normal((r, D)) for _ in range(heads)]).astype(np.float32)
    codec, enc, y = code(f"lowrank:rank={r},group=all,sink=0", x)
    assert rel(x, y) < 2e-3
    assert enc.arrays["coeffs"].shape == (1, tokens, r)  # r numbers per token for all four heads
    assert codec.shared_state()["basis"].shape == (1, heads * D, r)
    # the same coefficient budget per head (r/4 each... rounded up) is far from exact
    assert rel(x, code(f"lowrank:rank={-(-r // heads)},sink=0", x)[2]) > 0.3
    # groups of 2: exact at rank r too, with two bases
    _, enc2, y2 = code(f"lowrank:rank={r},group=2,sink=0", x)
    assert rel(x, y2) < 2e-3 and enc2.arrays["coeffs"].shape == (2, tokens, r)


def test_query_aware_basis_beats_plain_pca_on_q_dot_k() -> None:
    rng = np.random.default_rng(3)
    tokens = 2000
    # keys: large variance along e0..e3, small along e4; queries read e4 (and a little e0)
    scale = np.array([10, 8, 6, 4, 1.0] + [0.01] * (D - 5))
    k = (rng.standard_normal((1, tokens, D)) * scale).astype(np.float32)
    q = np.zeros((2, 64, D), np.float32)
    q[..., 4] = 5.0 + rng.standard_normal((2, 64))
    q[..., 0] = 0.3 * rng.standard_normal((2, 64))
    ctx = LayerContext(role="keys", queries=q, keys=k)

    def qk_error(spec: str) -> float:
        y = code(spec, k, ctx)[2]
        s, s_hat = np.einsum("qtd,hkd->qtk", q, k), np.einsum("qtd,hkd->qtk", q, y)
        return rel(s[:, :, 1:], s_hat[:, :, 1:])

    plain, aware = qk_error("lowrank:rank=2"), qk_error("lowrank:rank=2,weight=queries")
    assert aware < 0.3 * plain, (aware, plain)
    codec = code("lowrank:rank=2,weight=queries", k, ctx)[0]
    assert set(codec.shared_state()) == {"mean", "basis", "projection"}  # coder and decoder both stored


def test_attention_weighted_basis_follows_the_attended_tokens() -> None:
    rng = np.random.default_rng(4)
    tokens = 400
    v = (rng.standard_normal((1, tokens, D)) * np.r_[5.0, 4.0, np.full(D - 2, 0.1)]).astype(np.float32)
    attended = np.arange(50, 70)
    v[0, attended, 2] += 12.0  # a direction only the attended tokens use (too rare for plain PCA)
    k = np.zeros((1, tokens, D), np.float32)
    k[0, attended, 0] = 10.0  # keys that the queries below select
    q = np.zeros((1, 8, D), np.float32)
    q[..., 0] = 3.0
    pos = np.arange(tokens)
    ctx = LayerContext(role="values", queries=q, keys=k, query_positions=pos[-8:], key_positions=pos,
                       scaling=1.0)

    def attended_error(spec: str) -> float:
        y = code(spec, v, ctx)[2]
        return rel(v[0, attended], y[0, attended])

    assert attended_error("lowrank:rank=2,weight=attention") < 0.5 * attended_error("lowrank:rank=2")


def test_prerope_codes_keys_before_rotation_and_rebuilds_post_rope_keys() -> None:
    rng = np.random.default_rng(5)
    heads, tokens, r = 2, 300, 4
    rope = RopeParams((1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32))
    pre = np.einsum("htr,hrd->htd", rng.standard_normal((heads, tokens, r)), rng.standard_normal((heads, r, D)))
    pos = np.arange(10, 10 + tokens)
    post = rope.apply(pre, pos)
    ctx = LayerContext(role="keys", keys=post, keys_prerope=pre.astype(np.float32), rope=rope, key_positions=pos)
    codec, enc, y = code(f"lowrank:rank={r},prerope=true", post, ctx)
    assert rel(post, y) < 2e-3  # rank r before RoPE...
    assert rel(post[:, 1:], code(f"lowrank:rank={r}", post, ctx)[2][:, 1:]) > 0.1  # ...but not after
    assert enc.meta == {"rank": r, "key_start": 10}
    state = codec.shared_state()
    np.testing.assert_array_equal(state["rope_inv_freq"], rope.inv_freq)
    fresh = parse_spec(codec.spec()).load_shared_state(state)  # a reader of the file
    np.testing.assert_array_equal(fresh.decode(enc), y)
    # full rank reproduces the post-RoPE keys to fp16 precision
    assert rel(post, code(f"lowrank:rank={D},prerope=true,sink=0", post, ctx)[2]) < 1e-3
    # without recorded pre-RoPE keys (a model's cache in CodecCache) the keys are rotated back: the same fit
    bare = LayerContext(role="keys", keys=post, rope=rope, key_positions=pos)
    _, enc2, y2 = code(f"lowrank:rank={r},prerope=true", post, bare)
    assert rel(y, y2) < 1e-4 and enc2.meta == enc.meta


@pytest.mark.parametrize(
    "spec,ctx,message",
    [
        ("lowrank:rank=0", None, "rank must be one of 1..head_dim, got 0"),
        ("lowrank:rank=33", None, "rank must be one of 1..32, got 33"),
        ("lowrank:rank=65,group=2", None, "rank must be one of 1..64, got 65"),
        ("lowrank:energy=0", None, "energy must be in (0, 1], got 0"),
        ("lowrank:energy=1.5", None, "energy must be in (0, 1], got 1.5"),
        ("lowrank:rank=4,energy=0.9", None, "give rank=R or energy=E, not both"),
        ("lowrank:group=3", None, "group must divide the kv-head count 2 (one of 1, 2, all), got 3"),
        ("lowrank:group=x", None, "group must be a positive integer dividing the kv-head count, or all"),
        ("lowrank:sink=-1", None, "sink must be one of 0..65536, got -1"),
        ("lowrank:prerope=true", LayerContext(role="keys"), "pre-RoPE keys"),
        ("lowrank:prerope=true", LayerContext(role="keys"), "--pre-rope-keys"),
        ("lowrank:weight=queries", LayerContext(role="keys"), "needs captured queries"),
        ("lowrank:weight=attention", LayerContext(role="values"), "needs captured queries"),
        ("lowrank:weight=queries,prerope=true", None, "weight=queries needs post-RoPE keys"),
        ("lowrank:weight=queries", LayerContext(role="values"), "weight=queries is for keys"),
        ("lowrank:rank=24+uniform:group=32", None, "codes vectors of 24 values"),
    ],
)
def test_bad_parameters_name_the_allowed_values(spec, ctx, message) -> None:
    x = planted(4)
    with pytest.raises(CodecError, match=re.escape(message)):
        parse_spec(spec).fit(x, ctx)


def test_values_role_rejects_key_only_options_early() -> None:
    with pytest.raises(CodecError, match="prerope=true applies to keys only"):
        parse_spec("lowrank:prerope=true").for_role("values")


def test_a_restored_basis_is_used_not_refitted() -> None:
    a, b = planted(6, seed=10), planted(6, seed=11)  # different subspaces
    calib = parse_spec("lowrank:rank=6").fit(a)
    codec = parse_spec("lowrank:rank=6").load_shared_state(calib.shared_state())
    y = code(codec, b)[2]
    assert rel(b[:, 1:], y[:, 1:]) > 0.3  # a's basis does not hold b
    for k, v in codec.shared_state().items():
        np.testing.assert_array_equal(v, calib.shared_state()[k])
    with pytest.raises(CodecError, match="rank 6, the spec asks for 5"):
        parse_spec("lowrank:rank=5").load_shared_state(calib.shared_state())
    with pytest.raises(CodecError, match="restored lowrank basis is for 2 group"):
        parse_spec("lowrank:rank=6").load_shared_state(calib.shared_state()).fit(planted(6, heads=4))
