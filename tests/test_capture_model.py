"""Capture against the bundled model: the file must hold what the model's own cache and attention hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvtool
from kvtool.capture import TextInput, capture, run_and_record
from kvtool.store import CacheReader


def _text() -> str:
    from pathlib import Path

    return (Path(__file__).parents[1] / "samples" / "gpl-3.0.txt").read_text()


@pytest.fixture(scope="module")
def captured(smollm, tmp_path_factory):
    """Two sequences captured in float32 and float16, plus the token ids."""
    out = tmp_path_factory.mktemp("cap")
    texts = [TextInput("gpl", _text()), TextInput("prompt", "The quick brown fox jumps over the lazy dog.")]
    f32 = capture(smollm, texts, out / "f32.h5", max_tokens=96, queries="all", dtype="float32")
    f16 = capture(smollm, texts[:1], out / "f16.h5", max_tokens=96, queries="last:16", dtype="float16")
    return f32.path, f16.path


def _plain_cache(model, ids: np.ndarray):
    """An independent forward pass with the model's default attention and a fresh DynamicCache."""
    from transformers import DynamicCache

    from kvtool.compat import forward_cache_kwarg

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.as_tensor(ids).unsqueeze(0), use_cache=True, **{forward_cache_kwarg(model): cache})
    return cache


@pytest.mark.model
def test_keys_values_equal_dynamic_cache(smollm, captured):
    f32, f16 = captured
    with CacheReader(f32) as r:
        ids = r.tokens(0)
        assert len(ids) == 96 and r.info.num_layers == 30 and r.info.num_kv_heads == 3
    cache = _plain_cache(smollm.model, ids)
    for layer in (0, 7, 29):
        ref_k = cache.layers[layer].keys[0].float().numpy()
        ref_v = cache.layers[layer].values[0].float().numpy()
        k32, v32, _ = kvtool.load_layer(f32, layer)
        np.testing.assert_allclose(k32, ref_k, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v32, ref_v, rtol=1e-5, atol=1e-5)
        k16, v16, _ = kvtool.load_layer(f16, layer)
        # float16 keeps 11 significant bits: relative error ≤ 2^-11 of each value's magnitude.
        np.testing.assert_allclose(k16, ref_k, rtol=2**-10, atol=1e-4)
        np.testing.assert_allclose(v16, ref_v, rtol=2**-10, atol=1e-4)


@pytest.mark.model
def test_second_sequence_is_its_own_forward(smollm, captured):
    f32, _ = captured
    with CacheReader(f32) as r:
        assert len(r.info.sequences) == 2
        ids = r.tokens(1)
        layer = r.layer(4, sequence=1)
    cache = _plain_cache(smollm.model, ids)
    np.testing.assert_allclose(layer.keys, cache.layers[4].keys[0].numpy(), rtol=1e-5, atol=1e-5)
    assert layer.queries.shape == (9, len(ids), 64)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, qpos: np.ndarray, kpos: np.ndarray,
               scale: float) -> np.ndarray:
    """softmax(Q Kᵀ·scale + causal mask) V with GQA; q (Hq, Tq, d), k/v (Hkv, T, d) → (Hq, Tq, d)."""
    group = q.shape[0] // k.shape[0]
    k = np.repeat(k, group, axis=0)
    v = np.repeat(v, group, axis=0)
    logits = np.einsum("hqd,hkd->hqk", q, k) * scale
    logits = np.where(kpos[None, None, :] <= qpos[None, :, None], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,hkd->hqd", p, v)


@pytest.mark.model
def test_queries_reproduce_attention_output(smollm, tmp_path):
    """Recorded queries + keys/values give back what the model's attention returned (recorded here)."""
    outputs: dict[int, np.ndarray] = {}

    def hook(layer, query, key, value, attn_out):  # attn_out: (1, T, Hq, d)
        outputs[layer] = attn_out[0].transpose(0, 1).float().numpy().copy()

    ids = smollm.tokenizer(_text())["input_ids"][:80]
    cache, rec = run_and_record(smollm, torch.as_tensor([ids]), keep_last=24, hook=hook)
    path = capture(smollm, [TextInput("gpl", _text())], tmp_path / "c.h5", max_tokens=80, queries="last:24",
                   dtype="float32").path
    with CacheReader(path) as r:
        scale = r.info.attn_scaling
        assert scale == pytest.approx(64 ** -0.5)
        for layer in (0, 13, 29):
            data = r.layer(layer)
            assert data.queries.shape == (9, 24, 64)
            np.testing.assert_array_equal(data.query_positions, np.arange(56, 80))
            got = _attention(data.queries, data.keys, data.values, data.query_positions, data.key_positions,
                             scale)
            want = outputs[layer][:, -24:, :]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            # and the hook saw the same queries the file holds
            np.testing.assert_allclose(rec.queries[layer].numpy(), data.queries, rtol=1e-6, atol=1e-6)


@pytest.mark.model
def test_default_model_second_load_uses_converted_copy(smollm):
    from kvtool.models import load_model

    again = load_model("default")
    assert again.converted_from_cache
    assert again.source == smollm.source and again.source.startswith("sha256:")
    ids = torch.as_tensor([[504, 2365, 6354, 16438]])
    with torch.inference_mode():
        a = smollm.model(input_ids=ids).logits
        b = again.model(input_ids=ids).logits
    torch.testing.assert_close(a, b)
