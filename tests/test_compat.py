"""kvtool.compat: the cache keyword and output field on both sides of transformers 5.24's rename."""

from __future__ import annotations

import pytest
import torch

from kvtool.codecs.assignment import Assignment
from kvtool.compat import (
    CACHE_NAME,
    LEGACY_CACHE_NAME,
    forward_cache_kwarg,
    generate_cache_kwarg,
    library_cache_name,
    output_cache,
)
from kvtool.models import load_model

VOCAB = 49152


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return load_model(str(tiny_model_factory(config, "compat-llama")))


@pytest.fixture
def deprecation_warnings(monkeypatch):
    """Every rename warning transformers gives during the test: the old keyword warns through Python's
    ``warnings`` (``deprecate_kwarg``), the old output field through ``logger.warning_once``."""
    import warnings

    import transformers.utils.generic as generic

    seen: list[str] = []
    if hasattr(generic, "logger"):
        monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: seen.append(str(msg)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    seen.extend(str(w.message) for w in caught)
    assert not [m for m in seen if "past_key_values" in m or "cache_params" in m]


def test_library_name_follows_the_release():
    import transformers
    from packaging.version import Version

    renamed = Version(transformers.__version__).release >= (5, 24)
    assert library_cache_name() == (CACHE_NAME if renamed else LEGACY_CACHE_NAME)


def test_forward_keyword_is_read_from_the_signature(tiny):
    assert forward_cache_kwarg(tiny.model) == library_cache_name()

    class Legacy(torch.nn.Module):  # a remote-code model that kept the old name
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids

    class KwargsOnly(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    assert forward_cache_kwarg(Legacy()) == LEGACY_CACHE_NAME
    assert forward_cache_kwarg(KwargsOnly()) == library_cache_name()


@pytest.mark.usefixtures("deprecation_warnings")  # it fails the test on any rename warning
def test_forward_uses_the_given_cache_and_returns_it(tiny):
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny.model.config)
    ids = torch.arange(10, 22).unsqueeze(0)
    with torch.inference_mode():
        out = tiny.model(input_ids=ids, use_cache=True, **{forward_cache_kwarg(tiny.model): cache})
        assert output_cache(out) is cache and cache.get_seq_length() == 12
        # the cache really is continued: one more token scored on it equals the full pass's last logits
        step = tiny.model(input_ids=ids[:, -1:] + 1, use_cache=True, **{forward_cache_kwarg(tiny.model): cache})
        full = tiny.model(input_ids=torch.cat([ids, ids[:, -1:] + 1], dim=1))
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], rtol=1e-4, atol=1e-5)
    assert output_cache(full) is not None and output_cache(full) is not cache


@pytest.mark.usefixtures("deprecation_warnings")
def test_generate_continues_the_given_cache(tiny):
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny.model.config)
    ids = torch.arange(10, 18).unsqueeze(0)
    out = tiny.model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                              pad_token_id=0, **{generate_cache_kwarg(): cache})
    assert output_cache(out) is cache
    assert cache.get_seq_length() == 8 + 3 - 1  # the last generated token is never fed back


def test_output_without_a_cache_gives_none(tiny):
    with torch.inference_mode():
        out = tiny.model(input_ids=torch.arange(10, 14).unsqueeze(0), use_cache=False)
    assert output_cache(out) is None
    assert output_cache((out.logits,)) is None  # a return_dict=False tuple holds no named cache


def _cached_logits(model, ids, *, grouped: bool):
    from transformers import DynamicCache

    from kvtool.compat import grouped_sdpa

    cache = DynamicCache()
    out = []
    for part in (ids[:, :20], ids[:, 20:]):  # the second call has a cache, hence a mask
        if grouped:
            with grouped_sdpa(part.device):
                out.append(model(input_ids=part, **{forward_cache_kwarg(model): cache}, use_cache=True).logits)
        else:
            out.append(model(input_ids=part, **{forward_cache_kwarg(model): cache}, use_cache=True).logits)
    return torch.cat(out, dim=1)


def test_grouped_sdpa_gives_the_same_logits_without_repeating_kv_heads(tiny, monkeypatch):
    import inspect
    import os

    import transformers.integrations.sdpa_attention as sdpa

    from kvtool.compat import FORCE_GQA_ENV

    model = tiny.model
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    calls: list[int] = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: calls.append(n) or real(x, n))
    with torch.inference_mode():
        plain = _cached_logits(model, ids, grouped=False)
        repeated = len([n for n in calls if n > 1])
        calls.clear()
        grouped = _cached_logits(model, ids, grouped=True)
    assert torch.equal(plain, grouped)
    assert FORCE_GQA_ENV not in os.environ  # restored
    assert repeated > 0
    if FORCE_GQA_ENV in inspect.getsource(sdpa):  # releases with the switch: no kv head repeated
        assert not [n for n in calls if n > 1]


def test_eval_passes_leave_grouped_heads_grouped_on_cpu(tiny, monkeypatch):
    """Every pass of an eval (exact prefill and continuation, the method) runs inside grouped_sdpa."""
    import inspect

    import numpy as np
    import transformers.integrations.sdpa_attention as sdpa

    from kvtool.compat import FORCE_GQA_ENV
    from kvtool.evaluate import evaluate

    if FORCE_GQA_ENV not in inspect.getsource(sdpa):
        pytest.skip("this transformers release has no grouped-sdpa switch")
    tiny.model.set_attn_implementation("sdpa")
    calls: list[int] = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: calls.append(n) or real(x, n))
    tokens = np.random.default_rng(0).integers(0, VOCAB, 64)
    report = evaluate(tiny, tokens, [Assignment.of("turboquant:bits=4", "turboquant:bits=4")], context=64)
    assert report["tokens_scored"] > 0
    assert not [n for n in calls if n > 1]
