"""Random-initialised tiny models of other families capture with the right shapes and layer types."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.capture import TextInput, capture
from kvtool.models import load_model
from kvtool.store import CacheReader

VOCAB = 49152  # the bundled tokenizer's vocabulary, shared by every tiny model here
TEXT = TextInput("t", "Keys and values of every token stay in the cache of every layer. " * 4)


def _configs():
    from transformers import Gemma2Config, Gemma3TextConfig, GPTBigCodeConfig, LlamaConfig, MistralConfig, Qwen2Config

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    return {
        # name: (config, q heads, kv heads, head_dim, expected layer types)
        "llama-gqa": (LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, **small),
                      4, 2, 16, ["full"] * 3),
        "llama-mqa": (LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, **small),
                      4, 1, 16, ["full"] * 2),
        "qwen2": (Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **small),
                  4, 2, 16, ["full"] * 2),
        "gemma3-sliding": (
            Gemma3TextConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             sliding_window=8, query_pre_attn_scalar=16,
                             layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                          "full_attention"], **small),
            4, 2, 16, ["sliding", "sliding", "sliding", "full"]),
        # Mistral marks no layer_types: its sliding layers are known from the cache objects only
        "mistral-sliding": (MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          sliding_window=8, **small),
                            4, 2, 16, ["sliding"] * 2),
        # Gemma 2 has no sdpa path (logit softcapping): kvtool wraps the model's own eager attention
        "gemma2-eager": (Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      sliding_window=8, **small),
                         4, 2, 16, ["sliding", "full"]),
        "gpt-bigcode-mqa": (
            GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, multi_query=True,
                             n_positions=256),
            4, 1, 16, ["full"] * 2),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_family_captures(name, tiny_model_factory, tmp_path):
    config, n_q, n_kv, d, types = _configs()[name]
    folder = tiny_model_factory(config, name)
    loaded = load_model(str(folder))
    result = capture(loaded, [TEXT], tmp_path / "c.h5", queries="all", dtype="float32")
    assert result.layer_types == types
    with CacheReader(result.path) as r:
        info = r.info
        assert (info.num_q_heads, info.num_kv_heads, info.head_dim) == (n_q, n_kv, d)
        assert info.num_layers == len(types)
        n_tok = info.sequences[0].num_tokens
        for i, layer_type in enumerate(types):
            data = r.layer(i)
            assert data.layer_type == layer_type
            assert data.queries.shape == (n_q, n_tok, d)
            if layer_type == "sliding":
                # the sliding cache keeps only the last window-1 tokens; their positions are recorded
                assert data.sliding_window == 8
                assert data.keys.shape == (n_kv, 7, d)
                np.testing.assert_array_equal(data.key_positions, np.arange(n_tok - 7, n_tok))
            else:
                assert data.keys.shape == (n_kv, n_tok, d)
                assert data.key_positions[0] == 0
            assert np.isfinite(data.keys).all() and np.isfinite(data.values).all()


def test_gemma3_records_its_own_attention_scaling(tiny_model_factory, tmp_path):
    config, *_ = _configs()["gemma3-sliding"]
    config.query_pre_attn_scalar = 32  # Gemma scales by query_pre_attn_scalar**-0.5, not head_dim**-0.5
    loaded = load_model(str(tiny_model_factory(config, "gemma-scale")))
    result = capture(loaded, [TEXT], tmp_path / "c.h5", queries="none")
    with CacheReader(result.path) as r:
        assert r.info.attn_scaling == pytest.approx(32 ** -0.5)
        assert not r.info.has_queries


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3-sliding"])
def test_pre_rope_keys_rotate_into_the_cached_keys(name, tiny_model_factory, tmp_path):
    """keys_prerope rotated by the model's own RoPE at their positions give back the cached keys."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config, n_q, n_kv, d, types = _configs()[name]
    loaded = load_model(str(tiny_model_factory(config, name + "-pre")))
    path = capture(loaded, [TEXT], tmp_path / "c.h5", queries="none", dtype="float32", pre_rope_keys=True).path
    with CacheReader(path) as r:
        for i in range(len(types)):
            data = r.layer(i)
            assert data.keys_prerope.shape == data.keys.shape
            pos = torch.as_tensor(data.key_positions).unsqueeze(0)
            pre = torch.as_tensor(data.keys_prerope).unsqueeze(0)
            rope = loaded.model.model.rotary_emb
            kwargs = {"layer_type": config.layer_types[i]} if name.startswith("gemma") else {}
            cos, sin = rope(pre, pos, **kwargs)
            rotated, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
            np.testing.assert_allclose(rotated[0].numpy(), data.keys, rtol=1e-5, atol=1e-5)
            assert not np.allclose(data.keys_prerope, data.keys)  # RoPE did rotate them


def _routes_through_interface(folder) -> bool:
    """Whether the installed transformers runs this model's attention through ``AttentionInterface``.

    Probed, not assumed per family (Falcon moved onto the interface in transformers 5.25, Bloom has not): a
    counting function registered under a fresh name must be called once per layer in one forward pass.
    """
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *args, **kwargs)

    AttentionInterface.register("kvtool_probe", counting)
    AttentionMaskInterface.register("kvtool_probe", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.set_attn_implementation("kvtool_probe")
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    return len(calls) == model.config.num_hidden_layers


def _interface_configs():
    from transformers import BloomConfig, FalconConfig

    return {
        # name: (config, q heads, kv heads, head_dim)
        "falcon-mqa": (FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True), 4, 1, 16),
        "bloom": (BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4), 4, 4, 16),
    }


@pytest.mark.parametrize("name", list(_interface_configs()))
def test_queries_are_recorded_exactly_where_attention_goes_through_the_interface(name, tmp_path, tiny_model_factory):
    """Keys and values capture on every family; queries where the installed release routes the family's
    attention through the interface, and a clear refusal naming ``--queries none`` where it does not."""
    from kvtool.errors import KvtoolError

    config, n_q, n_kv, d = _interface_configs()[name]
    folder = tiny_model_factory(config, name)
    loaded = load_model(str(folder))
    if _routes_through_interface(folder):
        result = capture(loaded, [TEXT], tmp_path / "q.h5", queries="last:4", dtype="float32")
        with CacheReader(result.path) as r:
            for i in range(r.info.num_layers):
                data = r.layer(i)
                assert data.queries.shape == (n_q, 4, d)
                assert np.isfinite(data.queries).all() and np.abs(data.queries).max() > 0
    else:
        with pytest.raises(KvtoolError, match="pass --queries none"):
            capture(loaded, [TEXT], tmp_path / "q.h5", queries="last:4")
        assert not (tmp_path / "q.h5").exists()
    result = capture(loaded, [TEXT], tmp_path / "c.h5", queries="none")
    assert (result.num_q_heads, result.num_kv_heads, result.head_dim) == (n_q, n_kv, d)
