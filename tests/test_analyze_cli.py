"""`kvtool analyze` through the CLI: the table, --json, --plots, --layers, and one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cli import one_line_error
from _cli import run as cli_run
from _synth_cache import HEAD_DIM, KV_HEADS, Q_HEADS, gaussian, write_cache

SAMPLES = Path(__file__).parents[1] / "samples"
SAMPLE_CACHES = sorted(SAMPLES.glob("*.h5"))
LAYERS, TOKENS = 3, 96


def run(*args: object):
    return cli_run("analyze", *args)



@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cli") / "cache.h5"
    return write_cache(path, LAYERS, TOKENS, lambda i: (
        gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM), gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM),
        gaussian(rng, Q_HEADS, 16, HEAD_DIM)))


@pytest.fixture(scope="module")
def cache_without_queries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("cli") / "noq.h5"
    return write_cache(path, 2, TOKENS, lambda i: (
        gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM), gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM), None))


def test_table_json_and_plots(cache: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "a.json", tmp_path / "plots" / "deep"
    r = run(cache, "--json", out, "--plots", plots)
    assert r.exit_code == 0, r.output
    assert "recommendation" in r.stdout and "per-" in r.stdout
    data = json.loads(out.read_text())  # strict JSON: NaN would not parse back as a number
    assert [e["layer"] for e in data["layers"]] == [0, 1, 2]
    assert {p.name for p in plots.iterdir()} >= {"ranks.png", "attention.png", "spectra.png", "channels.png"}


def test_json_to_stdout_is_only_json(cache: Path) -> None:
    r = run(cache, "--json", "-", "--layers", "1-2")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["layers_analysed"] == [1, 2]
    assert data["layers"][1]["similarity"]["previous"]["previous_layer"] == 1


def test_cache_without_queries_prints_a_note_not_an_error(cache_without_queries: Path) -> None:
    r = run(cache_without_queries)
    assert r.exit_code == 0, r.output
    assert "no queries" in r.stdout and "attention sections skipped" in r.stdout


def test_layer_out_of_range(cache: Path) -> None:
    line = one_line_error(run(cache, "--layers", "0-7"))
    assert "0..2" in line


def test_not_a_kvtool_cache(tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    assert "kvtool" in one_line_error(run(plain))
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5")
    assert "HDF5" in one_line_error(run(text))
    assert "no such file" in one_line_error(run(tmp_path / "missing.h5"))


def test_unwritable_plots_dir(cache: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "plots directory" in one_line_error(run(cache, "--plots", blocker / "sub"))


def test_unwritable_json(cache: Path, tmp_path: Path) -> None:
    assert "JSON" in one_line_error(run(cache, "--json", tmp_path / "no" / "such" / "dir.json"))


@pytest.mark.skipif(not SAMPLE_CACHES, reason="no captured sample cache in samples/ (make sample-cache)")
def test_sample_cache_smoke(tmp_path: Path) -> None:
    """The real SmolLM2 sample: KIVI's observation (keys have outlier channels) must show up."""
    out = tmp_path / "real.json"
    r = run(SAMPLE_CACHES[0], "--json", out)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data["layers"]) == data["num_layers"]
    assert data["summary"]["keys_per_channel_layers"] >= data["num_layers"] // 2
    if data["has_queries"]:
        assert data["summary"]["mean_sink_mass"] is not None


def test_sequence_option(tmp_path):
    from kvtool.store import CacheWriter, StoreHeader

    rng = np.random.default_rng(1)
    path = tmp_path / "two.h5"
    header = StoreHeader(model="synthetic", model_architecture="Synthetic", num_layers=2, num_q_heads=Q_HEADS,
                         num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, attn_scaling=HEAD_DIM ** -0.5)
    with CacheWriter(path, header) as w:
        for n in (40, 24):
            j = w.add_sequence(np.arange(n), source=f"s{n}")
            for i in range(2):
                w.write_layer(j, i, gaussian(rng, KV_HEADS, n, HEAD_DIM), gaussian(rng, KV_HEADS, n, HEAD_DIM))
    first = json.loads(run(path, "--json", "-").stdout)
    second = json.loads(run(path, "--json", "-", "--sequence", "1").stdout)
    assert (first["sequence"], first["num_tokens"]) == (0, 40)
    assert (second["sequence"], second["num_tokens"]) == (1, 24)
    assert "sequence 5 out of range" in one_line_error(run(path, "--sequence", "5"))
