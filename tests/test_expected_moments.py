"""Issue 18: ``kvtool eval`` streams the moments of the prompt's queries for ``expected`` instead of keeping every
query; the statistics, the scores, the kept rows and the eval report equal those of the all-queries path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtool.codecs import LayerContext, parse_spec
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.moments import MomentRecorder, QueryMoments
from kvtool.codecs.select import selection
from kvtool.errors import CodecError
from kvtool.evaluate import evaluate
from kvtool.models import load_model
from kvtool.rope import RopeParams

QH, KV, N, D = 4, 2, 90, 16
ROPES = [RopeParams((1e4 ** -(np.arange(8) / 8)).astype(np.float32), 1.0),
         RopeParams((1e6 ** -(np.arange(6) / 6)).astype(np.float32), 1.25)]  # partial rotary, a factor


def _queries(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(QH, N, D, generator=g) * 2 + torch.linspace(-3, 5, D)  # a mean far from 0
    q[:, :3] *= 40.0  # loud first positions, as attention sinks' queries are
    return q


def _streamed(q: torch.Tensor, head: int, pieces=(7, 30, 53)) -> QueryMoments:
    rec = MomentRecorder([*ROPES, ROPES[0]], head)  # a duplicate candidate is one frame
    start = 0
    for t in pieces:
        rec(1, q[None, :, start:start + t], None, None, None)
        start += t
    assert start == N and len(rec.ropes) == 2
    return rec.moments[1]


def _context(q: torch.Tensor, keys: np.ndarray, rope: RopeParams | None, moments: QueryMoments | None,
             last: int | None = None) -> LayerContext:
    qq = q if last is None else q[:, -last:]
    return LayerContext(layer=1, role="keys", keys=keys, values=keys[:, :, ::-1].copy(), queries=qq.numpy(),
                        query_positions=np.arange(N - qq.shape[1], N), key_positions=np.arange(N), scaling=0.25,
                        rope=rope, query_moments=moments)


@pytest.mark.parametrize("rope", [None, *ROPES])
@pytest.mark.parametrize("sink,future", [(0, 512), (1, 0), (4, 512), (9, 64), (9, 0)])
def test_streamed_moments_give_the_statistics_and_rows_of_all_queries(rope, sink, future) -> None:
    q = _queries(sink + future)
    keys = np.random.default_rng(sink).standard_normal((KV, N, D)).astype(np.float32)
    moments = _streamed(q, head=9)
    spec = f"expected:keep=0.3,sink={sink},future={future}"
    codec = parse_spec(spec)
    everything = _context(q, keys, rope, None)
    streamed = _context(q, keys, rope, moments, last=1)  # what eval hands it: the newest query and the moments
    obs_all, obs_one = (selection.observed("expected", c, N) for c in (everything, streamed))
    r = None if rope is None or not future else (torch.from_numpy(rope.inv_freq.astype(np.float64)),
                                                 rope.attention_factor)
    mu_a, sigma_a = codec.statistics(obs_all, r)
    mu_s, sigma_s = codec.statistics(obs_one, r, moments)
    torch.testing.assert_close(mu_s, mu_a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sigma_s, sigma_a, rtol=1e-8, atol=1e-8 * float(sigma_a.abs().max()))
    np.testing.assert_allclose(codec.scores(keys, streamed), codec.scores(keys, everything), rtol=1e-7, atol=1e-12)
    kept_all = parse_spec(spec).fit(keys, everything).keep_mask(keys)
    kept_streamed = parse_spec(spec).fit(keys, streamed).keep_mask(keys)
    assert (kept_all == kept_streamed).all()
    # the test can fail: the newest query alone, without the moments, gives other statistics
    alone = codec.statistics(obs_one, r)[0] if sink < N - 1 else None
    assert alone is None or not torch.allclose(alone, mu_a, atol=1e-3)


def test_moments_refuse_a_sink_beyond_what_was_kept_and_a_rope_they_lack() -> None:
    moments = _streamed(_queries(), head=4)
    with pytest.raises(CodecError, match="from position 4 on"):
        moments.statistics(5, None)
    other = (torch.ones(8, dtype=torch.float64), 1.0)
    with pytest.raises(CodecError, match="no frame for this layer's RoPE"):
        moments.statistics(4, other)
    short = MomentRecorder(ROPES, 16)  # a prompt shorter than the head: every query kept as it is
    short(0, _queries()[None, :, :10], None, None, None)
    mu, _ = short.moments[0].statistics(12, None)  # no position from the sink on: all of them, as before
    torch.testing.assert_close(mu, _queries()[:, :10].double().mean(dim=1))


@pytest.fixture(scope="module")
def tiny_gqa(tiny_model_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return load_model(str(tiny_model_factory(config, "llama-gqa-moments")))


@pytest.fixture(scope="module")
def tiny_gemma3_two_ropes(tiny_model_factory):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                              sliding_window=8, query_pre_attn_scalar=32,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return load_model(str(tiny_model_factory(config, "gemma3-moments")))


def _same_reports(a: dict, b: dict) -> None:
    for ma, mb in zip(a["methods"], b["methods"], strict=True):
        assert ma["label"] == mb["label"] and ma["warnings"] == mb["warnings"]
        assert ma["queries_observed"] == mb["queries_observed"]
        for field in ("kld_mean", "delta_ppl_pct", "top1_agreement", "bits_per_element", "cache_bytes_compressed"):
            assert ma[field] == pytest.approx(mb[field], rel=1e-6, abs=1e-9), (ma["label"], field)


SPECS = ["expected:keep=0.5", "expected:keep=0.4,sink=0,future=0", "expected:keep=0.5,sink=6,future=16,cov=false"]


@pytest.mark.parametrize("family", ["tiny_gqa", "tiny_gemma3_two_ropes"])
def test_eval_with_streamed_moments_reports_what_all_queries_gave(family, request) -> None:
    loaded = request.getfixturevalue(family)
    tokens = np.random.default_rng(3).integers(0, 128, 128)
    methods = [Assignment.of(s, s) for s in SPECS]
    methods.append(Assignment.of("expected:keep=0.5+turboquant:bits=4", "snapkv:keep=0.5"))  # mixed: both
    streamed = evaluate(loaded, tokens, methods, context=64)
    recorded = evaluate(loaded, tokens, methods, context=64, queries=32)  # all 32 prompt queries, as before
    _same_reports(streamed, recorded)
    assert [m["queries_observed"] for m in streamed["methods"]] == [32] * 4
    assert all(m["warnings"] == [] for m in streamed["methods"])  # every layer's RoPE found and rotated


def test_eval_without_a_rope_uses_the_post_rope_moments_and_warns(tiny_model_factory) -> None:
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    loaded = load_model(str(tiny_model_factory(config, "gpt2-moments")))
    tokens = np.random.default_rng(4).integers(0, 128, 64)
    methods = [Assignment.of(s, s) for s in SPECS[:2]]
    streamed = evaluate(loaded, tokens, methods, context=64)
    _same_reports(streamed, evaluate(loaded, tokens, methods, context=64, queries=32))
    assert "no single RoPE" in streamed["methods"][0]["warnings"][0]  # future=512 asked for a rotation
    assert streamed["methods"][1]["warnings"] == []  # future=0: nothing to warn about


@pytest.mark.model
def test_bundled_model_eval_with_moments_equals_all_queries(smollm) -> None:
    from pathlib import Path

    from kvtool.evaluate import tokenize_text

    text = Path(__file__).resolve().parents[1] / "samples" / "gpl-3.0.txt"
    tokens = tokenize_text(smollm, text, max_tokens=64)
    methods = [Assignment.of("expected:keep=0.5", "expected:keep=0.5"),
               Assignment.of("expected:keep=0.25,sink=2,future=0", "expected:keep=0.25,sink=2,future=0")]
    streamed = evaluate(smollm, tokens, methods, context=64)
    _same_reports(streamed, evaluate(smollm, tokens, methods, context=64, queries=32))
    assert streamed["methods"][0]["queries_observed"] == 32 and streamed["methods"][0]["kld_mean"] > 0
