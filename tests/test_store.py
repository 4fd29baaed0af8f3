"""The HDF5 store: round trip, validation of foreign and damaged files, atomic writes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import kvtool
from kvtool.errors import StoreError
from kvtool.store import SCHEMA_VERSION, CacheReader, CacheWriter, StoreHeader, read_info

HEADER = dict(model="synthetic", model_architecture="LlamaForCausalLM", num_layers=2, num_q_heads=4,
              num_kv_heads=2, head_dim=8, attn_scaling=8 ** -0.5)


def write_cache(path: Path, *, dtype: str = "float16", queries: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = {}
    with CacheWriter(path, StoreHeader(dtype=dtype, **HEADER)) as w:
        for text, n in (("first text", 10), ("second", 6)):
            j = w.add_sequence(np.arange(n), source=f"s{n}", text=text)
            for i in range(2):
                k, v = rng.normal(size=(2, n, 8)), rng.normal(size=(2, n, 8))
                q = rng.normal(size=(4, 3, 8)) if queries else None
                w.write_layer(j, i, k, v, queries=q, query_positions=np.arange(n - 3, n) if queries else None)
                data[j, i] = (k, v, q)
    return data


def test_round_trip_float32_is_exact(tmp_path):
    path = tmp_path / "c.h5"
    data = write_cache(path, dtype="float32")
    info = read_info(path)
    assert info.kvtool_version == kvtool.__version__ and info.kind == "cache"
    assert [s.num_tokens for s in info.sequences] == [10, 6]
    for (j, i), (k, v, q) in data.items():
        with CacheReader(path) as r:
            layer = r.layer(i, sequence=j)
        np.testing.assert_array_equal(layer.keys, k.astype(np.float32))
        np.testing.assert_array_equal(layer.values, v.astype(np.float32))
        np.testing.assert_array_equal(layer.queries, q.astype(np.float32))
        assert layer.keys.dtype == np.float32 and layer.keys.shape == (2, [10, 6][j], 8)


def test_round_trip_float16_and_chunked_per_head(tmp_path):
    path = tmp_path / "c.h5"
    data = write_cache(path)
    k, v, q = kvtool.load_layer(path, 1, sequence=0)
    np.testing.assert_allclose(k, data[0, 1][0], rtol=2**-10, atol=1e-3)
    with h5py.File(path) as f:
        ds = f["sequences/0/layers/1/keys"]
        assert ds.dtype == np.float16 and ds.chunks == (1, 10, 8)
        assert f.attrs["kvtool_schema"] == SCHEMA_VERSION


def test_sequence_text_hashes(tmp_path):
    import hashlib

    path = tmp_path / "c.h5"
    write_cache(path)
    info = read_info(path)
    assert info.sequences[0].text_sha256 == hashlib.sha256(b"first text").hexdigest()
    assert info.text_sha256 == hashlib.sha256(b"first textsecond").hexdigest()


def test_interrupted_write_leaves_no_file(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt), CacheWriter(path, StoreHeader(**HEADER)) as w:
        w.add_sequence(np.arange(4), source="x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    path = tmp_path / "c.h5"
    write_cache(path)
    with pytest.raises(StoreError, match="already exists"):
        CacheWriter(path, StoreHeader(**HEADER))
    write_cache(path.parent / "d.h5")
    CacheWriter(path, StoreHeader(**HEADER), force=True).abort()


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.attrs.__delitem__("kvtool_schema"), "without kvtool's schema"),
    (lambda f: f.attrs.__setitem__("kvtool_schema", 99), "schema 99 is not supported"),
    (lambda f: f.attrs.__delitem__("head_dim"), "missing attribute 'head_dim'"),
    (lambda f: f.attrs.__setitem__("num_kv_heads", 3), "not a multiple"),
    (lambda f: f.__delitem__("sequences/0/layers/1"), "should hold 2 layers"),
    (lambda f: f.__delitem__("sequences/1/layers/0/values"), "missing /sequences/1/layers/0/values"),
    (lambda f: f.__delitem__("sequences/0/layers/0/query_positions"), "query_positions"),
    (lambda f: f["sequences/0/layers/0"].attrs.__setitem__("layer_type", "weird"), "layer_type 'weird'"),
])
def test_validation_names_what_was_expected(tmp_path, damage, message):
    path = tmp_path / "c.h5"
    write_cache(path)
    with h5py.File(path, "a") as f:
        damage(f)
    with pytest.raises(StoreError, match=message):
        read_info(path)


def test_bad_shapes_are_reported(tmp_path):
    path = tmp_path / "c.h5"
    write_cache(path)
    with h5py.File(path, "a") as f:
        del f["sequences/0/layers/0/keys"]
        f["sequences/0/layers/0/keys"] = np.zeros((2, 10, 7), np.float16)
    with pytest.raises(StoreError, match=r"expected \(2, tokens, 8\)"):
        read_info(path)


def test_not_hdf5_truncated_missing(tmp_path):
    text = tmp_path / "a.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        read_info(text)
    good = tmp_path / "good.h5"
    write_cache(good)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(StoreError):
        with CacheReader(cut) as r:
            for i in range(2):
                r.layer(i)
    with pytest.raises(StoreError, match="no such file"):
        read_info(tmp_path / "missing.h5")


def test_layer_out_of_range(tmp_path):
    path = tmp_path / "c.h5"
    write_cache(path)
    with pytest.raises(StoreError, match=r"layer 5 out of range: the file holds 0\.\.1"):
        kvtool.load_layer(path, 5)


def test_format_doc_matches_store():
    import kvtool.store as store

    doc = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    assert store.__doc__.strip() in doc
