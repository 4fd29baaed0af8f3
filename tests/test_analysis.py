"""Analysis on synthetic caches with planted structure: each planted property must be found exactly."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _synth_cache import HEAD_DIM, KV_HEADS, Q_HEADS, gaussian, low_rank, write_cache

from kvtool.analysis import analyze
from kvtool.analysis.outliers import kurtosis, random_rotation
from kvtool.analysis.similarity import head_similarity, linear_cka
from kvtool.analysis.spectrum import effective_rank
from kvtool.errors import InputError, StoreError
from kvtool.metrics import attention_chunks

T = 256


def _dump(result: dict) -> str:
    return json.dumps(result, allow_nan=False)  # raises on NaN / inf


# ------------------------------------------------------------------------------------------- spectrum


def test_effective_rank_at_each_energy() -> None:
    s = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()  # energies; cumulative 0.5, 0.8, 0.95, 1.0
    assert [int(effective_rank(s, p)) for p in (0.5, 0.9, 0.95, 0.99)] == [1, 3, 3, 4]
    assert int(effective_rank(torch.zeros(4), 0.9)) == 0


def test_rank_r_data_has_effective_rank_r(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_cache(tmp_path / "c.h5", 1, T, lambda i: (low_rank(rng, KV_HEADS, T, HEAD_DIM, 5),
                                                          low_rank(rng, KV_HEADS, T, HEAD_DIM, 3), None))
    spec = analyze(path)["layers"][0]["spectrum"]
    for p in ("rank90", "rank95", "rank99"):
        assert spec["keys"]["per_head"][p] == [5] * KV_HEADS
        assert spec["values"]["per_head"][p] == [3] * KV_HEADS
    assert spec["keys"]["joint"]["rank99"] == 5 * KV_HEADS  # independent heads share no direction
    assert spec["recommended_rank"]["keys"] == 5 and spec["recommended_rank"]["values"] == 3
    assert spec["low_rank_worth_it"] == {"keys": True, "values": True}
    assert spec["prerope"]["available"] is False and "--pre-rope-keys" in spec["prerope"]["note"]


def test_heads_sharing_a_subspace_have_joint_rank_r(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    one = low_rank(rng, 1, T, HEAD_DIM, 4)
    same = np.repeat(one, KV_HEADS, axis=0)
    path = write_cache(tmp_path / "c.h5", 1, T, lambda i: (same, gaussian(rng, KV_HEADS, T, HEAD_DIM), None))
    keys = analyze(path)["layers"][0]["spectrum"]["keys"]
    assert keys["joint"]["rank95"] == 4
    assert keys["joint_vs_sum_per_head"] == pytest.approx(1 / KV_HEADS)


def test_prerope_comparison_runs_when_the_file_has_prerope_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    k = gaussian(rng, KV_HEADS, T, HEAD_DIM)
    path = write_cache(tmp_path / "c.h5", 1, T, lambda i: (k, k, None))
    with h5py.File(path, "a") as f:
        f["sequences/0/layers/0"].create_dataset("keys_prerope", data=low_rank(rng, KV_HEADS, T, HEAD_DIM, 2))
    result = analyze(path)
    assert not any("keys_prerope" in n for n in result["notes"])
    pre = result["layers"][0]["spectrum"]["prerope"]
    assert pre["available"] is True
    assert pre["prerope"]["rank99"] == [2] * KV_HEADS
    assert min(pre["postrope"]["rank99"]) > 2


# ------------------------------------------------------------------------------------------- outliers


def _outlier_cache(tmp_path: Path, channel: int = 7) -> Path:
    rng = np.random.default_rng(3)

    def layer(i: int) -> tuple[np.ndarray, np.ndarray, None]:
        k = gaussian(rng, KV_HEADS, T, HEAD_DIM)
        k[:, :, channel] *= 20.0  # KIVI's picture: one key channel far above the rest
        v = gaussian(rng, KV_HEADS, T, HEAD_DIM)
        v[:, ::16, :] *= 10.0  # a few loud tokens: values vary per token, not per channel
        return k, v, None

    return write_cache(tmp_path / "c.h5", 1, T, layer)


def test_planted_outlier_channel_is_found_and_keys_go_per_channel(tmp_path: Path) -> None:
    out = analyze(_outlier_cache(tmp_path))["layers"][0]["outliers"]
    keys, values = out["keys"], out["values"]
    assert keys["outlier_channels"] == [[7]] * KV_HEADS
    assert min(keys["max_over_median"]) > 10 and min(keys["rms_max_over_median"]) > 10
    assert keys["recommended_axis"] == "per-channel"
    assert keys["recommended_scheme"] == "per-channel"
    assert keys["scale_dispersion"]["per_channel"] > keys["scale_dispersion"]["per_token"]
    assert values["outlier_channels"] == [[]] * KV_HEADS
    assert values["recommended_axis"] == "per-token"
    assert values["recommended_scheme"] == "per-token"


def test_rotation_helps_outlier_keys_but_not_gaussian_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    k = gaussian(rng, KV_HEADS, T, HEAD_DIM)
    k[:, :, 3] *= 20.0
    v = gaussian(rng, KV_HEADS, T, HEAD_DIM)
    path = write_cache(tmp_path / "c.h5", 1, T, lambda i: (k, v, None))
    out = analyze(path)["layers"][0]["outliers"]
    assert min(out["keys"]["kurtosis"]) > 20
    # one shared outlier direction still leaves a scale mixture after rotation, but a far lighter one
    assert max(out["keys"]["kurtosis_rotated"]) < 0.15 * min(out["keys"]["kurtosis"])
    assert out["keys"]["rotation_helps"] is True
    assert out["values"]["kurtosis"] == pytest.approx([3.0] * KV_HEADS, abs=0.3)
    assert out["values"]["rotation_helps"] is False
    q = out["keys"]["quant_rel_mse"]
    assert q["per-token-rotated"] < 0.5 * q["per-token"]


def test_rotation_is_orthogonal_and_seeded() -> None:
    r = random_rotation(16, seed=5)
    assert torch.allclose(r @ r.T, torch.eye(16), atol=1e-5)
    assert torch.equal(r, random_rotation(16, seed=5))
    assert float(kurtosis(torch.ones(1, 4, 4))[0]) == 0.0  # constant data: defined, not NaN


# ------------------------------------------------------------------------------------------ attention


def _reference_probs(q: np.ndarray, k: np.ndarray, qpos: np.ndarray, kpos: np.ndarray, scale: float,
                     window: int) -> np.ndarray:
    """Plain per-head loop: q head h reads kv head h // (q_heads // kv_heads)."""
    group = q.shape[0] // k.shape[0]
    out = np.zeros((q.shape[0], q.shape[1], k.shape[1]))
    for h in range(q.shape[0]):
        logits = q[h].astype(np.float64) @ k[h // group].T.astype(np.float64) * scale
        dist = qpos[:, None] - kpos[None, :]
        ok = (dist >= 0) & ((dist < window) if window else True)
        logits = np.where(ok, logits, -np.inf)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        out[h] = e / e.sum(axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("window", [0, 8])
def test_attention_matches_a_per_head_reference(window: int) -> None:
    rng = np.random.default_rng(6)
    q, k = gaussian(rng, Q_HEADS, 20, HEAD_DIM), gaussian(rng, KV_HEADS, 40, HEAD_DIM)
    qpos, kpos = np.arange(30, 50), np.arange(10, 50)  # a window-cached layer: keys start at 10
    chunks = list(attention_chunks(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(qpos),
                                   torch.from_numpy(kpos), HEAD_DIM ** -0.5, window, chunk=7))
    got = torch.cat([c[0] for c in chunks], dim=1).numpy()
    np.testing.assert_allclose(got, _reference_probs(q, k, qpos, kpos, HEAD_DIM ** -0.5, window), atol=1e-5)


def test_sink_and_recent_masses_match_explicit_masks() -> None:
    from kvtool.analysis.attention import RECENT_WINDOWS, SINK_COUNTS, _sink_and_cover

    rng = np.random.default_rng(15)
    kpos, qpos = torch.arange(3, 300), torch.arange(200, 300)  # keys from 3: a window-trimmed layer
    logits = torch.from_numpy(rng.standard_normal((2, 100, 297)).astype(np.float32))
    probs = torch.softmax(logits.masked_fill(kpos[None, None] > qpos[None, :, None], float("-inf")), -1)
    sink, cover = _sink_and_cover(probs, qpos, kpos)
    dist = qpos[:, None] - kpos[None, :]
    for i, s in enumerate(SINK_COUNTS):
        is_sink = (kpos < s)[None, :]
        assert torch.allclose(sink[:, i], (probs * is_sink).sum(dim=(1, 2)), atol=1e-4)
        for j, w in enumerate(RECENT_WINDOWS):
            mask = (is_sink | (dist < w)).float()
            assert torch.allclose(cover[:, i, j], (probs * mask).sum(dim=(1, 2)), atol=1e-4)


def _sink_layer(rng: np.random.Generator, tq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every query points along u; only the key at position 0 does: StreamingLLM's attention sink."""
    u = np.zeros(HEAD_DIM, np.float32)
    u[0] = 1.0
    k = gaussian(rng, KV_HEADS, T, HEAD_DIM)
    k[:, :, 0] = 0.0
    k[:, 0, :] = 40.0 * u
    q = 0.1 * gaussian(rng, Q_HEADS, tq, HEAD_DIM) + 4.0 * u
    return k, gaussian(rng, KV_HEADS, T, HEAD_DIM), q


def test_planted_sink_gets_nearly_all_the_mass(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    path = write_cache(tmp_path / "c.h5", 1, T, lambda i: _sink_layer(rng, 32))
    att = analyze(path)["layers"][0]["attention"]
    assert att["num_queries"] == 32
    assert min(att["sink_mass"]) > 0.99
    assert min(att["sink_mass_by_count"]["1"]) > 0.99
    assert max(att["old_mass"]) < 0.01
    assert max(att["entropy"]) < 0.1
    assert att["recommendation"]["sinks"] == 1
    assert att["recommendation"]["recent"] == 16


def test_planted_locality_recommends_a_recent_window_without_sinks(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    k = gaussian(rng, KV_HEADS, T, HEAD_DIM)
    q = 3.0 * np.repeat(k[:, -32:], Q_HEADS // KV_HEADS, axis=0)  # each query matches its own key
    path = write_cache(tmp_path / "c.h5", 1, T, lambda i: (k, k, q))
    att = analyze(path)["layers"][0]["attention"]
    assert min(att["local_mass"]) > 0.95
    assert max(att["sink_mass"]) < 0.01
    assert att["recommendation"]["sinks"] == 0 and att["recommendation"]["recent"] == 16
    assert max(att["heavy_hitter_fraction"]) < 0.05


# ----------------------------------------------------------------------------------------- similarity


def test_identical_adjacent_layers_have_similarity_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    k, v, q = gaussian(rng, KV_HEADS, T, HEAD_DIM), gaussian(rng, KV_HEADS, T, HEAD_DIM), \
        gaussian(rng, Q_HEADS, 16, HEAD_DIM)
    result = analyze(write_cache(tmp_path / "c.h5", 3, T, lambda i: (k, v, q)))
    assert result["layers"][0]["similarity"]["previous"] is None
    for entry in result["layers"][1:]:
        prev = entry["similarity"]["previous"]
        for name in ("keys", "values"):
            assert prev[name]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
            assert prev[name]["layer_cka"] == pytest.approx(1.0, abs=1e-6)
        assert prev["attention"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert prev["sharing_candidate"] is True
        assert entry["recommendation"]["share_with_layer"] == entry["layer"] - 1
    assert result["summary"]["sharing_candidates"] == [1, 2]


def test_unrelated_layers_are_not_sharing_candidates(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    result = analyze(write_cache(tmp_path / "c.h5", 2, T, lambda i: (
        gaussian(rng, KV_HEADS, T, HEAD_DIM), gaussian(rng, KV_HEADS, T, HEAD_DIM), None)))
    prev = result["layers"][1]["similarity"]["previous"]
    assert abs(prev["keys"]["mean_cosine"]) < 0.05
    assert abs(prev["keys"]["layer_cka"]) < 0.05  # debiased: the plain estimator would give ~0.3 here
    assert prev["sharing_candidate"] is False


def test_cka_is_rotation_invariant_and_cosine_is_not() -> None:
    rng = np.random.default_rng(11)
    x = torch.from_numpy(gaussian(rng, T, HEAD_DIM))
    assert linear_cka(x, x @ random_rotation(HEAD_DIM, 1)) == pytest.approx(1.0, abs=1e-6)
    heads = head_similarity(torch.stack([x, x @ random_rotation(HEAD_DIM, 1)]))
    assert heads["mean_cka"] == pytest.approx(1.0, abs=1e-6) and abs(heads["mean_cosine"]) < 0.1


# ------------------------------------------------------------------------------------ whole and errors


def test_no_queries_skips_attention_with_a_note(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    result = analyze(write_cache(tmp_path / "c.h5", 2, T, lambda i: (
        gaussian(rng, KV_HEADS, T, HEAD_DIM), gaussian(rng, KV_HEADS, T, HEAD_DIM), None)))
    assert all(e["attention"] is None for e in result["layers"])
    assert any("no queries" in n for n in result["notes"])
    assert result["summary"]["mean_sink_mass"] is None
    _dump(result)


def test_zero_data_gives_json_without_nan(tmp_path: Path) -> None:
    z = np.zeros((KV_HEADS, T, HEAD_DIM), np.float32)
    result = analyze(write_cache(tmp_path / "c.h5", 2, T, lambda i: (z, z, np.zeros((Q_HEADS, 8, HEAD_DIM)))))
    text = _dump(result)
    assert "NaN" not in text and result["layers"][0]["spectrum"]["keys"]["per_head"]["rank95"] == [0, 0]


def test_layer_selection_and_range_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    path = write_cache(tmp_path / "c.h5", 3, 64, lambda i: (
        gaussian(rng, KV_HEADS, 64, HEAD_DIM), gaussian(rng, KV_HEADS, 64, HEAD_DIM), None))
    result = analyze(path, layers="0,2")
    assert result["layers_analysed"] == [0, 2]
    assert result["layers"][1]["similarity"]["previous"]["previous_layer"] == 0
    with pytest.raises(StoreError, match=r"0\.\.2"):
        analyze(path, layers=[5])
    with pytest.raises(InputError, match=r"0\.\.2"):
        analyze(path, layers="1-7")


def test_not_a_kvtool_cache(tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="kvtool"):
        analyze(plain)
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(StoreError):
        analyze(text)


def test_unwritable_plots_dir_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="plots directory"):
        analyze(tmp_path / "missing.h5", plots_dir=blocker / "plots")


def test_plots_are_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    path = write_cache(tmp_path / "c.h5", 3, 64, lambda i: _sink_layer_small(rng))
    result = analyze(path, plots_dir=tmp_path / "plots")
    names = sorted(Path(p).name for p in result["plots"])
    assert names == ["attention.png", "channels.png", "ranks.png", "similarity.png", "spectra.png"]
    for p in result["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _sink_layer_small(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return gaussian(rng, KV_HEADS, 64, HEAD_DIM), gaussian(rng, KV_HEADS, 64, HEAD_DIM), \
        gaussian(rng, Q_HEADS, 8, HEAD_DIM)


def test_sliding_layer_uses_its_window_and_aligns_positions(tmp_path: Path) -> None:
    """A sliding layer that kept only the last 32 keys: attention respects the window, and the
    comparison with the full layer before it runs on the 32 positions both hold."""
    from _synth_cache import header

    from kvtool.store import CacheWriter

    rng = np.random.default_rng(16)
    t, window = 64, 16
    k, v = gaussian(rng, KV_HEADS, t, HEAD_DIM), gaussian(rng, KV_HEADS, t, HEAD_DIM)
    q, qpos = gaussian(rng, Q_HEADS, 8, HEAD_DIM), np.arange(t - 8, t)
    path = tmp_path / "c.h5"
    with CacheWriter(path, header(2)) as w:
        w.add_sequence(np.arange(t), source="synthetic")
        w.write_layer(0, 0, k, v, queries=q, query_positions=qpos)
        w.write_layer(0, 1, k[:, 32:], v[:, 32:], queries=q, query_positions=qpos, layer_type="sliding",
                      sliding_window=window, key_start=32)
    result = analyze(path)
    sliding = result["layers"][1]
    assert sliding["tokens"] == 32 and sliding["layer_type"] == "sliding"
    prev = sliding["similarity"]["previous"]
    assert prev["common_tokens"] == 32
    assert prev["keys"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)  # the same keys, aligned
    att = sliding["attention"]
    assert att["sink_mass"] == [0.0] * Q_HEADS  # the first tokens left the window
    assert att["cover"]["mass"][0][0][0] == pytest.approx(1.0, abs=1e-5)  # all mass within 16 tokens


def test_each_layer_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtool.store import CacheReader

    rng = np.random.default_rng(17)
    path = write_cache(tmp_path / "c.h5", 4, 64, lambda i: (
        gaussian(rng, KV_HEADS, 64, HEAD_DIM), gaussian(rng, KV_HEADS, 64, HEAD_DIM), None))
    reads: list[int] = []
    original = CacheReader.layer

    def counting(self: CacheReader, layer: int, *args: object, **kw: object):
        reads.append(layer)
        return original(self, layer, *args, **kw)

    monkeypatch.setattr(CacheReader, "layer", counting)
    done: list[tuple[int, int]] = []
    analyze(path, progress=lambda d, n: done.append((d, n)))
    assert reads == [0, 1, 2, 3]
    assert done == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_json_safe_drops_nan_and_numpy_types() -> None:
    from kvtool.analysis import json_safe

    out = json_safe({"a": np.float32(np.nan), "b": [np.int64(3), np.inf], "c": np.array([1.5]), 4: True})
    assert out == {"a": None, "b": [3, None], "c": [1.5], "4": True}
    json.dumps(out, allow_nan=False)


def test_codec_recommendation_follows_the_key_layout() -> None:
    """Keys that quantize best per channel with heavy outlier channels (Gemma 3, Qwen2.5) point to KVQuant's
    per-channel pre-RoPE keys and light values; milder ones (SmolLM2) to the rotated TurboQuant form."""
    from kvtool.analysis.recommend import LIGHT_VALUES, PER_CHANNEL_KEYS, ROTATED_FORM, recommend_codec

    def layer(scheme: str) -> dict:
        return {"quantization": {"keys": {"scheme": scheme}, "values": {"scheme": "rotate+per-token"}}}

    gemma = recommend_codec([layer("per-channel")] * 5 + [layer("rotate+per-token")], [8.4] * 6)
    assert gemma["keys"] == PER_CHANNEL_KEYS and gemma["values"] == LIGHT_VALUES and "5 of 6" in gemma["why"]
    smol = recommend_codec([layer("per-channel")] * 6, [4.7] * 6)  # per channel, but mild outliers
    assert smol["keys"] == ROTATED_FORM and smol["values"] == ROTATED_FORM
    assert recommend_codec([layer("rotate+per-token")] * 4 + [layer("per-channel")], [9.0] * 5)["keys"] \
        == ROTATED_FORM
    # Qwen2.5: key biases make a few channels large at every token (RMS 92.9× the median channel in one
    # layer) while the |max| ratio stays mild (3.8): per-channel keys (the rotated form gave KLD 1.43 there)
    qwen = recommend_codec([layer("per-channel")] * 6, [3.8] * 6, [92.9] + [6.0] * 5)
    assert qwen["keys"] == PER_CHANNEL_KEYS and "92.9" in qwen["why"]
    assert recommend_codec([layer("per-channel")] * 6, [4.1] * 6, [13.0] * 6)["keys"] == ROTATED_FORM  # SmolLM2
