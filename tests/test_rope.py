"""RoPE parameters recorded by capture re-apply the model's own rotary embedding (kvtool/rope.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.capture import TextInput, capture
from kvtool.models import load_model
from kvtool.rope import RopeParams
from kvtool.store import CacheReader, CacheWriter

VOCAB = 49152
TEXT = TextInput("t", "Keys and values of every token stay in the cache of every layer. " * 4)


def test_apply_and_invert_are_inverse_and_norm_preserving() -> None:
    rng = np.random.default_rng(0)
    rope = RopeParams(1.0 / 10000 ** (np.arange(0, 12, 2, dtype=np.float32) / 12), attention_factor=1.3)
    x = rng.standard_normal((2, 50, 16)).astype(np.float32)  # 12 rotated channels, 4 passed through
    pos = np.arange(100, 150)
    y = rope.apply(x, pos)
    np.testing.assert_array_equal(y[..., 12:], x[..., 12:])
    np.testing.assert_allclose(np.linalg.norm(y[..., :12], axis=-1), 1.3 * np.linalg.norm(x[..., :12], axis=-1),
                               rtol=1e-5)
    np.testing.assert_allclose(rope.invert(y, pos), x, atol=1e-5)
    # rotate_half layout: channel i pairs with i + 6, angle = position * inv_freq[i]
    i, p = 2, 7
    a = p * rope.inv_freq[i]
    e = np.zeros((1, 1, 16), np.float32)
    e[..., i] = 1.0
    out = rope.apply(e, np.array([p]))[0, 0]
    assert out[i] == pytest.approx(1.3 * np.cos(a), abs=1e-6) and out[i + 6] == pytest.approx(1.3 * np.sin(a), abs=1e-6)


def test_store_round_trips_rope_and_older_files_have_none(tmp_path) -> None:
    from _synth_cache import header

    rope = RopeParams(np.array([1.0, 0.1, 0.01], np.float32), 0.9)
    with CacheWriter(tmp_path / "c.h5", header(2, d=8)) as w:
        w.add_sequence(np.arange(5), source="s", text="s")
        x = np.zeros((2, 5, 8), np.float32)
        w.write_layer(0, 0, x, x, rope=rope)
        w.write_layer(0, 1, x, x)  # what files of earlier captures look like
    with CacheReader(tmp_path / "c.h5") as r:
        got = r.layer(0).rope
        np.testing.assert_array_equal(got.inv_freq, rope.inv_freq)
        assert got.attention_factor == pytest.approx(0.9)
        assert r.layer(1).rope is None


@pytest.mark.model
def test_bundled_model_rope_reproduces_its_post_rope_keys(smollm, tmp_path) -> None:
    text = TextInput("t", "The licenses for most software are designed to take away your freedom. " * 12)
    capture(smollm, [text], tmp_path / "c.h5", queries="none", pre_rope_keys=True)
    with CacheReader(tmp_path / "c.h5") as r:
        for i in (0, 14, r.info.num_layers - 1):
            d = r.layer(i)
            assert d.rope is not None and d.rope.rotary_dim == r.info.head_dim
            post = d.rope.apply(d.keys_prerope, d.key_positions)
            # both sides were stored in fp16: agreement to fp16 precision, relative to the keys' scale
            assert np.abs(post - d.keys).max() <= 2e-3 * np.abs(d.keys).max()
            wrong = RopeParams(d.rope.inv_freq * 1.01).apply(d.keys_prerope, d.key_positions)
            assert np.abs(wrong - d.keys).max() > 1e-2 * np.abs(d.keys).max()
            assert full_rank_prerope_error(d) < 2e-3


def full_rank_prerope_error(d) -> float:
    """Max error, relative to the keys' scale, of ``lowrank`` at full rank with ``prerope=true``: fitted on
    the captured pre-RoPE keys, decoded by re-applying the recorded RoPE at the stored positions."""
    from kvtool.codecs import parse_spec
    from kvtool.measure import layer_context

    codec = parse_spec(f"lowrank:rank={d.keys.shape[-1]},prerope=true,sink=0").for_role("keys")
    codec.fit(d.keys, layer_context(d, "keys"))
    y = codec.decode(codec.encode(d.keys))
    return float(np.abs(y - d.keys).max() / np.abs(d.keys).max())


def _tiny(name):
    from transformers import Gemma3TextConfig, GPTBigCodeConfig, LlamaConfig

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    return {
        # two rope bases: 10k on sliding layers, 1M on full ones
        "gemma3": Gemma3TextConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   sliding_window=8, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"] * 2, **small),
        # YaRN folds an attention factor != 1 into cos/sin
        "llama-yarn": LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 64}, **small),
        "gpt-bigcode": GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    }[name]


@pytest.mark.parametrize("name", ["gemma3", "llama-yarn"])
def test_tiny_models_record_a_rope_that_reproduces_their_keys(name, tiny_model_factory, tmp_path) -> None:
    loaded = load_model(str(tiny_model_factory(_tiny(name), f"rope-{name}")))
    capture(loaded, [TEXT], tmp_path / "c.h5", queries="none", pre_rope_keys=True, dtype="float32")
    with CacheReader(tmp_path / "c.h5") as r:
        ropes = [r.layer(i).rope for i in range(r.info.num_layers)]
        for i, rope in enumerate(ropes):
            d = r.layer(i)
            assert rope is not None
            np.testing.assert_allclose(rope.apply(d.keys_prerope, d.key_positions), d.keys, rtol=1e-4,
                                       atol=1e-4 * np.abs(d.keys).max())
            assert full_rank_prerope_error(d) < 2e-3  # fp16 basis and coefficients: fp16 precision
    if name == "gemma3":
        assert ropes[0].inv_freq[1] == pytest.approx(10000 ** (-2 / 16))  # sliding: the local base
        assert ropes[1].inv_freq[1] == pytest.approx(1e6 ** (-2 / 16))  # full: the global base
        assert ropes[2] == ropes[0] and ropes[3] == ropes[1] and ropes[0] != ropes[1]
    else:
        assert ropes[0].attention_factor > 1.0  # YaRN's 0.1 ln(s) + 1


def test_a_model_without_rope_records_none(tiny_model_factory, tmp_path) -> None:
    loaded = load_model(str(tiny_model_factory(_tiny("gpt-bigcode"), "rope-bigcode")))
    capture(loaded, [TEXT], tmp_path / "c.h5", queries="none", dtype="float32")
    with CacheReader(tmp_path / "c.h5") as r:
        assert all(r.layer(i).rope is None for i in range(r.info.num_layers))
