"""`kvtool budget`: figures recomputed by hand from model configs, window caps, GQA/MQA/MLA geometry,
codec bits from stored bytes, presets against their model cards, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _cli import assert_one_line_error, run

from kvtool.budget import (
    GIB,
    KVCost,
    StoredBytes,
    TensorShape,
    budget,
    count_parameters,
    first_context_over,
    load_geometry,
    parse_tokens,
)
from kvtool.codecs import parse_spec

# SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M, as the bundled GGUF's metadata gives it)
SMOLLM2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "max_position_embeddings": 8192, "tie_word_embeddings": True}


def config_file(tmp_path: Path, cfg: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


# ----------------------------------------------------------------------------------- by-hand figures


def test_bonsai_8b_fp16_kv_at_65536_tokens_is_9_gib() -> None:
    r = budget("bonsai-8b", contexts=[65536], batches=[1], weight_bits=[1.125, 16], kv_specs=["fp16"])
    kv = r["rows"][0]["kv"][0]
    # 36 layers × 8 KV heads × 128 × (K and V) × 2 bytes × 65,536 tokens
    assert kv["bytes"] == 36 * 8 * 128 * 2 * 2 * 65536 == 9_663_676_416
    assert kv["bytes"] / GIB == pytest.approx(9.0)
    g = r["geometry"]
    assert (g["num_layers"], g["tensors"][0]["heads"], g["tensors"][0]["dim"], g["max_context"]) == (36, 8, 128, 65536)
    # the card's 8.19B parameters (~6.95B non-embedding) and 1.15 GB at 1.125 bits, computed from the config
    assert g["parameters"] / 1e9 == pytest.approx(8.19, abs=0.005)
    assert g["parameters_non_embedding"] / 1e9 == pytest.approx(6.95, abs=0.005)
    weights = r["weights"][0]["bytes"]
    assert weights / 1e9 == pytest.approx(1.15, abs=0.005)
    assert kv["bytes"] / weights == pytest.approx(8.4, abs=0.05)  # "about 8x the weights"
    # the cache outgrows the 1.125-bit weights at the first token count past weights / bytes-per-token
    per_token = 36 * 8 * 128 * 2 * 2
    cross = {c["weight_bits"]: c["context"] for c in r["crossover"]}
    assert cross[1.125] == int(weights // per_token) + 1
    assert cross[16] == int(r["weights"][1]["bytes"] // per_token) + 1 and cross[16] > 65536


def test_smollm2_from_its_config(tmp_path: Path) -> None:
    path = config_file(tmp_path, SMOLLM2)
    r = budget(str(path), contexts=[8192, 1000], batches=[1, 8], weight_bits=[16], kv_specs=["fp16"])
    # by hand: embeddings 49152×576 (tied) + 30 × (attention 576·64·(2·9 + 2·3) + MLP 3·576·1536 + 2 norms)
    # + the final norm
    per_layer = 576 * 64 * (2 * 9 + 2 * 3) + 3 * 576 * 1536 + 2 * 576
    params = 49152 * 576 + 30 * per_layer + 576
    assert r["geometry"]["parameters"] == params == 134_515_008
    per_token = 30 * 3 * 64 * 2 * 2  # 23,040 bytes
    rows = {(row["context"], row["batch"]): row["kv"][0]["bytes"] for row in r["rows"]}
    assert rows == {(8192, 1): 8192 * per_token, (8192, 8): 8 * 8192 * per_token, (1000, 1): 1000 * per_token,
                    (1000, 8): 8000 * per_token}
    cross = {c["batch"]: c["context"] for c in r["crossover"]}
    assert cross == {1: 2 * params // per_token + 1, 8: 2 * params // (8 * per_token) + 1} == {1: 11677, 8: 1460}
    assert r["rows"][0]["beyond_max_context"] is False and r["crossover"][0]["beyond_max_context"] is True


@pytest.mark.model  # reads the bundled GGUF's header (no weights), which takes seconds
def test_default_is_the_bundled_models_config_read_without_weights(tmp_path: Path, monkeypatch) -> None:
    # an empty model cache: the config comes from the GGUF header, not from a converted copy
    monkeypatch.setenv("KVTOOL_CACHE_DIR", str(tmp_path / "empty"))
    g = load_geometry("default")
    assert g.parameters == 134_515_008 and g.num_layers == 30 and g.max_context == 8192
    assert [(t.heads, t.dim) for t in g.tensors] == [(3, 64), (3, 64)]
    assert g.source.startswith("sha256:") and "GGUF metadata" in g.sources[0]


def test_presets_match_their_model_cards() -> None:
    b17 = load_geometry("bonsai-1.7b")  # card: 1.72B (~1.4B non-embedding), 28 layers, 8 KV heads, 32,768
    assert b17.parameters / 1e9 == pytest.approx(1.72, abs=0.005)
    assert b17.parameters_non_embedding / 1e9 == pytest.approx(1.41, abs=0.01)
    assert (b17.num_layers, b17.tensors[0].heads, b17.max_context) == (28, 8, 32768)
    assert b17.parameters * 1.125 / 8 / 1e9 == pytest.approx(0.24, abs=0.005)  # card: 0.24 GB deployed
    bitnet = load_geometry("BitNet-b1.58-2B-4T")  # preset names are case-insensitive
    # by hand: tied embeddings 128256×2560 + 30 × (attention 2560·128·(2·20 + 2·5) + gated FFN 3·2560·6912
    # + input/post-attention norms 2·2560 + BitNet's sub-norms 2560 + 6912) + final norm
    layer = 2560 * 128 * (2 * 20 + 2 * 5) + 3 * 2560 * 6912 + 2 * 2560 + 2560 + 6912
    assert bitnet.parameters == 128256 * 2560 + 30 * layer + 2560
    assert (bitnet.num_layers, bitnet.tensors[0].heads, bitnet.tensors[0].dim, bitnet.max_context) == (30, 5, 128,
                                                                                                         4096)
    assert all(s for s in bitnet.sources)


def test_formula_agrees_with_the_meta_count_for_a_standard_decoder() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**{k: v for k, v in SMOLLM2.items() if k not in ("model_type", "architectures")})
    exact = count_parameters(config, known=True)
    formula = count_parameters(config, known=False)
    assert exact[:2] == formula[:2] and "meta" in exact[2] and "formula" in formula[2]


# ------------------------------------------------------------------------------------------ geometry


def test_a_sliding_window_layer_is_capped_at_its_window(tmp_path: Path) -> None:
    window = 512
    types = ["sliding_attention", "full_attention"] * 2
    cfg = {**SMOLLM2, "model_type": "qwen3", "num_hidden_layers": 4, "layer_types": types, "sliding_window": window,
           "use_sliding_window": True}
    g = load_geometry(str(config_file(tmp_path, cfg)))
    assert g.layer_caps == (window, None, window, None)
    cost = KVCost.build("fp16", g)
    per_layer_token = 3 * 64 * 2 * 2
    assert cost.bytes(4096)["bytes"] == per_layer_token * (2 * 4096 + 2 * window)
    assert cost.bytes(300)["bytes"] == per_layer_token * 4 * 300  # below the window every layer holds all
    # every layer sliding (Mistral 7B v0.1 style: a window and no layer_types): the cache stops growing, and
    # weights it never reaches give no crossover
    mistral = {**SMOLLM2, "model_type": "mistral", "sliding_window": window}
    r = budget(str(config_file(tmp_path, mistral, "m.json")), contexts=[100_000], weight_bits=[16],
               kv_specs=["fp16"])
    assert r["rows"][0]["kv"][0]["bytes"] == 30 * per_layer_token * window
    assert r["crossover"][0]["context"] is None
    assert r["geometry"]["layers_capped"] == {"512": 30}


def test_gqa_mqa_and_mla_latent_geometry(tmp_path: Path) -> None:
    falcon = {"model_type": "falcon", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 8, "multi_query": True, "new_decoder_architecture": False}
    g = load_geometry(str(config_file(tmp_path, falcon, "falcon.json")))
    assert [(t.name, t.heads, t.dim) for t in g.tensors] == [("keys", 1, 32), ("values", 1, 32)]  # MQA
    deepseek = {"model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
                "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "kv_lora_rank": 512,
                "q_lora_rank": 128, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}
    g = load_geometry(str(config_file(tmp_path, deepseek, "ds.json")))
    assert [(t.name, t.role, t.heads, t.dim) for t in g.tensors] == [("latent", "values", 1, 512),
                                                                     ("rope_keys", "keys", 1, 64)]
    # one latent of 512 + 64 elements per token and layer, 2 bytes each in fp16
    assert KVCost.build("fp16", g).bytes(1000)["bytes"] == 3 * 1000 * 576 * 2
    assert any("MLA" in n for n in g.notes)
    linear = {**SMOLLM2, "model_type": "qwen3_next", "num_hidden_layers": 4,
              "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"]}
    g = load_geometry(str(config_file(tmp_path, linear, "next.json")))
    assert g.layer_caps == (0, 0, 0, None) and any("not counted" in n for n in g.notes)


# --------------------------------------------------------------------------------------- stored bytes


def encoded_bytes(spec: str, role: str, heads: int, tokens: int, dim: int) -> int:
    codec = parse_spec(spec).for_role(role)
    x = np.random.default_rng(5).standard_normal((heads, tokens, dim)).astype(np.float32)
    codec.fit(x)
    return codec.encode(x).nbytes


@pytest.mark.parametrize("spec, role", [("kivi:bits=2", "keys"), ("kivi:bits=2", "values"),
                                        ("turboquant:bits=3,sink=4", "keys"), ("fp8", "values")])
def test_codec_bits_come_from_stored_bytes(spec: str, role: str) -> None:
    t = TensorShape(role, role, 2, 64)
    stored = StoredBytes(spec, t)
    assert stored.affine
    # exact below the knee, the extrapolated line beyond it: both equal a real encoding's stored bytes
    for tokens in (100, 1000, 4096, 6000):
        assert stored(tokens)[0] == pytest.approx(encoded_bytes(spec, role, 2, tokens, 64), rel=2e-3, abs=64)


def test_windows_count_at_short_context() -> None:
    # KIVI keeps the last 128 tokens in fp16: a 100-token cache is all window, 16 bits per element
    t = TensorShape("values", "values", 1, 64)
    kivi = StoredBytes("kivi:bits=2", t)
    assert kivi(100)[0] == 100 * 64 * 2
    bits = [8 * kivi(n)[0] / (n * 64) for n in (256, 4096, 65536)]
    assert bits[0] > bits[1] > bits[2] > 3.0  # the window's share shrinks; scales keep it above 2 + 16/32...
    assert bits[2] == pytest.approx(2 + 2 * 16 / 32, abs=0.05)


def test_first_context_over() -> None:
    assert first_context_over(lambda t: 10 * t, 95) == 10
    assert first_context_over(lambda t: 10 * min(t, 5), 95) is None
    assert first_context_over(lambda t: 10 * t, 5) == 1


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_table_json_plot_and_a_gate_on_the_report(tmp_path: Path) -> None:
    out, png = tmp_path / "b.json", tmp_path / "plots" / "b.png"
    r = run("budget", "--model", "bonsai-1.7b", "--context", "4k,32k", "--batch", "1,4", "--kv", "fp16",
            "--kv", "kivi:bits=2", "--weight-bits", "16,1.125", "--json", out, "--plot", png)
    assert r.exit_code == 0, r.output
    assert "KV cache, GiB" in r.stdout and "outgrows the weights" in r.stdout
    data = json.loads(out.read_text())
    assert data["kvtool_report"] == "budget" and data["model_source"] == "preset:bonsai-1.7b"
    assert [c["spec"] for c in data["kv_codecs"]] == ["fp16", "kivi:bits=2"]
    assert len(data["rows"]) == 4 and len(data["crossover"]) == 2 * 2 * 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the budget report is gated like any other, through two wildcards
    largest = max(kv["bytes"] for row in data["rows"] for kv in row["kv"])
    assert run("check", out, "--max", f"rows.*.kv.*.bytes={largest}").exit_code == 0
    assert run("check", out, "--max", f"rows.*.kv.*.bytes={largest - 1}").exit_code == 1


@pytest.mark.parametrize("args, fragment", [
    (["--context", "-4k"], "must be a whole number of tokens >= 1"),
    (["--context", "0"], ">= 1"),
    (["--context", "lots"], "is not a token count"),
    (["--batch", "-1"], "batch sizes must be >= 1"),
    (["--batch", "two"], "is not an integer"),
    (["--weight-bits", "0"], "bits must be in (0, 64]"),
    (["--model", "no-such-preset"], "not a preset"),
    (["--kv", "kivi:bits=9"], "bits"),
    (["--kv", "fp16", "--plot", "x.txt"], ".png"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], fragment: str) -> None:
    assert_one_line_error(run("budget", "--model", "bonsai-1.7b", *args), fragment)


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not a JSON config"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"model_type": "llama", "vocab_size": 10}), "no layer count"),
    (json.dumps({**SMOLLM2, "num_hidden_layers": "many"}), "invalid llama config"),
])
def test_unreadable_configs_are_bad_input(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    assert_one_line_error(run("budget", "--model", path, "--kv", "fp16"), fragment)
    assert_one_line_error(run("budget", "--model", tmp_path / "missing.json"), "not a preset")
    (tmp_path / "folder").mkdir(exist_ok=True)
    assert_one_line_error(run("budget", "--model", tmp_path / "folder"), "has no config.json")


def test_parse_tokens() -> None:
    assert parse_tokens("4k,32k,128k") == [4096, 32768, 131072]
    assert parse_tokens("1M, 1.5k ,100") == [1048576, 1536, 100]


def test_a_hub_id_is_read_from_its_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """`budget --model org/name` reads the hub model's config alone (as capture/eval find hub ids)."""
    import kvtool.budget as budget_module
    from kvtool.budget_presets import PRESETS

    seen = {}

    def fake_hub_config(spec: str, *, trust_remote_code: bool = False):
        seen.update(spec=spec, trust=trust_remote_code)
        return dict(PRESETS["bonsai-8b"]["config"]), "abc123"

    monkeypatch.setattr(budget_module, "hub_config", fake_hub_config)
    r = budget("someorg/some-model", contexts=[65536], batches=[1], weight_bits=[16], kv_specs=["fp16"],
               trust_remote_code=True)
    assert seen == {"spec": "someorg/some-model", "trust": True}
    assert r["model_source"] == "abc123" and r["geometry"]["num_layers"] == 36


def test_an_unknown_hub_id_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    result = run("budget", "--model", "nobody-kvtool/no-such-model")
    assert_one_line_error(result, "not a preset")
    assert "nobody-kvtool/no-such-model" in result.stderr and "hub" in result.stderr
