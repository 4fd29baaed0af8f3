"""`kvtool sweep`: one pass, the same figures as compress, the Pareto frontier, presets from the registry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from _cli import assert_one_line_error, run
from _synth_cache import HEAD_DIM, KV_HEADS, Q_HEADS, gaussian, write_cache

from kvtool import metrics
from kvtool.codecs import REGISTRY, Encoded, parse_spec, register
from kvtool.codecs.base import Codec
from kvtool.codecs.presets import PRESETS, expand, preset
from kvtool.compress import compress
from kvtool.errors import CodecError
from kvtool.store import CacheReader
from kvtool.sweep import pareto_frontier, sweep

LAYERS, TOKENS, N_Q = 3, 80, 12
SPECS = ["turboquant:bits=2.5", "kivi:bits=2,group=16,residual=8", "uniform:bits=4", "fp16"]


def _layers(seed: int, queries: bool):
    rng = np.random.default_rng(seed)

    def layer(i: int):
        q = gaussian(rng, Q_HEADS, N_Q, HEAD_DIM) if queries else None
        return gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM), gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM), q

    return layer


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("sweep") / "c.h5", LAYERS, TOKENS, _layers(0, True), num_queries=N_Q)


def test_sweep_figures_equal_compress(cache: Path) -> None:
    report = sweep(cache, SPECS)
    assert report["kvtool_report"] == "sweep" and report["model"] == "synthetic"
    by_spec = {r["spec"]: r for r in report["results"]}
    assert set(by_spec) == set(SPECS)
    for spec in SPECS:
        c = compress(cache, parse_spec(spec).for_role("keys"), parse_spec(spec).for_role("values"))
        r = by_spec[spec]
        assert r["total"] == c["total"]  # bytes, bits and every error: exactly compress's
        assert r["keys_spec"] == c["keys_spec"] and r["values_spec"] == c["values_spec"]
        for mine, theirs in zip(r["layers"], c["layers"], strict=True):
            assert mine["attention_output_rel_error"] == theirs["attention_output_rel_error"]
            assert mine["keys_rel_mse"] == theirs["keys"]["rel_mse"]
        shared = c["total"]["keys"]["shared_state_bytes"] + c["total"]["values"]["shared_state_bytes"]
        assert r["stored_bits"] == pytest.approx(16 * (c["total"]["bytes_after"] + shared) / c["total"]["bytes_before"])
    bits = [r["stored_bits"] for r in report["results"]]
    assert bits == sorted(bits)
    assert by_spec["fp16"]["frontier"] and by_spec["fp16"]["error"] == min(r["error"] for r in report["results"])


def test_each_layer_read_once_and_one_reference_per_layer(cache: Path, monkeypatch) -> None:
    reads, refs = [], []
    real_layer, real_ref = CacheReader.layer, metrics.reference_attention

    def layer(self, i, j=0, **kw):
        reads.append(i)
        return real_layer(self, i, j, **kw)

    def reference(*a, **kw):
        refs.append(1)
        return real_ref(*a, **kw)

    monkeypatch.setattr(CacheReader, "layer", layer)
    monkeypatch.setattr(metrics, "reference_attention", reference)
    sweep(cache, SPECS)
    assert sorted(reads) == list(range(LAYERS)) and len(refs) == LAYERS


def test_pareto_frontier_hand_built() -> None:
    pts = [(2.0, 0.5), (3.0, 0.2), (3.0, 0.3), (2.5, 0.6), (4.0, 0.2), (5.0, 0.1), (1.0, 0.9), (5.0, 0.1),
           (6.0, 0.15), (0.5, 2.0)]
    assert pareto_frontier(pts) == [True, True, False, False, False, True, True, True, False, True]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1.0, 1.0)]) == [True]


def test_sweep_without_queries_uses_reconstruction(tmp_path: Path) -> None:
    path = write_cache(tmp_path / "noq.h5", 2, TOKENS, _layers(1, False))
    report = sweep(path, ["uniform:bits=2", "uniform:bits=4"])
    assert not report["attention"] and report["error_metric"] == "rel_mse"
    low, high = report["results"]
    assert low["error"] > high["error"] > 0 and low["frontier"] and high["frontier"]


def test_presets_come_from_the_registry() -> None:
    quant = preset("quant")
    for name, cls in REGISTRY.items():
        if "bits" in {f for f in cls.__dataclass_fields__}:
            assert any(s.startswith(f"{name}:bits=8") for s in quant), name
    for spec in preset("all"):
        parse_spec(spec)  # every preset spec is valid
    assert set(preset("default")) <= set(preset("all")) and set(quant) <= set(preset("all"))
    assert expand(["turboquant:bits=3", "turboquant:bits=3,seed=0"]) == ["turboquant:bits=3"]

    @register
    @dataclass
    class Halves(Codec):
        """``halves:bits=2`` — a test codec."""

        bits: int = 2
        name: ClassVar[str] = "halves"

        def validate(self, head_dim=None):
            if self.bits not in (2, 6):
                raise CodecError(f"bits must be one of 2, 6, got {self.bits}")

        def encode(self, x):
            return Encoded({"data": np.asarray(x, np.float16)}, x.shape)

        def decode(self, enc):
            return enc.arrays["data"].astype(np.float32)

    try:
        assert [s for s in preset("quant") if s.startswith("halves")] == ["halves:bits=2", "halves:bits=6"]
        assert "halves:bits=2" in preset("default")
    finally:
        del REGISTRY["halves"]


def test_sweep_cli_table_json_plot(cache: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "s.json", tmp_path / "f.png"
    r = run("sweep", cache, "--methods", "uniform:bits=2", "uniform:bits=8", "--methods", "turboquant:bits=3",
            "--json", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert "★" in r.stdout and "uniform:bits=8" in r.stdout
    report = json.loads(out.read_text())
    assert [x["spec"] for x in report["results"]] == ["uniform:bits=2", "turboquant:bits=3", "uniform:bits=8"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_sweep_cli_bad_input(cache: Path, tmp_path: Path) -> None:
    r = run("sweep", cache, "--methods", "qaunt")
    assert_one_line_error(r, "unknown preset or codec 'qaunt'; presets: " + ", ".join(PRESETS))
    assert_one_line_error(run("sweep", cache, "--methods", "uniform:bits=9"), "bits must be one of 1..8")
    assert_one_line_error(run("sweep", cache, "-m", "fp16", "--plot", tmp_path / "nope" / "f.png"), "nope")


def test_sweep_table_keeps_whole_specs_in_a_log(cache: Path) -> None:
    """Not a terminal (a CI log): the table is not squeezed into 80 columns, a long spec stays on one line."""
    spec = "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true"
    r = run("sweep", cache, "--methods", spec, "uniform:bits=4")
    assert r.exit_code == 0, r.output
    assert any(spec in line for line in r.stdout.splitlines()), r.stdout
