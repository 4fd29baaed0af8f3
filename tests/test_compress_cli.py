"""`kvtool compress` / `decompress` / `codecs` through the CLI and the library, on synthetic caches."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cli import assert_one_line_error, run
from _synth_cache import HEAD_DIM, KV_HEADS, Q_HEADS, gaussian, header, write_cache

from kvtool.codecs import REGISTRY, parse_pair
from kvtool.compress import compress, decompress
from kvtool.errors import CodecError, InputError, StoreError
from kvtool.store import CacheReader, CacheWriter

LAYERS, TOKENS, N_Q = 3, 96, 16




def _layers(seed: int, queries: bool):
    rng = np.random.default_rng(seed)

    def layer(i: int):
        q = gaussian(rng, Q_HEADS, N_Q, HEAD_DIM) if queries else None
        return gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM), gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM), q

    return layer


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compress") / "cache.h5"
    return write_cache(path, LAYERS, TOKENS, _layers(0, True), num_queries=N_Q)


@pytest.fixture(scope="module")
def cache_no_queries(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compress") / "noq.h5"
    return write_cache(path, LAYERS, TOKENS, _layers(1, False))


def stored_bytes(path: Path, layer: int, name: str) -> int:
    with h5py.File(path) as f:
        g = f[f"sequences/0/layers/{layer}/{name}"]
        return sum(g[k].nbytes for k in g if not k.startswith("shared."))


def test_compress_report_output_and_decompress(cache: Path, tmp_path: Path) -> None:
    out, report_path, back = tmp_path / "c.h5", tmp_path / "r.json", tmp_path / "back.h5"
    r = run("compress", cache, "--method", "uniform:bits=4,group=16", "-o", out, "--json", report_path)
    assert r.exit_code == 0, r.output
    assert "attention" in r.stdout and "bits/element" in r.stdout
    report = json.loads(report_path.read_text())
    assert report["keys_spec"] == report["values_spec"] == "uniform:bits=4,axis=token,group=16"
    assert len(report["layers"]) == LAYERS and report["attention"]
    for row in report["layers"]:
        for name in ("keys", "values"):
            t = row[name]
            assert t["bits_per_element"] == pytest.approx(4 + 32 / 16)
            assert t["bytes_after"] == stored_bytes(out, row["layer"], name)  # every stored byte counted
            assert t["bytes_before"] == KV_HEADS * TOKENS * HEAD_DIM * 2
            assert 0 < t["rel_mse"] < 0.02 and t["cosine"] > 0.99
        assert 0 < row["attention_output_rel_error"] < 0.2 and len(row["heads"]) == KV_HEADS
        assert {"attention_kl", "topk_overlap", "attention_logit_rel_error"} <= set(row)
    assert report["total"]["ratio"] == pytest.approx(16 / 6)
    assert run("inspect", out).exit_code == 0
    r = run("decompress", out, "--output", back)
    assert r.exit_code == 0, r.output
    with CacheReader(back) as dec, CacheReader(cache) as src:
        assert dec.info.kind == "cache" and dec.info.text_sha256 == src.info.text_sha256
        assert [s.text_sha256 for s in dec.info.sequences] == [s.text_sha256 for s in src.info.sequences]
        for i in range(LAYERS):
            a, b = src.layer(i), dec.layer(i)
            err = float(((a.keys - b.keys) ** 2).sum() / (a.keys**2).sum())
            assert err == pytest.approx(report["layers"][i]["keys"]["rel_mse"], rel=1e-3)
            np.testing.assert_array_equal(a.queries, b.queries)


def test_keys_and_values_codecs_and_layer_selection(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "sel.h5"
    r = run("compress", cache, "--keys", "kivi:bits=2,residual=32", "--values", "fp8", "--layers", "0,2",
            "-o", out, "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [row["layer"] for row in report["layers"]] == [0, 2]
    assert report["keys_spec"] == "kivi:bits=2,axis=channel,group=32,residual=32"
    assert report["values_spec"] == "fp8:format=e4m3"
    with CacheReader(out) as reader:  # unselected layers are kept as fp16, so the file stays complete
        assert reader.info.num_layers == LAYERS
        assert reader.read_encoded(1, "keys")[1]["codec"] == "fp16"
        assert reader.read_encoded(2, "values")[1]["codec"] == "fp8:format=e4m3"


def test_cache_without_queries_skips_attention(cache_no_queries: Path) -> None:
    r = run("compress", cache_no_queries, "--method", "fp16", "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert not report["attention"] and "attention metrics skipped" in report["notes"][0]
    assert "attention_output_rel_error" not in report["layers"][0]
    assert report["total"]["bits_per_element"] == 16.0
    assert_one_line_error(run("compress", cache_no_queries, "--method", "fp16", "--require-attention"),
                          "no captured queries")


def test_sliding_layer_positions_survive_the_round_trip(tmp_path: Path) -> None:
    src, out, back = tmp_path / "s.h5", tmp_path / "s.c.h5", tmp_path / "s.d.h5"
    rng = np.random.default_rng(3)
    with CacheWriter(src, header(1)) as w:
        w.add_sequence(np.arange(40), source="synthetic", text="x")
        w.write_layer(0, 0, gaussian(rng, KV_HEADS, 16, HEAD_DIM), gaussian(rng, KV_HEADS, 16, HEAD_DIM),
                      queries=gaussian(rng, Q_HEADS, 4, HEAD_DIM), query_positions=np.arange(36, 40),
                      layer_type="sliding", sliding_window=16, key_start=24)
    keys, values = parse_pair(method="uniform:bits=8")
    report = compress(src, keys, values, output=out)
    assert report["layers"][0]["attention_output_rel_error"] < 0.01
    decompress(out, back)
    with CacheReader(back) as reader:
        layer = reader.layer(0)
        assert layer.layer_type == "sliding" and layer.sliding_window == 16
        assert layer.key_positions.tolist() == list(range(24, 40))


def test_library_rejects_attention_requirement_and_bad_layers(cache_no_queries: Path) -> None:
    keys, values = parse_pair(method="fp16")
    with pytest.raises(InputError, match="no captured queries"):
        compress(cache_no_queries, keys, values, require_attention=True)
    with pytest.raises(StoreError, match="layer 9 out of range"):
        compress(cache_no_queries, keys, values, layers=[9])


def test_codecs_lists_the_registry() -> None:
    r = run("codecs")
    assert r.exit_code == 0
    for name in ("fp16", "fp8", "uniform", "kivi"):
        assert name in r.stdout


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--method", "nope"], "unknown codec 'nope'"),
        (["--method", "uniform:bitz=2"], "has no parameter 'bitz'"),
        (["--method", "uniform:bits=0"], "bits must be one of 1..8, got 0"),
        (["--method", "uniform:bits=9"], "bits must be one of 1..8, got 9"),
        (["--method", "uniform:group=5"], "group must divide head_dim=32"),
        (["--keys", "fp16"], "both --keys SPEC and --values SPEC"),
        ([], "give --method SPEC"),
        (["--method", "fp16", "--layers", "7"], "out of range"),
        (["--method", "fp16", "--topk", "0"], "--topk must be >= 1"),
    ],
)
def test_bad_options_one_line_exit_2(cache: Path, args: list[str], fragment: str) -> None:
    assert_one_line_error(run("compress", cache, *args), fragment)


def test_bad_files_one_line_exit_2(cache: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("compress", tmp_path / "missing.h5", "--method", "fp16"), "no such file")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(run("compress", text, "--method", "fp16"), "not a readable HDF5 file")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    assert_one_line_error(run("compress", plain, "--method", "fp16"), "kvtool")
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"")
    assert_one_line_error(run("compress", cache, "--method", "fp16", "-o", existing), "already exists")
    same = run("compress", cache, "--method", "fp16", "-o", cache, "-f")
    assert_one_line_error(same, "must not be the input")
    assert_one_line_error(run("decompress", cache, "-o", tmp_path / "d.h5"), "expected one of compressed")


@pytest.mark.parametrize("spec", sorted({*REGISTRY, "turboquant:bits=2.5", "kivi:bits=2,residual=8",
                                         "lowrank:rank=8,group=all+turboquant:bits=4"}))
def test_decompress_rebuilds_every_codec_from_the_file(cache: Path, tmp_path: Path, spec: str) -> None:
    """Decoding from the file alone (spec, arrays, meta, shared state) equals the in-memory decode."""
    out, back = tmp_path / "c.h5", tmp_path / "d.h5"
    keys, values = parse_pair(method=spec)
    if keys.reads_reconstruction():  # kvzip runs the model: a capture alone cannot give its scores
        with pytest.raises(CodecError, match="use it in kvtool eval"):
            compress(cache, keys, values, output=out, layers=[1])
        assert not out.exists()
        return
    report = compress(cache, keys, values, output=out, layers=[1])
    decompress(out, back)
    with CacheReader(back) as dec, CacheReader(cache) as src:
        a, b = src.layer(1), dec.layer(1)
    for name, x, y in (("keys", a.keys, b.keys), ("values", a.values, b.values)):
        err = float(((x - y) ** 2).sum() / (x**2).sum())
        assert err == pytest.approx(report["layers"][0][name]["rel_mse"], rel=1e-2, abs=1e-6), name


def test_codecs_json_lists_every_registered_codec():
    import json

    from kvtool.codecs import REGISTRY

    r = run("codecs", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == sorted(REGISTRY)
    tq = next(row for row in rows if row["name"] == "turboquant")
    assert tq["parameters"]["bits"]["default"] == "3" and "variant" in tq["parameters"]


def test_shared_state_is_amortized_over_this_cache(cache: Path, tmp_path: Path) -> None:
    # fractional TurboQuant keeps an outlier-channel table per layer and tensor: shared state
    report_path = tmp_path / "r.json"
    r = run("compress", cache, "--method", "turboquant:bits=2.5", "--json", report_path)
    assert r.exit_code == 0, r.output
    assert "b+st" in r.stdout and "shared state" in r.stdout
    report = json.loads(report_path.read_text())
    elements = KV_HEADS * TOKENS * HEAD_DIM
    for row in report["layers"]:
        for role in ("keys", "values"):
            t = row[role]
            assert t["shared_state_bytes"] == KV_HEADS * (HEAD_DIM // 2) * 2  # (heads, 16) uint16 channels
            assert t["bits_per_element_with_state"] == pytest.approx(
                8 * (t["bytes_after"] + t["shared_state_bytes"]) / elements)
    total = report["total"]
    state = sum(row[role]["shared_state_bytes"] for row in report["layers"] for role in ("keys", "values"))
    assert total["shared_state_bytes"] == state
    assert total["bits_per_element_with_state"] == pytest.approx(
        16 * (total["bytes_after"] + state) / total["bytes_before"])
    assert total["keys"]["bits_per_element_with_state"] > total["keys"]["bits_per_element"]


# -- --fit-on: shared state fitted on another cache ------------------------------------------------------


def _subspace_cache(path: Path, seed: int, text: str = "synthetic", head_dim: int = HEAD_DIM) -> Path:
    """Keys and values of exact rank 4 per head, in a subspace drawn from ``seed``; queries included."""
    from _synth_cache import low_rank

    rng = np.random.default_rng(seed)
    with CacheWriter(path, header(LAYERS, d=head_dim)) as w:
        w.add_sequence(np.arange(TOKENS), source=text, text=text)
        for i in range(LAYERS):
            k, v = low_rank(rng, KV_HEADS, TOKENS, head_dim, 4), low_rank(rng, KV_HEADS, TOKENS, head_dim, 4)
            q = gaussian(rng, Q_HEADS, N_Q, head_dim)
            w.write_layer(0, i, k, v, queries=q, query_positions=np.arange(TOKENS - N_Q, TOKENS))
    return path


def test_fit_on_uses_the_other_files_basis(tmp_path: Path) -> None:
    a, b = _subspace_cache(tmp_path / "a.h5", 1, "text a"), _subspace_cache(tmp_path / "b.h5", 2, "text b")
    spec = "lowrank:rank=4"
    self_fit = json.loads(run("compress", a, "--method", spec, "--json", "-").stdout)
    assert self_fit["fitted_on"] == "self"
    assert self_fit["total"]["keys"]["rel_mse"] < 1e-5  # rank 4 data, its own basis: exact
    out = tmp_path / "a.c.h5"
    r = run("compress", a, "--method", spec, "--fit-on", b, "-o", out, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "fitted on" in r.stdout
    other = json.loads((tmp_path / "r.json").read_text())
    with CacheReader(b) as rb:
        assert other["fitted_on"] == {"file": str(b), "sequence": 0, "text_sha256": rb.info.sequences[0].text_sha256}
    assert other["total"]["keys"]["rel_mse"] > 0.5  # b's subspace does not hold a
    assert not other["notes"]
    # the basis stored in the output is b's: the same as fitting b itself
    from kvtool.codecs.assignment import Assignment
    from kvtool.compress import fit_shared_state

    with CacheReader(b) as rb, h5py.File(out) as f:
        want = fit_shared_state(rb, Assignment.of(spec, spec), 2)["keys"]["basis"]
        np.testing.assert_array_equal(f["sequences/0/layers/2/keys/shared.basis"][()], want)
    # fitting on a file with the same text is allowed but flagged
    same = json.loads(run("compress", a, "--method", spec, "--fit-on", a, "--json", "-").stdout)
    assert "its text is this cache's text" in same["notes"][0]
    plain = json.loads(run("compress", a, "--method", "uniform:bits=4", "--fit-on", b, "--json", "-").stdout)
    assert "keep no shared state" in plain["notes"][-1]


def test_fit_on_refuses_missing_and_mismatched_files(tmp_path: Path) -> None:
    a = _subspace_cache(tmp_path / "a.h5", 1)
    wide = _subspace_cache(tmp_path / "wide.h5", 2, head_dim=2 * HEAD_DIM)
    assert_one_line_error(run("compress", a, "--method", "lowrank:rank=4", "--fit-on", tmp_path / "no.h5"),
                          "no such file")
    assert_one_line_error(run("compress", a, "--method", "lowrank:rank=4", "--fit-on", wide, "-o",
                              tmp_path / "o.h5"), f"head_dim differs ({2 * HEAD_DIM} there, {HEAD_DIM} here)")
    assert not (tmp_path / "o.h5").exists()
    import shutil

    other_model = shutil.copy(a, tmp_path / "m.h5")  # a's data under another model's name
    with h5py.File(other_model, "r+") as f:
        f.attrs["model"] = "another-model"
    assert_one_line_error(run("compress", a, "--method", "lowrank:rank=4", "--fit-on", other_model),
                          "model differs (another-model there, synthetic here)")


@pytest.mark.parametrize("args,fragment", [
    (["--method", "lowrank:rank=0"], "rank must be one of 1..head_dim, got 0"),
    (["--method", f"lowrank:rank={HEAD_DIM + 1}"], f"rank must be one of 1..{HEAD_DIM}, got {HEAD_DIM + 1}"),
    (["--method", "lowrank:energy=0"], "energy must be in (0, 1], got 0"),
    (["--method", "lowrank:energy=1.01"], "energy must be in (0, 1], got 1.01"),
    (["--method", "lowrank:group=3"], f"group must divide the kv-head count {KV_HEADS}"),
    (["--keys", "lowrank:prerope=true", "--values", "lowrank"], "capture with `kvtool capture --pre-rope-keys`"),
    (["--method", "lowrank:prerope=true"], "prerope=true applies to keys only"),
])
def test_lowrank_bad_input_is_one_line_and_leaves_no_file(cache: Path, tmp_path: Path, args, fragment) -> None:
    out = tmp_path / "o.h5"
    assert_one_line_error(run("compress", cache, *args, "-o", out), fragment)
    assert not out.exists() and not list(tmp_path.iterdir())
