"""MiniCache: adjacent layers share directions through compress's cross-layer hook."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from _cli import assert_one_line_error, run
from _synth_cache import HEAD_DIM, KV_HEADS, Q_HEADS, gaussian, write_cache

from kvtool.codecs import parse_spec
from kvtool.codecs.assignment import Assignment
from kvtool.codecs.structure.crosslayer import with_partner
from kvtool.compress import compress, decompress
from kvtool.store import CacheReader

T, LAYERS = 256, 6


def _cache(path: Path, same: float = 1.0) -> Path:
    """Layers 2k and 2k+1 share the directions of a ``same`` share of their tokens (other norms); the
    other tokens point elsewhere."""
    rng = np.random.default_rng(0)
    base = [gaussian(rng, KV_HEADS, T, HEAD_DIM) for _ in range(LAYERS // 2)]
    values = [gaussian(rng, KV_HEADS, T, HEAD_DIM) for _ in range(LAYERS // 2)]
    cut = int(same * T)

    def layer_fn(i: int):
        k, v = base[i // 2].copy(), values[i // 2].copy()
        if i % 2:
            scale = rng.uniform(0.5, 2.0, size=(KV_HEADS, T, 1)).astype(np.float32)
            k, v = k * scale, v * scale  # same directions, other magnitudes
            k[:, cut:], v[:, cut:] = gaussian(rng, KV_HEADS, T - cut, HEAD_DIM), gaussian(rng, KV_HEADS, T - cut,
                                                                                            HEAD_DIM)
        return k, v, gaussian(rng, Q_HEADS, 8, HEAD_DIM)

    return write_cache(path, LAYERS, T, layer_fn, num_queries=8)


def test_identical_directions_are_exact_at_about_half_the_bytes(tmp_path: Path) -> None:
    cache, out, back = _cache(tmp_path / "c.h5"), tmp_path / "m.h5", tmp_path / "back.h5"
    report = compress(cache, assignment=Assignment.of("minicache:start=2", "minicache:start=2"), output=out)
    pairs = report["cross_layer"]["pairs"]
    assert [(p["layers"], p["role"]) for p in pairs] == [([2, 3], "keys"), ([2, 3], "values"),
                                                         ([4, 5], "keys"), ([4, 5], "values")]
    for p in pairs:
        assert p["merged_fraction"] == 1.0
        assert p["stored_bytes"] == KV_HEADS * T * (2 * HEAD_DIM + 2 + 2)  # one direction, two norms
        assert p["stored_bytes"] / p["fp16_bytes"] == pytest.approx(0.5 + 1 / HEAD_DIM)
    assert report["cross_layer"]["bytes_saved"] == sum(p["fp16_bytes"] - p["stored_bytes"] for p in pairs)
    rows = report["layers"]
    assert rows[0]["keys"]["bits_per_element"] == 16.0  # before start: alone, fp16
    assert rows[2]["keys"]["bytes_after"] > rows[3]["keys"]["bytes_after"]  # the shared part counted once
    for row in rows:
        assert row["keys"]["rel_mse"] < 1e-6 and row["attention_output_rel_error"] < 1e-3
    # decompress reads the shared part from the first layer of each pair
    decompress(out, back)
    with CacheReader(back) as r, CacheReader(cache) as src:
        for i in range(LAYERS):
            np.testing.assert_allclose(r.layer(i).keys, src.layer(i).keys, rtol=2e-3, atol=2e-3)


def test_disagreeing_tokens_stay_unmerged(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "c.h5", same=0.25)
    report = compress(cache, assignment=Assignment.of("minicache:start=0,threshold=0.05", "fp16"))
    for p in report["cross_layer"]["pairs"]:
        assert p["merged_fraction"] == pytest.approx(0.25)
    # nothing merges (unrelated layers, like this model's): exactly fp16's bytes, nothing saved
    unrelated = _cache(tmp_path / "u.h5", same=0.0)
    none = compress(unrelated, assignment=Assignment.of("minicache:start=0", "fp16"), layers=[2, 3])
    pair = none["cross_layer"]["pairs"][0]
    assert pair["merged_fraction"] == 0 and pair["bytes_saved"] == 0
    with CacheReader(cache) as src:
        a, b = src.layer(2).keys, src.layer(3).keys
    codec = parse_spec("minicache:threshold=0.05")
    enc_a, enc_b = codec.encode_pair(a, b)
    y_b = parse_spec(codec.spec()).decode(with_partner(enc_b, enc_a))
    np.testing.assert_array_equal(y_b[:, 64:], b[:, 64:].astype(np.float16).astype(np.float32))  # retained


def test_at_most_two_layers_in_memory(tmp_path: Path, monkeypatch) -> None:
    cache = _cache(tmp_path / "c.h5")
    refs: list[weakref.ref] = []
    peak = [0]
    original = CacheReader.layer

    def tracked(self, *args, **kwargs):
        gc.collect()
        peak[0] = max(peak[0], sum(r() is not None for r in refs) + 1)  # the layers alive, and this one
        data = original(self, *args, **kwargs)
        refs.append(weakref.ref(data))
        return data

    monkeypatch.setattr(CacheReader, "layer", tracked)
    compress(cache, assignment=Assignment.of("minicache:start=0", "minicache:start=0"), output=tmp_path / "m.h5")
    assert peak[0] == 2


def test_start_out_of_range_is_one_line_and_no_file(tmp_path: Path) -> None:
    cache, out = _cache(tmp_path / "c.h5"), tmp_path / "m.h5"
    assert_one_line_error(run("compress", cache, "--method", "minicache:start=5", "-o", out),
                          "minicache start=5 is out of range: the model has layers 0..5")
    assert not out.exists()
    assert_one_line_error(run("compress", cache, "--method", "minicache:t=1.5"), "t must be in [0, 1], got 1.5")
