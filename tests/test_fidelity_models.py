"""Issue 21 on a tiny random Gemma 3 (MQA, QK-norm, sliding-window layers, two RoPE bases): ``kvtool eval``
hands each layer the RoPE it really used, so ``expected`` rotates its statistics and ``kvquant`` codes keys
before RoPE there (no fallback warning); the outlier codecs run inside the model's cache."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.codecs.assignment import Assignment
from kvtool.errors import ModelError
from kvtool.evaluate import evaluate
from kvtool.models import load_model
from kvtool.packaged import PACKAGED, chunk_files

VOCAB = 128


@pytest.fixture(scope="module")
def tiny_gemma3(tiny_model_factory):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                              sliding_window=8, query_pre_attn_scalar=32,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return load_model(str(tiny_model_factory(config, "gemma3-mqa")))


def test_eval_gives_each_layer_its_rope_and_runs_the_outlier_codecs(tiny_gemma3) -> None:
    tokens = np.random.default_rng(0).integers(0, VOCAB, 64)
    specs = ["expected:keep=0.5", "kvquant:bits=4", "outliers:frac=0.02+turboquant:bits=3",
             "smooth:alpha=0.5+turboquant:bits=3"]
    r = evaluate(tiny_gemma3, tokens, [Assignment.of(s, s) for s in specs], context=64)
    for m in r["methods"]:
        assert m["warnings"] == [], (m["label"], m["warnings"])  # RoPE found in every layer
        assert np.isfinite(m["kld_mean"]) and m["kld_mean"] >= 0
    expected, kvquant = r["methods"][0], r["methods"][1]
    assert expected["queries_observed"] == 32  # the whole 32-token prompt
    assert 4 < kvquant["bits_per_element"] < 8


def test_packaged_model_names_its_packages_when_missing(monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="make models"):
        chunk_files(PACKAGED["gemma3-270m"])
