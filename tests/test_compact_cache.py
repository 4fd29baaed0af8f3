"""Compact CodecCache (kvtool.runtime.compact): the model sees exactly what the decoded cache gives it, and
the cache holds what its codecs store, counted from the outside (kvtool.runtime.memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cache import dynamic, forward, ids, tiny  # tests/ is on sys.path

from kvtool.cache import CodecCache
from kvtool.codecs.assignment import Assignment
from kvtool.compat import generate_cache_kwarg
from kvtool.hooks import restore_attention
from kvtool.runtime.compact import CompactTrack
from kvtool.runtime.memory import held_bytes

SPECS = ["turboquant:bits=3", "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true",
         "kivi:bits=2,group=4,residual=4", "uniform:bits=4,group=8", "fp8", "turboquant:bits=2.5",
         "h2o:keep=0.5+turboquant:bits=3", "knorm:keep=0.5+kivi:bits=2,group=4,residual=0",
         Assignment("turboquant:bits=3", "kivi:bits=2,group=4,residual=4", {1: {"keys": "fp8"}}),
         "expected:keep=0.5+turboquant:bits=3", "salient:select=[knorm:keep=0.5],hi=[turboquant:bits=3],lo=[drop]"]
STREAMING = ["turboquant:bits=3", "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true",
             "kivi:bits=2,group=4,residual=4", "fp8"]


def _pieces(model, x, spec, compact, mode="prefill", cuts=(13, 20, 21, 22)):
    cache = CodecCache(model, spec, mode=mode, compact=compact)
    out, start = [], 0
    with torch.inference_mode():
        for stop in (*cuts, x.shape[1]):
            out.append(forward(model, x[:, start:stop], cache))
            start = stop
    return torch.cat(out, dim=1), cache


CASES = [("llama-gqa", s) for s in SPECS] + [(k, s) for k in ("llama-mqa", "mistral-sliding") for s in SPECS[1:3]] \
    + [("mistral-sliding", SPECS[6])]


@pytest.mark.parametrize("kind,spec", CASES, ids=str)
def test_compact_gives_the_decoded_caches_logits(kind, spec):
    model = tiny(kind)
    x = ids(30, seed=2)
    decoded, _ = _pieces(model, x, spec, compact=False)
    compact, cache = _pieces(model, x, spec, compact=True)
    assert torch.equal(compact, decoded)
    track = cache.layers[0].tracks["keys"]
    assert isinstance(track, CompactTrack)
    if kind == "mistral-sliding":  # window 8: the coded prompt has left it
        assert track.held == 7 and not track.segments
    else:
        assert len(track.segments) == 1 and track.precise == 30 - 13
    restore_attention(model)


@pytest.mark.parametrize("kind,spec", [("llama-gqa", s) for s in STREAMING] + [("mistral-sliding", STREAMING[2])])
def test_compact_streaming_gives_the_decoded_caches_logits(kind, spec):
    model = tiny(kind)
    x = ids(26, seed=3)
    cuts = tuple(range(1, 26))  # token by token
    decoded, _ = _pieces(model, x, spec, compact=False, mode="streaming", cuts=cuts)
    compact, cache = _pieces(model, x, spec, compact=True, mode="streaming", cuts=cuts)
    assert torch.equal(compact, decoded)
    assert cache.stored_bytes() == _pieces(model, x, spec, compact=False, mode="streaming", cuts=cuts)[1].stored_bytes()


@pytest.mark.parametrize("how", [dict(do_sample=False), dict(do_sample=True, top_k=20),
                                 dict(do_sample=False, num_beams=3)], ids=["greedy", "sample", "beams"])
@pytest.mark.parametrize("spec", ["turboquant:bits=3", "h2o:keep=0.5+turboquant:bits=3"])
def test_generate_is_the_same_in_both_modes(how, spec):
    model = tiny()
    x = ids(12)
    out = []
    with torch.inference_mode():
        for compact in (False, True):
            torch.manual_seed(0)
            out.append(model.generate(x, max_new_tokens=10, min_new_tokens=10, **how,
                                      **{generate_cache_kwarg(): CodecCache(model, spec, compact=compact)}))
    assert torch.equal(out[0], out[1])
    restore_attention(model)


def test_compact_holds_the_stored_bytes_and_little_else():
    model = tiny()
    x = ids(200, seed=6)
    spec = "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true"
    with torch.inference_mode():
        compact, decoded, plain = (CodecCache(model, spec, compact=True), CodecCache(model, spec), dynamic(model))
        for cache in (compact, decoded, plain):
            forward(model, x[:, :199], cache)
            forward(model, x[:, 199:], cache)
    stored = compact.stored_bytes()
    assert stored == decoded.stored_bytes()
    held = held_bytes(compact)
    # codes, norms, the precise window: nothing else (the decoded copy is gone) — a tiny model's few
    # per-layer tensors (the rope frequencies) are the only other storages
    assert stored <= held <= 1.15 * stored + 4096
    assert held_bytes(decoded) > held_bytes(plain) > 3 * held  # decoded mode keeps a working copy


@pytest.mark.model
@pytest.mark.parametrize("spec", ["turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true",
                                  "kivi:bits=2", "fp8", "h2o:keep=0.5+turboquant:bits=3"])
def test_bundled_model_generates_the_same_tokens_in_both_modes(smollm, spec):
    model, tok = smollm.model, smollm.tokenizer
    text = (Path(__file__).resolve().parents[1] / "samples" / "apache-2.0.txt").read_text()[:2000]
    x = tok(text, return_tensors="pt").input_ids[:, :200]
    out, caches = [], []
    with torch.inference_mode():
        for compact in (False, True):
            cache = CodecCache(model, spec, compact=compact)
            out.append(model.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      **{generate_cache_kwarg(): cache}))
            caches.append(cache)
    assert torch.equal(out[0], out[1])
    stored = caches[1].stored_bytes()
    assert stored == caches[0].stored_bytes()
    assert held_bytes(caches[1]) <= 1.15 * stored
    restore_attention(model)


@pytest.mark.parametrize("kind,attn,spec", [
    ("llama-gqa", "sdpa", "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true"),
    ("llama-gqa", "sdpa", "kivi:bits=2,group=4,residual=4"), ("llama-gqa", "sdpa", "fp8"),
    ("llama-mqa", "eager", "h2o:keep=0.5+turboquant:bits=3"), ("llama-mqa", "eager", "kivi:bits=2,group=4,residual=4"),
    ("mistral-sliding", "sdpa", "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true"),
    ("mistral-sliding", "sdpa", "kivi:bits=2,group=4,residual=4")])
def test_attention_from_codes_in_the_model_equals_decoded_attention(kind, attn, spec):
    model = tiny(kind, attn)
    x = ids(40, seed=7)
    cuts = (20, 21, 22, 30)  # decoding steps and a teacher-forced piece after the coded prompt
    decoded, _ = _pieces(model, x, spec, compact=False, cuts=cuts)
    restore_attention(model)
    cache = CodecCache(model, spec, compact=True, attention="codes")
    out, start = [], 0
    with torch.inference_mode():
        for stop in (*cuts, x.shape[1]):
            out.append(forward(model, x[:, start:stop], cache))
            start = stop
    torch.testing.assert_close(torch.cat(out, 1), decoded, rtol=1e-4, atol=1e-4)
    restore_attention(model)


def test_attention_from_codes_generates_with_beams():
    model = tiny()
    x = ids(12)
    with torch.inference_mode():
        a = model.generate(x, max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False,
                           **{generate_cache_kwarg(): CodecCache(model, "turboquant:bits=4", compact=True)})
        b = model.generate(x, max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False,
                           **{generate_cache_kwarg(): CodecCache(model, "turboquant:bits=4", compact=True,
                                                                 attention="codes")})
    assert torch.equal(a, b)
    restore_attention(model)


def test_compact_refuses_cross_layer_codecs_and_codes_without_compact():
    from kvtool.errors import InputError

    model = tiny()
    with pytest.raises(InputError, match="cross-layer codec 'minicache'"):
        CodecCache(model, "minicache", compact=True)
    with pytest.raises(InputError, match="use compact=True with it"):
        CodecCache(model, "turboquant:bits=3", attention="codes")
    with pytest.raises(InputError, match="attention must be one of decode, codes"):
        CodecCache(model, "turboquant:bits=3", compact=True, attention="fused")
