"""The selectors inside the model's cache (kvtool.CodecCache): the context the cache gives is enough, keys and
values keep the same rows, budgets hold; streaming mode refuses them with the reason."""

from __future__ import annotations

import pytest
import torch

from kvtool.cache import CodecCache
from kvtool.compat import forward_cache_kwarg
from kvtool.errors import CodecError
from kvtool.hooks import restore_attention

SPECS = ["streaming:keep=0.5", "h2o:keep=0.5", "snapkv:keep=0.5,window=4", "tova:keep=0.5", "knorm:keep=0.5",
         "expected:keep=0.5", "h2o:keep=0.5,per_head=true", "snapkv:keep=0.5+turboquant:bits=4",
         "age:bands=[0-4:fp16;4-:knorm:keep=0.5+uniform:bits=4]"]


def tiny():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
                         num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("spec", SPECS)
def test_selectors_run_in_the_cache(spec: str) -> None:
    model = tiny()
    x = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = CodecCache(model, spec)
        model(input_ids=x[:, :20], use_cache=True, **{forward_cache_kwarg(model): cache})
        logits = model(input_ids=x[:, 20:], use_cache=True, **{forward_cache_kwarg(model): cache}).logits
    assert torch.isfinite(logits).all()
    for layer in cache.layers:
        keys, values = layer.tracks["keys"].mask, layer.tracks["values"].mask
        assert torch.equal(keys, values)  # the same rows for keys and values
        prompt = keys[0, :, :20]  # (kv_heads, 20): the coded prompt; the 10 later tokens are precise
        if spec.startswith("age"):
            assert prompt[:, -4:].all() and (prompt[:, :-4].sum(dim=1) == 8).all()
        elif "per_head" in spec:
            assert int(prompt.sum()) == 2 * 10
        else:
            assert (prompt.sum(dim=1) == 10).all()
        assert keys[0, :, 20:].all()
    restore_attention(model)


def test_selectors_refuse_streaming_mode() -> None:
    with pytest.raises(CodecError, match="--mode streaming cannot use 'h2o'"):
        CodecCache(tiny(), "h2o:keep=0.5", mode="streaming")


def test_expected_rotates_with_the_models_rope_in_the_cache() -> None:
    model = tiny()
    x = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache = CodecCache(model, "expected:keep=0.5")
        model(input_ids=x[:, :16], use_cache=True, **{forward_cache_kwarg(model): cache})
        model(input_ids=x[:, 16:], use_cache=True, **{forward_cache_kwarg(model): cache})
    layer = cache.layers[1]
    assert layer.rope is not None and layer.rope.rotary_dim == 16
    assert layer.tracks["keys"].segments[0].rows[0].meta["rope"] == 1  # rotated to the future positions
    restore_attention(model)
