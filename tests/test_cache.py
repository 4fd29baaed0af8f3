"""kvtool.CodecCache: exactness, manual-replacement equivalence, streaming, sliding windows, GQA/MQA, eviction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _selectors import DropRange  # tests/ is on sys.path, as for _cli

from kvtool.cache import CodecCache
from kvtool.codecs import LayerContext, parse_spec
from kvtool.codecs.assignment import Assignment
from kvtool.compat import forward_cache_kwarg, generate_cache_kwarg
from kvtool.errors import CodecError, KvtoolError
from kvtool.hooks import install_attention, restore_attention

VOCAB = 128


def tiny(kind: str = "llama-gqa", attn: str = "sdpa"):
    """A random tiny model (built in memory, seeded) and its config."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
                 num_attention_heads=4)
    config = {
        "llama-gqa": lambda: LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **small),
        "llama-mqa": lambda: LlamaConfig(num_hidden_layers=2, num_key_value_heads=1, **small),
        "mistral-sliding": lambda: MistralConfig(num_hidden_layers=2, num_key_value_heads=2, sliding_window=8,
                                                 **small),
    }[kind]()
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def forward(model, tokens, cache, **kw):
    return model(input_ids=tokens, use_cache=True, **{forward_cache_kwarg(model): cache}, **kw).logits


def dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# -- prefill mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mqa", "mistral-sliding"])
def test_none_is_bit_exact(kind):
    model = tiny(kind)
    x = ids(24)
    with torch.inference_mode():
        ref, cache = dynamic(model), CodecCache(model, "none")
        a = [forward(model, x[:, :12], ref), forward(model, x[:, 12:20], ref), forward(model, x[:, 20:], ref)]
        b = [forward(model, x[:, :12], cache), forward(model, x[:, 12:20], cache),
             forward(model, x[:, 20:], cache)]
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    assert cache.get_seq_length() == 24


def _manual_replacement(model, x, first, spec):
    """Prefill with a DynamicCache, replace every layer's held keys/values by a fresh codec's
    encode → decode, then score the rest: the reference CodecCache must reproduce."""
    a = Assignment.of(spec, spec)
    ref = dynamic(model)
    stored = 0
    with torch.inference_mode():
        forward(model, x[:, :first], ref)
        for i, layer in enumerate(ref.layers):
            positions = np.arange(layer.get_seq_length() - layer.keys.shape[2], layer.get_seq_length())
            for role in ("keys", "values"):
                t = getattr(layer, role)
                codec = a.codec(i, role)
                arr = t[0].numpy()
                codec.fit(arr, LayerContext(layer=i, role=role, key_positions=positions))
                enc = codec.encode(arr)
                stored += enc.nbytes + sum(v.nbytes for v in codec.shared_state().values())
                setattr(layer, role, torch.from_numpy(codec.decode(enc))[None])
        return forward(model, x[:, first:], ref), stored


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mqa", "mistral-sliding"])
@pytest.mark.parametrize("spec", ["turboquant:bits=3", "kivi:bits=2,group=4,residual=4", "turboquant:bits=2.5"])
def test_prefill_equals_manual_encode_decode_replacement(kind, spec):
    model = tiny(kind)
    x = ids(30, seed=1)
    expected, stored = _manual_replacement(model, x, 20, spec)
    with torch.inference_mode():
        cache = CodecCache(model, spec)
        forward(model, x[:, :20], cache)
        got = forward(model, x[:, 20:], cache)
        from_cache = dynamic(model)
        forward(model, x[:, :20], from_cache)
        built = CodecCache.from_cache(model, spec, from_cache)
        footprint = built.footprint()
        got2 = forward(model, x[:, 20:], built)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got2, expected, rtol=0, atol=1e-5)
    # honest bytes: exactly what the codecs stored for the prompt, shared state included (no precise tokens yet)
    assert sum(f["stored_bytes"] for f in footprint.values()) == stored
    assert all(f["precise_tokens"] == 0 for f in footprint.values())
    assert not torch.equal(got, forward_exact(model, x, 20))  # the codec really changed something


def forward_exact(model, x, first):
    with torch.inference_mode():
        ref = dynamic(model)
        forward(model, x[:, :first], ref)
        return forward(model, x[:, first:], ref)


def test_stored_bytes_count_precise_tokens_at_model_precision():
    model = tiny()
    x = ids(24)
    with torch.inference_mode():
        cache = CodecCache(model, "turboquant:bits=3")
        forward(model, x[:, :16], cache)
        forward(model, x[:, 16:], cache)
    fp = cache.footprint()
    layers, heads, dim = 2, 2, 16
    coded = layers * heads * 16 * (dim * 3 // 8 + 2)  # 3-bit codes + fp16 norm per prompt token
    precise = layers * heads * 8 * dim * 4  # the 8 continuation tokens, float32
    assert fp["keys"]["stored_bytes"] == coded + precise
    assert cache.stored_bytes() == 2 * (coded + precise)
    assert fp["keys"]["elements"] == layers * heads * 24 * dim


@pytest.mark.parametrize("mode", ["prefill", "streaming"])
@pytest.mark.parametrize("kind", ["llama-gqa", "mistral-sliding"])
def test_generate_runs_with_codec_cache(kind, mode):
    model = tiny(kind)
    x = ids(12)
    with torch.inference_mode():
        def generate(cache):
            return model.generate(x, max_new_tokens=14, min_new_tokens=14, do_sample=False,
                                  **{generate_cache_kwarg(): cache})

        exact = generate(dynamic(model))
        same = generate(CodecCache(model, "none", mode=mode))
        cache = CodecCache(model, "kivi:bits=2,group=4,residual=4", mode=mode)
        coded = generate(cache)
    assert torch.equal(exact, same)  # past the sliding window of 8 too
    assert coded.shape == exact.shape
    assert cache.get_seq_length() == 12 + 14 - 1
    assert cache.stored_bytes() > 0


def test_beam_search_reorders_coded_rows():
    model = tiny()
    x = ids(10)
    with torch.inference_mode():
        exact = model.generate(x, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False,
                               **{generate_cache_kwarg(): dynamic(model)})
        same = model.generate(x, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False,
                              **{generate_cache_kwarg(): CodecCache(model, "none")})
    assert torch.equal(exact, same)


# -- streaming mode -------------------------------------------------------------------------------------


class _ManualStreaming:
    """Test reference: a DynamicCache whose every update codes, token by token, what it is given — new tokens
    wait in a float16 window until a block of ``block`` is complete (block 1: coded at once)."""

    def __init__(self, model, spec, block):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=model.config)
        self.assignment = Assignment.of(spec, spec)
        self.block = block
        self.coded = {}  # (layer, role) -> number of coded tokens
        original = self.cache.update

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            assert key_states.shape[2] == 1  # one token at a time
            keys, values = original(key_states, value_states, layer_idx, *args, **kwargs)
            layer = self.cache.layers[layer_idx]
            for role in ("keys", "values"):
                t = getattr(layer, role)
                n = self.coded.get((layer_idx, role), 0)
                if t.shape[2] - n == self.block:  # the block is complete: code it (the newest token exact)
                    codec = self.assignment.codec(layer_idx, role).streaming_form()[1]
                    block = t[0, :, n:].float().numpy()
                    codec.fit(block, LayerContext(layer=layer_idx, role=role,
                                                  key_positions=np.arange(n, n + self.block)))
                    t[0, :, n:] = torch.from_numpy(codec.decode(codec.encode(block)))
                    self.coded[(layer_idx, role)] = n + self.block
                else:  # the new token waits in the float16 window
                    t[:, :, -1:] = t[:, :, -1:].half().float()
            return layer.keys, layer.values

        self.cache.update = update


@pytest.mark.parametrize("spec,block", [("turboquant:bits=3", 1), ("kivi:bits=2,group=4,residual=8", 8)])
def test_streaming_equals_per_step_manual_quantization(spec, block):
    model = tiny()
    x = ids(21, seed=3)
    manual = _ManualStreaming(model, spec, block)
    cache = CodecCache(model, spec, mode="streaming")
    pieces = CodecCache(model, spec, mode="streaming")
    expected, got, batched = [], [], []
    with torch.inference_mode():
        for t in range(x.shape[1]):
            expected.append(forward(model, x[:, t:t + 1], manual.cache))
            got.append(forward(model, x[:, t:t + 1], cache))
        pos = 0
        while pos < x.shape[1]:  # what kvtool eval does: as many tokens per pass as stays equivalent
            stop = min(x.shape[1], pos + (pieces.safe_piece() or x.shape[1]))
            batched.append(forward(model, x[:, pos:stop], pieces))
            pos = stop
    expected, got, batched = torch.cat(expected, 1), torch.cat(got, 1), torch.cat(batched, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-4)
    if block > 1:
        assert len(torch.cat([b for b in [batched]], 1)) and pieces.safe_piece() is not None
    fp = cache.footprint()["keys"]
    assert fp["precise_tokens"] == 2 * (21 % block)  # 2 layers, the open window


def test_streaming_rejects_a_selector_that_cannot_stream(test_selectors):
    model = tiny()
    with pytest.raises(CodecError, match="streaming cannot use 'droprange'.*selectors that can stream: "
                                         "keepfirst"):
        CodecCache(model, "droprange:start=2,stop=5", mode="streaming")


# -- eviction through the attention mask ----------------------------------------------------------------


def test_eviction_equals_removing_the_tokens(test_selectors):
    model = tiny()
    x = ids(30, seed=4)
    spec = "droprange:start=5,stop=15+none"
    with torch.inference_mode():
        cache = CodecCache(model, spec)  # installs kvtool's attention: the spec can evict
        forward(model, x[:, :20], cache)
        got = forward(model, x[:, 20:], cache)
        ref = dynamic(model)
        restore_attention(model)
        forward(model, x[:, :20], ref)
        keep = torch.tensor([i for i in range(20) if not 5 <= i < 15])
        for layer in ref.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        expected = forward(model, x[:, 20:], ref, position_ids=torch.arange(20, 30)[None])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,attn", [("llama-gqa", "sdpa"), ("llama-mqa", "eager"), ("llama-gqa", "eager")])
def test_evicted_rows_are_never_read(test_selectors, kind, attn):
    """Per-head eviction (a different range per kv head): whatever the evicted rows hold, the logits are the
    same — the mask removes them (a zeroed key would still draw exp(0) of the softmax)."""
    model = tiny(kind, attn)
    x = ids(26, seed=5)
    spec = "droprange:start=3,stop=9,skew=4+none"
    out = []
    with torch.inference_mode():
        for garbage in (0.0, 1e3):
            cache = CodecCache(model, spec)
            forward(model, x[:, :18], cache)
            cache.compress()
            for layer in cache.layers:
                for track in layer.tracks.values():
                    track.buffer[~track.mask[:, :, :, None].expand_as(track.buffer)] = garbage
            out.append(forward(model, x[:, 18:], cache))
        plain = forward_exact(model, x, 18)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-5)
    assert not torch.allclose(out[0], plain, atol=1e-3)
    restore_attention(model)


def test_eviction_without_kvtool_attention_is_an_error(test_selectors):
    model = tiny()
    x = ids(20)
    cache = CodecCache(model.config, "droprange:start=2,stop=6+none")  # a config: nothing installed
    with torch.inference_mode(), pytest.raises(KvtoolError, match="did not apply kvtool's eviction mask"):
        forward(model, x[:, :10], cache)
        forward(model, x[:, 10:15], cache)
        forward(model, x[:, 15:], cache)


def test_selectors_get_the_prompt_queries(test_selectors, monkeypatch):
    model = tiny()
    x = ids(20)
    seen = {}
    original = DropRange.fit

    def spy(self, data, context=None):
        seen[(context.layer, context.role)] = context
        return original(self, data, context)

    monkeypatch.setattr(DropRange, "fit", spy)
    with torch.inference_mode():
        cache = CodecCache(model, "droprange:start=2,stop=6+none", queries=5)
        forward(model, x[:, :12], cache)
        forward(model, x[:, 12:], cache)
    ctx = seen[(1, "keys")]
    assert ctx.queries.shape == (4, 5, 16)  # (q heads, last 5 prompt positions, head_dim), post-RoPE
    np.testing.assert_array_equal(ctx.query_positions, np.arange(7, 12))
    np.testing.assert_array_equal(ctx.key_positions, np.arange(12))
    assert ctx.scaling == pytest.approx(16 ** -0.5)
    restore_attention(model)


def test_streaming_selector_keeps_sinks_and_the_window(test_selectors):
    model = tiny()
    x = ids(12)
    with torch.inference_mode():
        cache = CodecCache(model, "keepfirst:keep=3+none", mode="streaming")
        for t in range(12):
            forward(model, x[:, t:t + 1], cache)
    track = cache.layers[0].tracks["keys"]
    assert track.mask[0, 0].tolist() == [True] * 3 + [False] * 9
    restore_attention(model)


def test_install_attention_is_idempotent_and_reversible():
    model = tiny()
    assert install_attention(model) == "sdpa"
    assert install_attention(model) == "sdpa"
    assert model.config._attn_implementation == "kvtool_cache_sdpa"
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_codec_streaming_forms():
    assert parse_spec("turboquant:bits=3").streaming_form()[0] == 1
    assert parse_spec("turboquant:bits=3,center=true").streaming_form()[0] == 128
    block, codec = parse_spec("kivi:bits=2").for_role("keys").streaming_form()
    assert block == 128 and codec.residual == 0
    assert parse_spec("uniform:bits=4,axis=channel,group=32").streaming_form()[0] == 32
    assert parse_spec("uniform:bits=4").streaming_form()[0] == 1


def test_cross_layer_pairs_are_coded_together_in_prefill():
    """minicache pairs layers 0 and 1: the CodecCache codes them jointly, like compress does, and counts the
    shared directions once (in layer 0)."""
    from kvtool.codecs.structure.crosslayer import with_partner

    model = tiny()
    x = ids(30, seed=6)
    spec = "minicache:start=0,threshold=0.5"
    a = Assignment.of(spec, spec)
    with torch.inference_mode():
        ref = dynamic(model)
        forward(model, x[:, :20], ref)
        stored = 0
        for role in ("keys", "values"):
            first, second = (getattr(layer, role)[0].numpy() for layer in ref.layers)
            codec = a.codec(0, role)
            ctx = LayerContext(layer=0, role=role, key_positions=np.arange(20))
            codec.fit(first, ctx)
            enc_a, enc_b = codec.encode_pair(first, second, ctx, ctx)
            assert enc_a.nbytes > enc_b.nbytes  # the shared part lives in the first layer only
            stored += enc_a.nbytes + enc_b.nbytes
            setattr(ref.layers[0], role, torch.from_numpy(codec.decode(enc_a))[None])
            setattr(ref.layers[1], role, torch.from_numpy(codec.decode(with_partner(enc_b, enc_a)))[None])
        expected = forward(model, x[:, 20:], ref)
        cache = CodecCache(model, spec)
        forward(model, x[:, :20], cache)
        got = forward(model, x[:, 20:], cache)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    precise = 2 * 2 * 2 * 10 * 16 * 4  # layers, roles, kv heads, continuation tokens, d, float32
    assert cache.stored_bytes() == stored + precise
    with pytest.raises(CodecError, match="streaming cannot use 'minicache'"):
        CodecCache(model, spec, mode="streaming")
    with pytest.raises(CodecError, match="streaming cannot use 'age'"):
        CodecCache(model, "age", mode="streaming")


def test_prerope_lowrank_works_in_the_model_cache():
    """lowrank:prerope=true in CodecCache: no recorded pre-RoPE keys there, so the keys are rotated back with
    the model's rotary embedding; full rank rebuilds them (fp16 coefficients), half rank changes the logits."""
    from kvtool.codecs.assignment import Assignment

    model = tiny("llama-gqa")  # head_dim 16
    x = ids(40, seed=3)
    exact = forward_exact(model, x, 30)
    with torch.inference_mode():
        results = {}
        for rank in (16, 8):
            cache = CodecCache(model, Assignment.of(f"lowrank:rank={rank},prerope=true", "none"))
            forward(model, x[:, :30], cache)
            results[rank] = forward(model, x[:, 30:], cache)
            assert cache.footprint()["keys"]["stored_bytes"] > 0
    torch.testing.assert_close(results[16], exact, rtol=0, atol=2e-2)
    assert (results[8] - exact).abs().max() > (results[16] - exact).abs().max()
