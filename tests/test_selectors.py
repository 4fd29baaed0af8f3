"""Token selectors (eviction): what each keeps, exact budgets, head-adaptive budgets, masked attention."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kvtool import metrics
from kvtool.codecs import LayerContext, parse_spec
from kvtool.codecs.base import pack_selection, selection_mask
from kvtool.codecs.moments import rope_rotate
from kvtool.codecs.select import selection
from kvtool.codecs.select.expected import mean_rotation
from kvtool.errors import CodecError

KV, G, T, D = 3, 2, 300, 32
QUERY_SELECTORS = ["h2o", "snapkv", "tova", "expected"]
ALL_SELECTORS = ["streaming", "knorm", *QUERY_SELECTORS]


# slow rotary frequencies (at most ~0.8 rad over the cache and the future window), so a planted key
# stays a heavy hitter for queries at every position
INV_FREQ = 1e-3 * 10000.0 ** (-np.arange(D // 2) * 2.0 / D)


def rotate(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return rope_rotate(torch.from_numpy(x).double(), torch.from_numpy(
        positions[:, None] * INV_FREQ[None, :])).float().numpy()


def layer(seed: int = 0, planted: int | None = None, tq: int = 24):
    """Random post-RoPE keys/values/queries ``(KV, T, D)``/``(KV·G, tq, D)``, queries at the last tq
    positions; ``planted``: a token whose key points along the queries' mean direction (a heavy hitter for
    every head)."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((KV, T, D)).astype(np.float32)
    values = rng.standard_normal((KV, T, D)).astype(np.float32)
    bias = rng.standard_normal(D).astype(np.float32)
    pre = (rng.standard_normal((KV * G, tq, D)) + 2 * bias).astype(np.float32)
    queries = rotate(pre, np.arange(T - tq, T))
    if planted is not None:
        direction = pre.mean(axis=(0, 1))
        key = 4.0 * direction / np.linalg.norm(direction) * np.sqrt(D)
        keys[:, planted] = rotate(key[None, None], np.array([planted]))[0, 0]
    return keys, values, queries


def context(keys: np.ndarray, queries: np.ndarray, role: str = "keys", **kw) -> LayerContext:
    tq = queries.shape[1]
    values = np.random.default_rng(99).standard_normal(keys.shape).astype(np.float32)
    return LayerContext(layer=0, role=role, queries=queries, query_positions=np.arange(T - tq, T),
                        key_positions=np.arange(T), keys=keys, scaling=D ** -0.5,
                        values=kw.pop("values", values), rope_inv_freq=INV_FREQ, **kw)


def mask_of(spec: str, keys: np.ndarray, queries: np.ndarray, values: np.ndarray | None = None,
            role: str = "keys") -> np.ndarray:
    """The keep mask of ``spec`` fitted for ``role`` (the tensor coded is the keys or the values)."""
    ctx = context(keys, queries, role, **({} if values is None else {"values": values}))
    x = keys if role == "keys" else ctx.values
    codec = parse_spec(spec).for_role(role).fit(x, ctx)
    return codec.token_mask(codec.encode(x))


@pytest.mark.parametrize("name", QUERY_SELECTORS)
def test_planted_heavy_hitter_is_kept(name: str) -> None:
    keys, _, queries = layer(1, planted=100)
    mask = mask_of(f"{name}:keep=0.1", keys, queries)
    assert mask[:, 100].all()
    # and it is the attention that keeps it: the same token without the plant is evicted by someone
    keys, _, queries = layer(1)
    plain = mask_of(f"{name}:keep=0.1", keys, queries)
    assert not plain[:, 100].all()


def test_streaming_keeps_exactly_sink_and_recent() -> None:
    keys, _, queries = layer()
    mask = mask_of("streaming:sink=4,recent=28", keys, queries)
    expected = np.zeros(T, bool)
    expected[:4] = expected[-28:] = True
    assert (mask == expected).all()
    mask = mask_of("streaming:keep=0.5,sink=2", keys, queries)
    assert mask[:, :2].all() and mask[:, -148:].all() and mask.sum() == KV * 150


@pytest.mark.parametrize("name", ALL_SELECTORS)
@pytest.mark.parametrize("budget,n", [("keep=0.3", 90), ("keep=1", T), ("tokens=77", 77), ("keep=0.001", 1)])
def test_budgets_are_met_exactly(name: str, budget: str, n: int) -> None:
    keys, values, queries = layer(2)
    mask = mask_of(f"{name}:{budget}", keys, queries, values)
    assert (mask.sum(axis=1) == n).all()
    # the values codec of the layer selects the same tokens from the keys in its context: computed again
    # (as a separate process would), and recalled from the keys codec's choice within one process
    assert (mask_of(f"{name}:{budget}", keys, queries, values, role="values") == mask).all()
    selection._MEMO.clear()
    assert (mask_of(f"{name}:{budget}", keys, queries, values, role="values") == mask).all()


@pytest.mark.parametrize("name", ["h2o", "snapkv", "tova", "knorm", "expected"])
def test_per_head_keeps_the_layer_total(name: str) -> None:
    keys, _, queries = layer(3, planted=50)
    keys[0] *= 3.0  # head 0: peaked attention; the others flatter, so the budgets should move
    queries[:G] *= 3.0
    n = 90
    mask = mask_of(f"{name}:tokens={n},sink=2,per_head=true", keys, queries)
    counts = mask.sum(axis=1)
    assert counts.sum() == KV * n
    assert len(set(counts.tolist())) > 1, counts  # really adaptive on this layer
    assert mask[:, :2].all()  # protected tokens stay in every head
    assert (counts >= 2 + int(0.2 * (n - 2))).all()  # AdaKV's safeguard
    # stored as a flat index list plus per-head counts, which round-trips
    arrays = pack_selection(mask)
    assert arrays["kept"].shape == (KV * n,) and arrays["kept_counts"].tolist() == counts.tolist()
    assert (selection_mask(arrays, mask.shape) == mask).all()


def test_per_head_selector_decodes_its_rows() -> None:
    keys, _, queries = layer(4)
    codec = parse_spec("h2o:keep=0.25,per_head=true").fit(keys, context(keys, queries))
    enc = codec.encode(keys)
    fresh = parse_spec(codec.spec())
    y, mask = fresh.decode(enc), fresh.token_mask(enc)
    assert (y[~mask] == 0).all()
    np.testing.assert_allclose(y[mask], keys[mask], atol=2e-3)
    assert enc.nbytes == mask.sum() * (2 * D + 2) + KV * 2  # fp16 rows, uint16 indices, uint16 counts


def test_query_selectors_see_only_the_observed_queries() -> None:
    keys, _, queries = layer(5)
    ctx = context(keys, queries[:, :12])
    ctx.query_positions = np.arange(T - 24, T - 12)
    for name in QUERY_SELECTORS:
        a = parse_spec(f"{name}:keep=0.3").fit(keys, ctx).keep_mask(keys)
        # keys newer than the last observed query were never seen by it: kept like a recent window
        assert a[:, -12:].all(), name


def test_evicted_keys_get_no_attention_in_the_metrics() -> None:
    keys, values, queries = layer(6)
    mask = mask_of("snapkv:keep=0.5", keys, queries)
    qpos, kpos = np.arange(T - 24, T), np.arange(T)
    kh, vh = keys * mask[..., None], values * mask[..., None]
    junk_k, junk_v = kh.copy(), vh.copy()
    junk_k[~mask], junk_v[~mask] = 50.0, -50.0  # would dominate softmax and output if they were seen
    a = metrics.attention(queries, keys, values, kh, vh, qpos, kpos, key_mask=mask)
    b = metrics.attention(queries, keys, values, junk_k, junk_v, qpos, kpos, key_mask=mask)
    assert a["attention_output_rel_error"] == pytest.approx(b["attention_output_rel_error"], rel=1e-6)
    # by hand: softmax over the kept keys only
    def softmax_out(h: int, allowed: np.ndarray) -> np.ndarray:
        s = (queries[h * G] @ keys[h].T * D ** -0.5).astype(np.float64)  # (tq, T)
        s[~(allowed[None, :] & (kpos[None, :] <= qpos[:, None]))] = -np.inf  # evicted or in the future
        p = np.exp(s - s.max(axis=1, keepdims=True))
        return (p / p.sum(axis=1, keepdims=True)) @ values[h]

    h = 1
    out, ref = softmax_out(h, mask[h]), softmax_out(h, np.ones(T, bool))
    zeros_seen = metrics.attention(queries, keys, values, kh, vh, qpos, kpos, key_mask=None)
    assert zeros_seen["attention_output_rel_error"] != pytest.approx(a["attention_output_rel_error"])
    head = metrics.attention(queries[h * G:h * G + 1], keys[h:h + 1], values[h:h + 1], kh[h:h + 1],
                             vh[h:h + 1], qpos, kpos, key_mask=mask[h:h + 1])
    expected = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert head["attention_output_rel_error"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("spec,message", [
    ("snapkv:keep=0", "keep must be in (0, 1], got 0"),
    ("h2o:keep=1.5", "keep must be in (0, 1], got 1.5"),
    ("knorm:keep=-0.2", "keep must be in (0, 1], got -0.2"),
    ("tova:keep=0.5,tokens=10", "give keep= or tokens=, not both"),
    ("snapkv:tokens=8,sink=4,recent=8", "tokens=8 is below sink + recent = 12"),
    ("streaming:recent=8,keep=0.5", "give recent= or a budget"),
    ("snapkv:kernel=4", "kernel must be an odd number"),
    ("knorm:tokens=0", "tokens must be at least 1, got 0"),
])
def test_bad_parameters(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        parse_spec(spec)


def test_tokens_above_the_cache_and_missing_queries() -> None:
    keys, _, queries = layer()
    with pytest.raises(CodecError, match=f"tokens=400 is more than the {T} tokens of the cache"):
        parse_spec("knorm:tokens=400").fit(keys)
    for name in QUERY_SELECTORS:
        with pytest.raises(CodecError, match=re.escape("capture --queries last:N")):
            parse_spec(name).fit(keys, LayerContext(layer=0, role="keys", keys=keys))


def test_rope_helpers() -> None:
    x = torch.randn(5, D, dtype=torch.float64)
    angles = torch.from_numpy(np.arange(5)[:, None] * INV_FREQ[None, :] * 1000)
    y = rope_rotate(x, angles)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope_rotate(y, -angles), x)
    # the average rotation of one position is that rotation; of positions p and -p a pure cosine scaling
    inv = torch.from_numpy(INV_FREQ) * 1000
    one = mean_rotation(inv, torch.tensor([3]))
    torch.testing.assert_close(x @ one.T, rope_rotate(x, 3 * inv.expand(5, -1)))
    both = mean_rotation(inv, torch.tensor([-3, 3]))
    cos = torch.cos(3 * inv)
    torch.testing.assert_close(both, torch.diag(torch.cat([cos, cos])))


def test_per_head_selection_chains_with_a_quantizer() -> None:
    keys, _, queries = layer(7, planted=20)
    keys[0] *= 3.0
    ctx = context(keys, queries)
    alone = parse_spec("snapkv:keep=0.25,per_head=true").fit(keys, ctx)
    mask = alone.token_mask(alone.encode(keys))
    chained = parse_spec("snapkv:keep=0.25,per_head=true+turboquant:bits=4").fit(keys, ctx)
    enc = chained.encode(keys)
    fresh = parse_spec(chained.spec())
    assert (fresh.token_mask(enc) == mask).all() and len(set(mask.sum(axis=1).tolist())) > 1
    # the kept rows of all heads go on as one sequence (1, Σ n_h, d), each coded at 4 + 16/d bits
    assert enc.arrays["inner.codes"].size * 8 == mask.sum() * D * 4
    y = fresh.decode(enc)
    assert (y[~mask] == 0).all()
    err = np.square(y[mask] - keys[mask]).sum() / np.square(keys[mask]).sum()
    assert err < 0.02


def test_expected_takes_the_recorded_rope_and_partial_rotary() -> None:
    from kvtool.rope import RopeParams

    keys, values, queries = layer(8, planted=40)
    ctx = context(keys, queries)
    ctx.rope_inv_freq, ctx.rope = None, RopeParams(INV_FREQ.astype(np.float32), 1.0)
    via_rope = parse_spec("expected:keep=0.2").fit(keys, ctx)
    ctx.rope, ctx.rope_inv_freq = None, INV_FREQ
    via_freq = parse_spec("expected:keep=0.2").fit(keys, ctx)
    assert (via_rope.keep_mask(keys) == via_freq.keep_mask(keys)).all() and via_rope.keep_mask(keys)[:, 40].all()
    enc = via_rope.encode(keys)
    assert enc.meta["rope"] == 1 and via_rope.report(enc) == {"rope": "rotated"}
    ctx.rope_inv_freq = None
    plain = parse_spec("expected:keep=0.2").fit(keys, ctx)
    report = plain.report(plain.encode(keys))
    assert report["rope"] == "none" and "no single RoPE" in report["warning"]  # eval shows the warning
    unrotated = parse_spec("expected:keep=0.2,future=0").fit(keys, ctx)
    assert unrotated.report(unrotated.encode(keys)) == {"rope": "none"}  # asked for: nothing to warn about
    # partial rotary: the channels past 2·len(inv_freq) pass through the averaged rotation unchanged
    inv = torch.from_numpy(INV_FREQ[:4]) * 100
    r = mean_rotation(inv, torch.arange(10, 20), D, factor=1.0)
    torch.testing.assert_close(r[8:, 8:], torch.eye(D - 8, dtype=torch.float64))
    assert not torch.allclose(r[:8, :8], torch.eye(8, dtype=torch.float64))


def test_sinks_are_positions_not_rows() -> None:
    """A sliding-window layer holds its newest tokens only: the rows whose positions are past ``sink``
    hold no sink, so none is protected; a cache starting at position 0 protects its first rows."""
    keys, values, queries = layer(3)
    held = context(keys, queries)
    assert selection.sink_rows(4, held, T).nonzero()[0].tolist() == [0, 1, 2, 3]
    held.key_positions = np.arange(T) + 1000  # the window of a sliding layer, later in the sequence
    assert not selection.sink_rows(4, held, T).any()
    held.query_positions = held.query_positions + 1000
    scores = parse_spec("knorm:keep=0.1,sink=4").scores(keys, held)
    kept = parse_spec("knorm:keep=0.1,sink=4").fit(keys, held).keep_mask(keys)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :kept.sum(axis=1)[0]]
    assert all(set(np.nonzero(kept[h])[0]) == set(best[h]) for h in range(KV))  # no row protected


def test_expected_leaves_sinks_out_of_the_softmax_and_skips_sink_queries() -> None:
    """kvpress's form: the first ``sink`` positions are kept but take no share of any head's softmax (a
    sink-heavy head then weighs as much as the others in its group's mean), and the queries at those
    positions are left out of the statistics."""
    keys, values, queries = layer(4, tq=T)
    keys[:, 0] *= 20.0  # a loud sink: it would take most of every head's softmax
    ctx = context(keys, queries)
    scores = parse_spec("expected:keep=0.5,sink=1").scores(keys, ctx)
    assert scores[:, 0].max() == 0.0 and np.isfinite(scores).all()
    codec = parse_spec("expected:keep=0.5,sink=4")
    obs = selection.observed("expected", ctx, T)
    mu, _ = codec.statistics(obs, None)
    assert torch.allclose(mu, obs.queries[:, 4:].double().mean(dim=1))
    # eval streams the moments of every prompt query from position `sink` on; one query gives the newest position
    assert codec.observed_queries() == 1 and codec.query_moments() == 4
    assert parse_spec("snapkv:keep=0.5").observed_queries() == 128 and parse_spec("snapkv").query_moments() is None
    assert parse_spec("knorm:keep=0.5").observed_queries() == 0
    assert parse_spec("expected:keep=0.5,sink=7+turboquant:bits=3").query_moments() == 7
    assert parse_spec("salient:select=[expected:keep=0.4,sink=2],hi=[turboquant:bits=3],lo=[drop]").query_moments() == 2
