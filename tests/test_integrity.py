"""Data integrity on real captured data: Fletcher-32 checksums on every dataset, `inspect --verify`, files
from before checksums, and non-finite values refused by every reader and writer."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cli import assert_one_line_error, one_line_error, run
from _real_cache import all_datasets, chunk_offset, copy, flip, poison, rewrite, strip_checksums

from kvtool.errors import NonFiniteError, StoreError
from kvtool.store import CacheReader, CacheWriter, StoreHeader

LAYER15_KEYS = "sequences/0/layers/15/keys"


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """The SmolLM2 sample cache (30 layers, 256 tokens, queries) as kvtool writes it today."""
    return rewrite(tmp_path_factory.mktemp("real") / "cache.h5")


@pytest.fixture(scope="module")
def compressed(real: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("z") / "z.h5"
    r = run("compress", real, "--method", "polarquant", "--layers", "14-16", "--output", out)
    assert r.exit_code == 0, r.output
    return out


def test_every_dataset_is_checksummed(real: Path, compressed: Path, tmp_path: Path) -> None:
    restored = tmp_path / "restored.h5"
    assert run("decompress", compressed, "--output", restored).exit_code == 0
    for path in (real, compressed, restored):
        rows = all_datasets(path)
        assert rows and all(chunks and fletcher for _, chunks, fletcher, _ in rows), rows
        with h5py.File(path) as f:  # the 1.10 format: superblock and object headers are checksummed too
            assert f.id.get_create_plist().get_version()[0] >= 2
    d = json.loads(run("inspect", real, "--json").stdout)
    assert d["checksums"] == "fletcher32" and d["datasets"] == d["checksummed_datasets"] == 30 * 4 + 1


def test_flipped_data_chunk_is_caught(real: Path, tmp_path: Path) -> None:
    bad = copy(real, tmp_path / "bad.h5")
    flip(bad, chunk_offset(bad, LAYER15_KEYS, chunk=1) + 1000)  # 64 bytes inside head 1 of layer 15's keys
    want = f"{bad}: sequence 0, layer 15, keys"
    assert_one_line_error(run("compress", bad, "--method", "kivi:bits=4", "--layers", "13-15"), want)
    assert_one_line_error(run("analyze", bad, "--layers", "15"), want)
    line = one_line_error(run("inspect", bad, "--verify"))
    assert "1 damaged dataset" in line and "layer 15, keys: 1 of 3 chunk(s) bad, checksum mismatch" in line
    assert run("inspect", bad).exit_code == 0  # without --verify no data is read
    assert run("compress", bad, "--method", "kivi:bits=4", "--layers", "14").exit_code == 0  # others intact


def test_flipped_codec_array_is_caught(compressed: Path, tmp_path: Path) -> None:
    bad = copy(compressed, tmp_path / "bad.z.h5")
    flip(bad, chunk_offset(bad, "sequences/0/layers/15/values/radii") + 10, count=4)
    out = tmp_path / "out.h5"
    assert_one_line_error(run("decompress", bad, "--output", out), "sequence 0, layer 15, values/radii: checksum")
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_verify_reads_every_chunk(real: Path) -> None:
    r = run("inspect", real, "--verify", "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)["verify"]
    # tokens + 30 layers × (keys, values: 3 heads; queries: 9 heads; query_positions: 1 chunk)
    assert v["chunks"] == 1 + 30 * (3 + 3 + 9 + 1) and v["problems"] == [] and v["checksummed"] == v["datasets"]
    assert "every checksum matches" in " ".join(run("inspect", real, "--verify").stdout.split())


def test_files_without_checksums_stay_readable(real: Path, tmp_path: Path) -> None:
    old = strip_checksums(real, tmp_path / "old.h5")
    assert not any(fletcher for _, _, fletcher, _ in all_datasets(old))
    r = run("inspect", old)
    assert r.exit_code == 0 and "checksums: none" in r.stdout
    assert "no checksums to compare" in " ".join(run("inspect", old, "--verify").stdout.split())
    a = json.loads(run("compress", old, "--method", "kivi:bits=4", "--layers", "15", "--json", "-").stdout)
    b = json.loads(run("compress", real, "--method", "kivi:bits=4", "--layers", "15", "--json", "-").stdout)
    assert a["layers"] == b["layers"]


@pytest.mark.parametrize("name, array", [("scalar", np.float32(2.5)), ("empty", np.zeros(0, np.uint8)),
                                         ("empty3d", np.zeros((3, 0, 4), np.float16)),
                                         ("one", np.array([7], np.int64)), ("mask", np.ones((2, 5), bool))])
def test_tiny_and_empty_codec_arrays_round_trip(tmp_path: Path, name: str, array: np.ndarray) -> None:
    header = StoreHeader(model="m", model_architecture="A", num_layers=1, num_q_heads=2, num_kv_heads=2,
                         head_dim=4, attn_scaling=0.5, kind="compressed")
    path = tmp_path / "c.h5"
    with CacheWriter(path, header) as w:
        w.add_sequence(np.arange(0), source="empty")  # an empty token list is chunked too
        for role in ("keys", "values"):
            w.write_encoded(0, 0, role, {name: array}, {"codec": "fp16"}, shape=(2, 0, 4))
    assert all(chunks and fletcher for _, chunks, fletcher, _ in all_datasets(path))
    with CacheReader(path) as r:
        got, _ = r.read_encoded(0, "keys")
        assert r.tokens(0).shape == (0,)
    assert got[name].shape == array.shape and got[name].dtype == array.dtype
    np.testing.assert_array_equal(got[name], array)


# ------------------------------------------------------------------------------------- non-finite values


def test_nonfinite_layer_is_refused_by_every_reader(real: Path, tmp_path: Path) -> None:
    bad = copy(real, tmp_path / "nan.h5")
    poison(bad, LAYER15_KEYS, [np.inf, np.nan])
    want = "sequence 0, layer 15, keys holds 1 NaN and 1 infinite value(s)"
    report = tmp_path / "r.json"
    assert_one_line_error(run("compress", bad, "--method", "kivi:bits=4", "--layers", "13-16", "--json", report),
                          want)
    assert_one_line_error(run("analyze", bad, "--layers", "15-16", "--json", report), want)
    assert "layer 15, keys: 2 NaN/infinite" in one_line_error(run("inspect", bad, "--verify"))
    assert not report.exists()
    with CacheReader(bad) as r, pytest.raises(NonFiniteError, match="layer 15"):
        r.layer(15)


def test_decoded_nonfinite_is_refused(compressed: Path, tmp_path: Path) -> None:
    bad = copy(compressed, tmp_path / "inf.z.h5")
    poison(bad, "sequences/0/layers/15/keys/radii", [np.inf])  # a damaged norm decodes to inf
    out = tmp_path / "out.h5"
    assert_one_line_error(run("decompress", bad, "--output", out), "sequence 0, layer 15, keys: the decoded")
    assert not out.exists()


def test_writer_refuses_nonfinite_and_fp16_overflow(tmp_path: Path) -> None:
    header = StoreHeader(model="m", model_architecture="A", num_layers=1, num_q_heads=2, num_kv_heads=2,
                         head_dim=4, attn_scaling=0.5)
    ok = np.ones((2, 3, 4), np.float32)
    for bad, fragment in ((np.full((2, 3, 4), np.nan, np.float32), "24 NaN"),
                          (np.full((2, 3, 4), 1e5, np.float32), "0 NaN and 24 infinite")):  # 1e5 > float16 max
        with pytest.raises(NonFiniteError, match=fragment), CacheWriter(tmp_path / "c.h5", header) as w:
            w.add_sequence(np.arange(3), source="x")
            w.write_layer(0, 0, ok, bad)
        assert list(tmp_path.iterdir()) == []


def test_nonstandard_json_never_written(real: Path, tmp_path: Path) -> None:
    """attn_scaling is the one float a reader takes from attributes: a NaN there is refused, not reported."""
    bad = copy(real, tmp_path / "scale.h5")
    with h5py.File(bad, "a") as f:
        f.attrs["attn_scaling"] = float("nan")
    assert_one_line_error(run("inspect", bad, "--json"), "attn_scaling' must be a positive number")
    with pytest.raises(StoreError):
        CacheReader(bad)


# ------------------------------------------------------------------------------------------------ capture


@pytest.fixture(scope="module")
def planted(tiny_model_factory, tmp_path_factory):
    """A tiny random llama, and a copy of it with a weight changed: planted(name, fn) -> model folder."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = tiny_model_factory(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64), "planted-llama")

    def make(name: str, change) -> Path:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            change(model)
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out)
        for f in base.iterdir():
            if "token" in f.name or f.name.endswith(".jinja"):
                shutil.copy(f, out / f.name)
        return out

    return make


def test_capture_refuses_a_float16_overflow(planted, tmp_path: Path) -> None:
    """Layer 1's values reach ~1e6 (an outlier activation): fine in float32, inf once cast to float16."""
    model = planted("overflow", lambda m: m.model.layers[1].self_attn.v_proj.weight.mul_(1e6))
    out = tmp_path / "c.h5"
    args = ("capture", "--model", model, "--prompt", "a large activation, planted", "--output", out)
    line = one_line_error(run(*args))
    assert "layer 1: values reach" in line and "beyond float16's largest value 65504" in line
    assert line.endswith("capture with --dtype float32")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file
    assert run(*args, "--dtype", "float32").exit_code == 0
    with CacheReader(out) as r:
        assert np.abs(r.layer(1).values).max() > 65504


def test_capture_refuses_nan_from_the_model(planted, tmp_path: Path) -> None:
    model = planted("nan", lambda m: m.model.layers[2].self_attn.k_proj.weight.fill_(float("nan")))
    line = one_line_error(run("capture", "--model", model, "--prompt", "not a number", "--output",
                              tmp_path / "c.h5"))
    assert "layer 2: the model produced NaN or infinity in its keys (computing in float32)" in line
    assert "--dtype float32" in line and list(tmp_path.iterdir()) == []
