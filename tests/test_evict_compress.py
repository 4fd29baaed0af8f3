"""Eviction through `compress` and `decompress`: the observe/held-out split, honest bytes, the kept mask,
and bad input (one line on stderr, exit 2, no partial file)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cli import assert_one_line_error, run
from _synth_cache import HEAD_DIM, KV_HEADS, Q_HEADS, gaussian, write_cache

from kvtool import metrics
from kvtool.codecs.base import selection_mask
from kvtool.compress import compress, decompress
from kvtool.store import CacheReader

T, TQ, LAYERS = 200, 16, 3


def _cache(path: Path, seed: int = 0, queries: bool = True, late_seed: int | None = None) -> Path:
    """A synthetic cache; ``late_seed`` replaces the last half of the queries with other random ones."""
    def layer_fn(i: int):
        rng = np.random.default_rng(seed * 100 + i)
        k, v = gaussian(rng, KV_HEADS, T, HEAD_DIM), gaussian(rng, KV_HEADS, T, HEAD_DIM)
        q = gaussian(rng, Q_HEADS, TQ, HEAD_DIM) * 2 if queries else None
        if queries and late_seed is not None:
            q[:, TQ // 2:] = gaussian(np.random.default_rng(late_seed + i), Q_HEADS, TQ // 2, HEAD_DIM) * 2
        return k, v, q

    return write_cache(path, LAYERS, T, layer_fn, num_queries=TQ if queries else 0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("evict") / "cache.h5")


def test_default_split_and_held_out_metrics(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    report = compress(cache, output=out, assignment=_pair("snapkv:keep=0.25,window=4"))
    split = report["query_split"]
    assert split["observe"] == TQ // 2 and split["default"] and split["captured"] == TQ
    assert split["observed_positions"] == list(range(T - TQ, T - TQ // 2))
    assert split["heldout_positions"] == list(range(T - TQ // 2, T))
    assert any("positions 184..191" in n for n in report["notes"])
    # recomputed from the file alone: kept fraction, bytes, attention error on the held-out queries
    with CacheReader(out) as r, CacheReader(cache) as src:
        for i, row in enumerate(report["layers"]):
            keys_arrays, attrs = r.read_encoded(i, "keys")
            mask = selection_mask(keys_arrays, tuple(attrs["shape"]))
            assert row["kept_fraction"] == pytest.approx(mask.mean()) == pytest.approx(0.25)
            assert row["keys"]["bytes_after"] == sum(a.nbytes for a in keys_arrays.values())
            assert keys_arrays["kept"].dtype == np.uint8  # 200 tokens fit in a byte
            data = src.layer(i)
            kh, vh = (np.where(mask[..., None], x, 0) for x in (data.keys, data.values))
            held = slice(TQ // 2, None)
            att = metrics.attention(data.queries[:, held], data.keys, data.values, kh, vh,
                                    data.query_positions[held], data.key_positions, scaling=data.scaling,
                                    key_mask=mask)
            assert row["attention_output_rel_error"] == pytest.approx(att["attention_output_rel_error"],
                                                                      rel=1e-2)


def test_selectors_never_see_the_held_out_queries(tmp_path: Path) -> None:
    a, b = _cache(tmp_path / "a.h5", 1), _cache(tmp_path / "b.h5", 1, late_seed=7)
    kept = []
    for path in (a, b):
        out = path.with_suffix(".c.h5")
        compress(path, output=out, assignment=_pair("h2o:keep=0.3"), observe=TQ // 2)
        with CacheReader(out) as r:
            kept.append([r.read_encoded(i, "keys")[0]["kept"] for i in range(LAYERS)])
    for x, y in zip(*kept, strict=True):
        np.testing.assert_array_equal(x, y)
    # while a split that lets them see the later queries does change the choice
    outs = []
    for path in (a, b):
        out = path.with_suffix(".all.h5")
        compress(path, output=out, assignment=_pair("h2o:keep=0.3"), observe=TQ - 1)
        with CacheReader(out) as r:
            outs.append(r.read_encoded(0, "keys")[0]["kept"])
    assert not np.array_equal(*outs)


def test_quantizers_keep_every_query_by_default(cache: Path) -> None:
    split = compress(cache, assignment=_pair("uniform:bits=4"))["query_split"]
    assert split["observe"] == 0 and len(split["heldout_positions"]) == TQ


def test_chained_ratio_combines_both(cache: Path) -> None:
    report = compress(cache, assignment=_pair("knorm:keep=0.5+uniform:bits=4"))
    n = T // 2
    per_head = n * 1 + n * (HEAD_DIM * 4 // 8 + 4)  # uint8 index; 4-bit codes and fp16 scale + zero
    assert report["total"]["keys"]["bytes_after"] == LAYERS * KV_HEADS * per_head
    assert report["total"]["ratio"] == pytest.approx(2 * T * HEAD_DIM / per_head)
    assert report["total"]["kept_fraction"] == pytest.approx(0.5)


def test_decompress_restores_the_token_axis_and_the_kept_mask(cache: Path, tmp_path: Path) -> None:
    out, back = tmp_path / "c.h5", tmp_path / "back.h5"
    compress(cache, output=out, assignment=_pair("tova:keep=0.5,per_head=true"))
    decompress(out, back)
    with CacheReader(back) as r, CacheReader(out) as c, CacheReader(cache) as src:
        for i in range(LAYERS):
            data, ref = r.layer(i), src.layer(i)
            assert data.keys.shape == ref.keys.shape
            arrays, attrs = c.read_encoded(i, "keys")
            mask = selection_mask(arrays, tuple(attrs["shape"]))
            np.testing.assert_array_equal(data.kept, mask)
            assert mask.sum() == KV_HEADS * T // 2
            assert (data.keys[~data.kept] == 0).all()
            np.testing.assert_allclose(data.keys[data.kept], ref.keys[data.kept], atol=4e-3)
    with h5py.File(back) as f:
        assert f["sequences/0/layers/0/kept"].dtype == bool
    # the decompressed file compresses again with its evicted rows out of the reference
    again = compress(back, assignment=_pair("fp16"))
    assert again["total"]["attention_output_rel_error"] < 1e-3


def _pair(spec: str):
    from kvtool.codecs.assignment import Assignment

    return Assignment.of(spec, spec)


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,fragment", [
    (["--method", "snapkv:keep=1.5"], "keep must be in (0, 1], got 1.5"),
    (["--method", "snapkv:keep=0"], "keep must be in (0, 1], got 0"),
    (["--method", "knorm:tokens=500"], f"tokens=500 is more than the {T} tokens of the cache"),
    (["--method", "h2o:tokens=10,sink=8,recent=8"], "tokens=10 is below sink + recent = 16"),
    (["--method", "snapkv", "--observe", str(TQ)], f"--observe {TQ} leaves no held-out queries"),
    (["--method", "snapkv", "--observe", "-1"], "--observe must be >= 0"),
])
def test_bad_input_is_one_line_and_no_file(cache: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    out = tmp_path / "out.h5"
    assert_one_line_error(run("compress", cache, *args, "-o", out), fragment)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("spec", ["snapkv", "h2o:keep=0.3", "tova", "expected:future=0"])
def test_query_selector_on_a_cache_without_queries(tmp_path: Path, spec: str) -> None:
    path = _cache(tmp_path / "noq.h5", queries=False)
    out = tmp_path / "out.h5"
    assert_one_line_error(run("compress", path, "--method", spec, "-o", out), "capture --queries")
    assert not out.exists()


def test_cli_reports_split_and_kept(cache: Path, tmp_path: Path) -> None:
    result = run("compress", cache, "--method", "snapkv:keep=0.5+uniform:bits=4", "--observe", "4",
                 "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["query_split"]["observe"] == 4 and not report["query_split"]["default"]
    assert report["total"]["kept_fraction"] == pytest.approx(0.5)
    table = run("compress", cache, "--method", "streaming:keep=0.5")
    assert table.exit_code == 0 and "kept" in table.stdout


def test_sweep_scores_every_spec_on_the_same_held_out_queries(cache: Path) -> None:
    from kvtool.sweep import sweep

    report = sweep(cache, ["snapkv:keep=0.5", "uniform:bits=4"])
    assert report["query_split"]["observe"] == TQ // 2
    alone = compress(cache, assignment=_pair("uniform:bits=4"), observe=TQ // 2)
    row = next(r for r in report["results"] if r["spec"].startswith("uniform"))
    assert row["total"]["attention_output_rel_error"] == pytest.approx(
        alone["total"]["attention_output_rel_error"], rel=1e-9)


def test_observe_zero_with_a_query_selector(cache: Path) -> None:
    assert_one_line_error(run("compress", cache, "--method", "h2o", "--observe", "0"),
                          f"--observe 0 gives no queries to a codec of this spec that scores tokens with them; "
                          f"use 1..{TQ - 1} (default {TQ // 2})")
