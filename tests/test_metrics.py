"""Metrics on small hand-made examples: exact zeros, GQA mapping, causal and sliding-window masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvtool import metrics


def rng_arrays(seed: int, q_heads: int = 4, kv_heads: int = 2, n_q: int = 5, n_k: int = 12, d: int = 8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((q_heads, n_q, d)).astype(np.float32)
    k = rng.standard_normal((kv_heads, n_k, d)).astype(np.float32)
    v = rng.standard_normal((kv_heads, n_k, d)).astype(np.float32)
    return q, k, v, np.arange(n_k - n_q, n_k), np.arange(n_k)


def reference(q, k, v, k_hat, v_hat, qpos, kpos, scaling, window=0):
    """Plain numpy, one query head and one query at a time."""
    group = q.shape[0] // k.shape[0]
    num = den = kl = cos = 0.0
    for j in range(q.shape[0]):
        h = j // group
        for t in range(q.shape[1]):
            vis = (kpos <= qpos[t]) & ((kpos > qpos[t] - window) if window else True)
            s, s_hat = scaling * k[h][vis] @ q[j, t], scaling * k_hat[h][vis] @ q[j, t]
            p, p_hat = np.exp(s - s.max()), np.exp(s_hat - s_hat.max())
            p, p_hat = p / p.sum(), p_hat / p_hat.sum()
            o, o_hat = p @ v[h][vis], p_hat @ v_hat[h][vis]
            num += ((o_hat - o) ** 2).sum()
            den += (o**2).sum()
            kl += (p * np.log(p / p_hat)).sum()
            cos += o @ o_hat / np.linalg.norm(o) / np.linalg.norm(o_hat)
    rows = q.shape[0] * q.shape[1]
    return math.sqrt(num / den), kl / rows, cos / rows


def test_reconstruction_hand_example() -> None:
    x = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)  # (1 head, 2 tokens, 2)
    y = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
    r = metrics.reconstruction(x, y)
    assert r["rel_mse"] == pytest.approx(4 / 5)
    assert r["cosine"] == pytest.approx(0.5)  # cos 1 and cos with a zero vector (0)
    assert r["heads"] == [{"rel_mse": pytest.approx(0.8), "cosine": pytest.approx(0.5)}]
    assert metrics.reconstruction(x, x)["rel_mse"] == 0.0


def test_identical_cache_has_zero_attention_error() -> None:
    q, k, v, qpos, kpos = rng_arrays(0)
    r = metrics.attention(q, k, v, k, v, qpos, kpos)
    assert r["attention_logit_rel_error"] == 0.0 and r["attention_output_rel_error"] == 0.0
    assert r["attention_kl"] == pytest.approx(0.0, abs=1e-7)
    assert r["topk_overlap"] == 1.0 and r["attention_output_cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize("window", [0, 4])
def test_matches_a_plain_reference(window: int) -> None:
    q, k, v, qpos, kpos = rng_arrays(1)
    rng = np.random.default_rng(2)
    k_hat = k + 0.3 * rng.standard_normal(k.shape).astype(np.float32)
    v_hat = v + 0.3 * rng.standard_normal(v.shape).astype(np.float32)
    r = metrics.attention(q, k, v, k_hat, v_hat, qpos, kpos, scaling=0.5, sliding_window=window)
    out_err, kl, cos = reference(q, k, v, k_hat, v_hat, qpos, kpos, 0.5, window)
    assert r["attention_output_rel_error"] == pytest.approx(out_err, rel=1e-4)
    assert r["attention_kl"] == pytest.approx(kl, rel=1e-3)
    assert r["attention_output_cosine"] == pytest.approx(cos, rel=1e-5)


def test_gqa_maps_query_heads_to_their_kv_head() -> None:
    q, k, v, qpos, kpos = rng_arrays(3)  # 4 query heads over 2 kv heads: 0,1 -> 0 and 2,3 -> 1
    k_hat, v_hat = k.copy(), v.copy()
    k_hat[1] += 0.5
    v_hat[1] *= 1.1
    r = metrics.attention(q, k, v, k_hat, v_hat, qpos, kpos)
    assert r["heads"][0]["attention_output_rel_error"] == 0.0
    assert r["heads"][1]["attention_output_rel_error"] > 0.01
    # the same result with the query heads of kv head 1 alone
    alone = metrics.attention(q[2:], k[1:], v[1:], k_hat[1:], v_hat[1:], qpos, kpos)
    assert alone["attention_output_rel_error"] == pytest.approx(r["heads"][1]["attention_output_rel_error"])


def test_causal_mask_ignores_future_keys() -> None:
    q, k, v, _, kpos = rng_arrays(4, n_q=3, n_k=10)
    qpos = np.array([5, 6, 7])  # keys 8 and 9 are in every query's future
    k_hat, v_hat = k.copy(), v.copy()
    k_hat[:, 8:] += 100.0
    v_hat[:, 9] -= 100.0
    r = metrics.attention(q, k, v, k_hat, v_hat, qpos, kpos)
    assert r["attention_output_rel_error"] == 0.0 and r["attention_logit_rel_error"] == 0.0
    k_hat[:, 7] += 1.0  # visible to the last query only
    assert metrics.attention(q, k, v, k_hat, v_hat, qpos, kpos)["attention_logit_rel_error"] > 0


def test_sliding_window_and_offset_key_positions() -> None:
    q, k, v, _, _ = rng_arrays(5, n_q=2, n_k=6)
    kpos = np.arange(100, 106)  # a sliding layer that kept positions 100..105
    qpos = np.array([104, 105])
    k_hat = k.copy()
    k_hat[:, 0] += 50.0  # position 100: outside a window of 4 for both queries (sees 101.. / 102..)
    r = metrics.attention(q, k, v, k_hat, v, qpos, kpos, sliding_window=4)
    assert r["attention_output_rel_error"] == 0.0
    assert metrics.attention(q, k, v, k_hat, v, qpos, kpos)["attention_output_rel_error"] > 0


def test_scaling_changes_kl_not_logit_ratio() -> None:
    q, k, v, qpos, kpos = rng_arrays(6)
    k_hat = k * 1.1
    a = metrics.attention(q, k, v, k_hat, v, qpos, kpos, scaling=0.1)
    b = metrics.attention(q, k, v, k_hat, v, qpos, kpos, scaling=1.0)
    assert a["attention_logit_rel_error"] == pytest.approx(b["attention_logit_rel_error"], rel=1e-5)
    assert a["attention_logit_rel_error"] == pytest.approx(0.1, rel=1e-4)
    assert a["attention_kl"] < b["attention_kl"]


def test_topk_overlap_hand_example() -> None:
    # one query, keys along the query direction with decreasing logits; swap ranks 2 and 3 of 4
    q = np.array([[[1.0, 0.0]]], np.float32)
    k = np.array([[[4.0, 0], [3.0, 0], [2.0, 0], [1.0, 0]]], np.float32)
    k_hat = np.array([[[4.0, 0], [1.0, 0], [2.0, 0], [3.0, 0]]], np.float32)
    r = metrics.attention(q, k, k, k_hat, k, np.array([3]), np.arange(4), topk=2)
    assert r["topk_overlap"] == 0.5  # top-2 {0, 1} vs {0, 3}
    r = metrics.attention(q, k, k, k_hat, k, np.array([0]), np.arange(4), topk=2)
    assert r["topk_overlap"] == 1.0  # only key 0 is visible: min(k, visible) = 1


def test_evicted_keys_leave_attention() -> None:
    q, k, v, qpos, kpos = rng_arrays(7)
    mask = np.ones(k.shape[:2], bool)
    mask[:, :3] = False
    k_hat, v_hat = k.copy(), v.copy()
    k_hat[:, :3] = 0.0  # what a selector's decode returns for evicted rows
    r = metrics.attention(q, k, v, k_hat, v_hat, qpos, kpos, key_mask=mask)
    assert r["attention_logit_rel_error"] == 0.0  # measured on kept keys only
    assert r["attention_kl"] > 0 and np.isfinite(r["attention_kl"])
    assert r["attention_output_rel_error"] > 0


@pytest.mark.parametrize("window", [0, 4])
def test_a_shared_reference_gives_the_same_figures(window: int) -> None:
    """sweep/plan compute the exact attention once per layer and compare many codecs against it."""
    q, k, v, qpos, kpos = rng_arrays(8, n_q=6, n_k=16)
    ref = metrics.reference_attention(q, k, v, qpos, kpos, scaling=0.4, sliding_window=window, topk=3)
    rng = np.random.default_rng(9)
    mask = np.ones(k.shape[:2], bool)
    mask[0, 2] = False
    for trial in range(3):
        k_hat = k + 0.2 * rng.standard_normal(k.shape).astype(np.float32)
        v_hat = v + 0.2 * rng.standard_normal(v.shape).astype(np.float32)
        key_mask = mask if trial == 2 else None
        direct = metrics.attention(q, k, v, k_hat, v_hat, qpos, kpos, scaling=0.4, sliding_window=window,
                                   key_mask=key_mask, topk=3)
        assert metrics.compare_attention(ref, k_hat, v_hat, key_mask=key_mask) == direct
    # None = that tensor exact: the same figures as passing the exact tensor itself
    for k_hat, v_hat in ((None, v * 1.1), (k * 1.1, None), (None, None)):
        explicit = metrics.attention(q, k, v, k if k_hat is None else k_hat, v if v_hat is None else v_hat,
                                     qpos, kpos, scaling=0.4, sliding_window=window, topk=3)
        assert metrics.compare_attention(ref, k_hat, v_hat) == explicit
    energy = ref.output_energy()  # ‖pV‖² per KV head: the denominator of the output error
    assert len(energy) == 2 and all(e > 0 for e in energy)
    out = metrics.compare_attention(ref, None, v * 1.1)["heads"]
    for h in range(2):  # values scaled by 1.1 move every output by exactly 10 %
        assert out[h]["attention_output_rel_error"] == pytest.approx(0.1, rel=1e-5)


def test_output_errors_are_the_numerator_of_the_output_error() -> None:
    q, k, v, qpos, kpos = rng_arrays(10, n_q=6, n_k=16)
    ref = metrics.reference_attention(q, k, v, qpos, kpos, sliding_window=5)
    rng = np.random.default_rng(11)
    k_hat = k + 0.3 * rng.standard_normal(k.shape).astype(np.float32)
    v_hat = v + 0.3 * rng.standard_normal(v.shape).astype(np.float32)
    mask = np.ones(k.shape[:2], bool)
    mask[1, 12] = False
    energy = ref.output_energy()
    for kh, vh, m in ((k_hat, None, None), (None, v_hat, None), (k_hat, v_hat, mask), (None, v_hat, mask)):
        heads = metrics.compare_attention(ref, kh, vh, key_mask=m)["heads"]
        errors = metrics.output_errors(ref, kh, vh, key_mask=m)
        for h, e in enumerate(errors):
            assert math.sqrt(e / energy[h]) == pytest.approx(heads[h]["attention_output_rel_error"], rel=1e-6)
            assert e > 0
    assert metrics.output_errors(ref) == [0.0, 0.0]
