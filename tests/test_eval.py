"""kvtool eval: llama.cpp's statistics, the chunking protocol, exactness of `none`, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _cli import assert_one_line_error
from _cli import run as cli_run

from kvtool import metrics
from kvtool.codecs.assignment import Assignment
from kvtool.evaluate import chunk_tokens, evaluate
from kvtool.models import LoadedModel

REQUIRED = ("ppl_exact", "ppl_compressed", "delta_ppl_pct", "kld_mean", "kld_p99", "top1_agreement",
            "bits_per_element", "tokens_scored")


# -- statistics -----------------------------------------------------------------------------------------


def test_identical_logits_give_zero():
    logits = torch.randn(50, 300, generator=torch.Generator().manual_seed(0))
    targets = np.arange(50) % 300
    s = metrics.summarize_next_token(metrics.next_token_stats(logits, logits.clone(), targets))
    assert s["kld_mean"] == 0.0 and s["kld_max"] == 0.0 and s["delta_ppl_pct"] == 0.0
    assert s["ln_ppl_ratio"] == 0.0 and s["top1_agreement"] == 1.0 and s["rms_dp"] == 0.0


def test_statistics_on_a_known_distribution():
    # exact p = (1/2, 1/2), compressed q = (3/4, 1/4), the true next token is always 0
    exact = torch.zeros(40, 2, dtype=torch.float64)
    comp = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64).repeat(40, 1)
    s = metrics.summarize_next_token(metrics.next_token_stats(exact, comp, np.zeros(40, dtype=int)))
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert s["kld_mean"] == pytest.approx(kl, rel=1e-12) and s["kld_p99"] == pytest.approx(kl, rel=1e-12)
    assert s["ppl_exact"] == pytest.approx(2.0) and s["ppl_compressed"] == pytest.approx(4 / 3)
    assert s["delta_ppl_pct"] == pytest.approx(100 * ((4 / 3) / 2 - 1))
    assert s["rms_dp"] == pytest.approx(0.25) and s["tokens_scored"] == 40
    assert s["top1_agreement"] == 1.0  # ties go to the first token in both


def test_stderrs_and_percentiles_follow_llama_cpp():
    rng = np.random.default_rng(1)
    n = 500
    stats = {"nll_exact": rng.gamma(2.0, 1.0, n), "kld": rng.gamma(0.5, 0.02, n),
             "same_top": (rng.random(n) < 0.9).astype(float), "p_exact": rng.random(n)}
    stats["nll"] = stats["nll_exact"] + rng.normal(0.01, 0.05, n)
    stats["p"] = np.clip(stats["p_exact"] + rng.normal(0, 0.02, n), 0, 1)
    s = metrics.summarize_next_token(stats)
    diff = stats["nll"] - stats["nll_exact"]
    # the covariance route of llama.cpp equals the plain stderr of the paired difference
    assert s["ln_ppl_ratio"] == pytest.approx(diff.mean())
    assert s["ln_ppl_ratio_stderr"] == pytest.approx(diff.std(ddof=1) / math.sqrt(n), rel=1e-9)
    assert s["kld_stderr"] == pytest.approx(stats["kld"].std(ddof=1) / math.sqrt(n), rel=1e-9)
    assert s["delta_ppl_pct_stderr"] == pytest.approx(100 * math.exp(diff.mean()) * s["ln_ppl_ratio_stderr"])
    f = stats["same_top"].mean()
    assert s["top1_agreement_stderr"] == pytest.approx(math.sqrt(f * (1 - f) / (n - 1)))
    srt = np.sort(stats["kld"])
    assert s["kld_median"] == pytest.approx((srt[249] + srt[250]) / 2)
    p = 0.99 * (n - 1)
    assert s["kld_p99"] == pytest.approx(srt[int(p)] + (p - int(p)) * (srt[int(p) + 1] - srt[int(p)]))
    dp2 = np.square(stats["p"] - stats["p_exact"])
    assert s["rms_dp"] == pytest.approx(math.sqrt(dp2.mean()))
    assert s["rms_dp_stderr"] == pytest.approx(0.5 / s["rms_dp"] * dp2.std(ddof=1) / math.sqrt(n), rel=1e-9)


def test_chunking():
    chunks = chunk_tokens(np.arange(11), 4)
    np.testing.assert_array_equal(chunks, [[0, 1, 2, 3], [4, 5, 6, 7]])  # the tail that fills no chunk goes
    np.testing.assert_array_equal(chunk_tokens(np.arange(8), 4, bos=99)[:, 0], [99, 99])


# -- the protocol on a tiny model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_loaded():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model=model, tokenizer=None, spec="tiny", architecture="LlamaForCausalLM", source="",
                       device="cpu")


def test_chunks_score_exactly_the_expected_tokens(tiny_loaded):
    tokens = np.random.default_rng(0).integers(0, 128, 70)
    specs = ["none", "turboquant:bits=2", "kivi:bits=2,group=4,residual=4"]
    r = evaluate(tiny_loaded, tokens, [Assignment.of(s, s) for s in specs], context=16)
    assert r["chunks"] == 4 and r["tokens_scored"] == 4 * (16 - 1 - 8) == r["methods"][1]["tokens_scored"]
    # an independent implementation: one forward pass per whole chunk, logits at 8..14 predict tokens 9..15
    nll = []
    with torch.inference_mode():
        for chunk in tokens[:64].reshape(4, 16):
            logp = torch.log_softmax(tiny_loaded.model(torch.as_tensor(chunk)[None]).logits[0].double(), -1)
            nll += [-float(logp[t, chunk[t + 1]]) for t in range(8, 15)]
    assert r["ppl_exact"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    none, tq = r["methods"][0], r["methods"][1]
    assert none["kld_max"] == 0.0 and none["delta_ppl_pct"] == 0.0 and none["top1_agreement"] == 1.0
    assert none["bits_per_element"] == 32.0  # a float32 model: `none` stores float32
    assert tq["kld_mean"] > 0 and tq["bits_per_element"] == pytest.approx(2 + 16 / 16)
    assert none["cache_bytes_exact"] == 2 * 2 * 2 * 8 * 16 * 4  # layers, roles, kv heads, prompt, d, float32
    for key in REQUIRED:
        assert key in r and key in tq


def test_streaming_none_is_exact_and_windows_are_counted(tiny_loaded):
    tokens = np.random.default_rng(1).integers(0, 128, 32)
    specs = ["none", "kivi:bits=2,group=4,residual=4"]
    r = evaluate(tiny_loaded, tokens, [Assignment.of(s, s) for s in specs], context=32, mode="streaming")
    none, kivi = r["methods"]
    assert none["kld_max"] == 0.0 and none["delta_ppl_pct"] == 0.0
    # 31 tokens streamed: 28 coded in blocks of 4 (2-bit codes + fp16 scale/zero per group of 4), 3 in fp16
    coded_bits = 2 + 32 / 4
    assert kivi["bits_per_element"] == pytest.approx((28 * coded_bits + 3 * 16) / 31)


# -- the bundled model through the CLI ------------------------------------------------------------------


@pytest.mark.model
def test_cli_eval_on_the_bundled_model(tmp_path):
    out = tmp_path / "eval.json"
    result = cli_run("eval", "--text", "samples/apache-2.0.txt", "--context", "128", "--max-tokens", "128",
                     "--method", "none", "--method", "fp16", "--method", "turboquant:bits=3", "--json", out)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["kvtool_report"] == "eval" and r["model"] == "default" and r["mode"] == "prefill"
    for key in REQUIRED:
        assert key in r
    none, fp16, tq = r["methods"]
    assert r["tokens_scored"] == 63 and none["label"] == "none"
    assert none["delta_ppl_pct"] == 0.0 and none["kld_mean"] == 0.0 and none["kld_max"] == 0.0
    assert abs(fp16["delta_ppl_pct"]) < 0.05 and fp16["bits_per_element"] == 16.0
    assert tq["kld_mean"] > 1e-4 and tq["bits_per_element"] == pytest.approx(3.25)
    assert r["delta_ppl_pct"] == none["delta_ppl_pct"]  # top level = the first method
    assert "KLD" in cli_run("eval", "--text", "samples/apache-2.0.txt", "--context", "64", "--max-tokens",
                            "64", "--keys", "none", "--values", "kivi:bits=2").output
    spec = "salient:select=[knorm:keep=0.5],hi=[fp16],lo=[drop]"  # brackets are not rich markup: printed whole
    assert f"1: {spec} — ppl" in cli_run("eval", "--text", "samples/apache-2.0.txt", "--context", "64",
                                         "--max-tokens", "64", "--method", spec).output.replace("\n", "")


@pytest.mark.model
@pytest.mark.parametrize("args,message", [
    (["--context", "4096"], "the text has 2224 tokens, fewer than one chunk of --context 4096"),
    (["--context", "9000"], "--context 9000 exceeds the model's maximum of 8192 tokens"),
])
def test_cli_eval_errors_after_loading(args, message):
    assert_one_line_error(cli_run("eval", "--text", "samples/apache-2.0.txt", "--method", "fp16", *args), message)


@pytest.mark.parametrize("args,message", [
    (["--method", "nope"], "unknown codec 'nope'"),
    (["--keys", "fp16"], "give --method SPEC for both keys and values"),
    (["--method", "fp16", "--mode", "sideways"], "--mode must be one of prefill, streaming, got 'sideways'"),
    (["--method", "fp16", "--device-map", "auto", "--max-memory", "cpu"], "--max-memory must be DEVICE=SIZE"),
    (["--method", "droprange:start=1,stop=3+kivi:bits=4", "--mode", "streaming"],
     "--mode streaming cannot use 'droprange': it selects tokens from the whole prompt at once; token "
     "selectors that can stream: keepfirst"),
])
def test_cli_eval_errors_before_loading(args, message, test_selectors):
    assert_one_line_error(cli_run("eval", "--text", "samples/apache-2.0.txt", *args), message)


def test_cli_eval_missing_text():
    assert_one_line_error(cli_run("eval", "--text", "nope.txt", "--method", "fp16"), "nope.txt: no such text file")


def test_eval_with_cpu_and_disk_offload_equals_the_plain_load(tiny_model_factory, tmp_path):
    from transformers import LlamaConfig

    from kvtool.models import load_model

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tiny_model_factory(config, "eval-offload")
    plain = load_model(str(folder))
    budget = int(sum(p.numel() * p.element_size() for p in plain.model.parameters()) * 0.98)
    out = tmp_path / "r.json"
    r = cli_run("eval", "--model", folder, "--text", "samples/apache-2.0.txt", "--context", "32", "--max-tokens",
                "64", "--method", "turboquant:bits=3", "--device-map", "auto", "--max-memory", f"cpu={budget}",
                "--offload-folder", tmp_path / "off", "--json", out)
    assert r.exit_code == 0, r.output
    offloaded = json.loads(out.read_text())
    assert set(offloaded["device_map"].values()) == {"cpu", "disk"}
    from kvtool.evaluate import tokenize_text

    ref = evaluate(plain, tokenize_text(plain, "samples/apache-2.0.txt", 64),
                   [Assignment.of("turboquant:bits=3", "turboquant:bits=3")], context=32)
    for key in ("ppl_exact", "ppl_compressed", "kld_mean", "bits_per_element"):
        assert offloaded[key] == ref[key], key
