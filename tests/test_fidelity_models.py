"""Issue 21 on tiny random configs of the real families kvtool loads offline — Gemma 3 (MQA, QK-norm,
sliding-window layers, two RoPE bases) and Qwen2 (GQA, q/k/v biases, RoPE base 1e6): ``kvtool eval`` hands
each layer the RoPE it really used, so ``expected`` rotates its statistics and ``kvquant`` codes keys before
RoPE there (no fallback warning); the outlier codecs run inside the model's cache. And the packaged models'
chunk joining (:mod:`kvtool.packaged`)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.codecs.assignment import Assignment
from kvtool.errors import ModelError
from kvtool.evaluate import evaluate
from kvtool.models import load_model
from kvtool.packaged import PACKAGED, PackagedModel, chunk_files, packaged_path

VOCAB = 128


@pytest.fixture(scope="module")
def tiny_gemma3(tiny_model_factory):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                              sliding_window=8, query_pre_attn_scalar=32,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return load_model(str(tiny_model_factory(config, "gemma3-mqa")))


@pytest.fixture(scope="module")
def tiny_qwen2(tiny_model_factory):
    import torch
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
    path = tiny_model_factory(config, "qwen2-bias")
    loaded = load_model(str(path))
    with torch.no_grad():  # Qwen2's key bias: a few large constant channels, the outliers it is known for
        for layer in loaded.model.model.layers:
            layer.self_attn.k_proj.bias[:3] = 8.0
    return loaded


@pytest.mark.parametrize("family", ["tiny_gemma3", "tiny_qwen2"])
def test_eval_gives_each_layer_its_rope_and_runs_the_outlier_codecs(family, request) -> None:
    loaded = request.getfixturevalue(family)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 64)
    specs = ["expected:keep=0.5", "kvquant:bits=4", "outliers:frac=0.02+turboquant:bits=3",
             "smooth:alpha=0.5+turboquant:bits=3"]
    r = evaluate(loaded, tokens, [Assignment.of(s, s) for s in specs], context=64)
    for m in r["methods"]:
        assert m["warnings"] == [], (m["label"], m["warnings"])  # RoPE found in every layer
        assert np.isfinite(m["kld_mean"]) and m["kld_mean"] >= 0
    expected, kvquant = r["methods"][0], r["methods"][1]
    assert expected["queries_observed"] == 32  # the whole 32-token prompt
    assert 4 < kvquant["bits_per_element"] < 8


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_model_names_its_packages_when_missing(name, monkeypatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="make models"):
        chunk_files(PACKAGED[name])


def test_packaged_model_joins_its_chunks_once_and_checks_the_digest(tmp_path, monkeypatch) -> None:
    import hashlib
    import importlib.util
    from types import SimpleNamespace

    parts = [b"GGUF" + bytes(range(7)), b"\x01" * 5, b"tail"]
    for i, data in enumerate(parts):
        (tmp_path / f"pkg{i}" / "data").mkdir(parents=True)
        (tmp_path / f"pkg{i}" / "data" / f"part{i}.bin").write_bytes(data)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path / name)]))
    whole = b"".join(parts)
    chunks = tuple((f"pkg{i}", f"data/part{i}.bin") for i in range(3))
    good = PackagedModel("t", "test", "t.gguf", hashlib.sha256(whole).hexdigest(), ("t==1",), chunks)
    bad = PackagedModel("u", "test", "u.gguf", "0" * 64, ("u==1",), chunks)
    monkeypatch.setitem(PACKAGED, "t", good)
    monkeypatch.setitem(PACKAGED, "u", bad)
    with pytest.raises(ModelError, match="sha256"):
        packaged_path("u", tmp_path / "cache")
    assert not (tmp_path / "cache" / "packaged" / "u.gguf").exists()  # nothing half-checked left behind
    path = packaged_path("t", tmp_path / "cache")
    assert path.read_bytes() == whole
    (tmp_path / "pkg0" / "data" / "part0.bin").unlink()
    assert packaged_path("t", tmp_path / "cache") == path  # joined once: the chunks are not read again
