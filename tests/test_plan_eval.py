"""Plans inside the model: `kvtool eval --plan`, evaluate() and CodecCache take a plan (checked first)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _cli import assert_one_line_error
from _cli import run as cli_run

from kvtool.cache import CodecCache
from kvtool.codecs.planfile import Plan, save_plan
from kvtool.errors import InputError
from kvtool.evaluate import evaluate
from kvtool.models import LoadedModel

CHOICES = {0: {"keys": "heads[turboquant:bits=2|kivi:bits=2,group=4,residual=4]", "values": "turboquant:bits=3"},
           1: {"keys": "fp16", "values": "heads[fp16|turboquant:bits=2]"}}


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model=model, tokenizer=None, spec="tiny", architecture="LlamaForCausalLM", source="",
                       device="cpu")


def tiny_plan(**geometry) -> Plan:
    geo = {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16, **geometry}
    return Plan({"model": "tiny", "model_source": "", "model_architecture": "LlamaForCausalLM"}, geo,
                ["fp16"], CHOICES, budget_bits=4.0)


def test_evaluate_and_codec_cache_take_a_plan(tiny, tmp_path) -> None:
    plan = tiny_plan()
    tokens = np.random.default_rng(0).integers(0, 128, 64)
    r = evaluate(tiny, tokens, [plan, plan.assignment()], context=32)
    by_plan, by_assignment = r["methods"]
    assert by_plan["kld_mean"] == by_assignment["kld_mean"] > 0
    assert by_plan["bits_per_element"] == by_assignment["bits_per_element"]
    path = save_plan(plan, tmp_path / "p.json")
    for given in (plan, path):
        cache = CodecCache(tiny.model, given)
        assert cache.assignment == plan.assignment()
    with pytest.raises(InputError, match="num_kv_heads 4 vs 2"):
        CodecCache(tiny.model, tiny_plan(num_kv_heads=4))
    with pytest.raises(InputError, match="made for model 'other'"):
        other = tiny_plan()
        other.model["model"] = "other"
        evaluate(tiny, tokens, [other], context=32)


@pytest.mark.model
def test_cli_eval_plan_on_the_bundled_model(smollm, tmp_path) -> None:
    from kvtool.models import model_shape

    shape = model_shape(smollm.config)
    geometry = {g: getattr(shape, g) for g in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")}
    choices = {i: {"keys": "turboquant:bits=3", "values": "turboquant:bits=3"} for i in range(shape.num_layers)}
    choices[0] = {"keys": "heads[fp16|turboquant:bits=2|turboquant:bits=4]", "values": "kivi:bits=2"}
    plan = Plan({"model": smollm.spec, "model_source": smollm.source, "model_architecture": smollm.architecture},
                geometry, ["turboquant:bits=3"], choices, budget_bits=3.5)
    path = save_plan(plan, tmp_path / "p.json")
    out = tmp_path / "e.json"
    r = cli_run("eval", "--text", "samples/apache-2.0.txt", "--context", "32", "--max-tokens", "32", "--plan",
                path, "--json", out)
    assert r.exit_code == 0, r.output
    (planned,) = json.loads(out.read_text())["methods"]
    assert planned["label"] == "plan p.json (3.5 bits)" and planned["kld_mean"] > 0
    assert planned["assignment"]["layers"]["0"]["keys"] == choices[0]["keys"]
    bad = json.loads(path.read_text())
    bad["geometry"]["num_layers"] = 31
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert_one_line_error(cli_run("eval", "--text", "samples/apache-2.0.txt", "--context", "64", "--plan",
                                  tmp_path / "bad.json"), "the plan must choose for layers 0..30")
    bad["kvtool_plan"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert_one_line_error(cli_run("eval", "--text", "samples/apache-2.0.txt", "--plan", tmp_path / "bad.json"),
                          "plan version 7 is not supported")


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_factory, tmp_path_factory):
    """A cache captured with a tiny random Llama (3 layers), whose folder `load_model` can load again."""
    from pathlib import Path

    from transformers import LlamaConfig

    from kvtool.capture import TextInput, capture
    from kvtool.models import load_model

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    loaded = load_model(str(tiny_model_factory(config, "plan-kld")))
    text = TextInput("apache", Path("samples/apache-2.0.txt").read_text()[:1200])
    return capture(loaded, [text], tmp_path_factory.mktemp("kld") / "c.h5", queries="last:32",
                   dtype="float32").path


EVAL = {"text": "samples/gpl-3.0.txt", "max_tokens": 128, "context": 64}
SPECS = ["uniform:bits=2", "uniform:bits=4", "uniform:bits=8"]


def test_sweep_eval_text_scores_every_spec_in_the_model(tiny_cache, tmp_path) -> None:
    from kvtool.sweep import EvalText, plot_frontier, sweep

    report = sweep(tiny_cache, SPECS, eval_text=EvalText(**EVAL))
    assert report["eval"]["chunks"] == 2 and report["eval"]["model"] == report["model"]
    kld = [r["eval"]["kld_mean"] for r in report["results"]]  # sorted by bits: 2, 4, 8
    assert [r["spec"] for r in report["results"]] == SPECS and kld[0] > kld[1] > kld[2] > 0
    assert all(r["frontier_kld"] for r in report["results"]) and "frontier_ppl" in report["results"][0]
    # each spec's bits in the model's cache (its KLD frontier's axis): per-token scales, as in the capture
    for r in report["results"]:
        assert r["eval"]["bits_per_element"] == pytest.approx(r["stored_bits"], rel=1e-6)
    pq = sweep(tiny_cache, ["pq:m=4,bits=8"], eval_text=EvalText(**EVAL))["results"][0]
    # a learned codebook is amortised over a 32-token prompt in the model, over 128 tokens in the capture
    assert pq["eval"]["bits_per_element"] > pq["stored_bits"] + 1
    png = plot_frontier(report, tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plan_kld_objective_weights_layers_and_roles_by_measured_sensitivity(tiny_cache, tmp_path) -> None:
    from kvtool.plan import plan
    from kvtool.sweep import EvalText

    r = plan(tiny_cache, 4.0, SPECS, objective="kld", eval_text=EvalText(**EVAL), output=tmp_path / "p.json")
    sens = r["sensitivity"]
    # measured with the attention objective's choice of each layer's keys and values at the same budget
    assert set(sens["reference"]) == {"0", "1", "2"}
    assert all(sens["reference"][i][role] in SPECS for i in sens["reference"] for role in ("keys", "values"))
    for role in ("keys", "values"):
        assert set(sens["sensitivity"][role]) == {"0", "1", "2"}
        for i, s in sens["sensitivity"][role].items():
            assert s * sens["e2"][role][i] == pytest.approx(sens["kld"][role][i]) and sens["kld"][role][i] > 0
    assert r["plan"]["objective"] == "kld" and r["predicted"]["stored_bytes"] <= r["budget_bytes"]
    assert r["predicted"]["objective"] == pytest.approx(sum(row["objective"] for row in r["predicted"]["layers"]))
    measured = r["verify"]["plan"]["eval"]["kld_mean"], r["verify"]["best_uniform"]["eval"]["kld_mean"]
    assert all(x > 0 for x in measured)


def test_plan_kld_needs_an_eval_text(tiny_cache) -> None:
    assert_one_line_error(cli_run("plan", tiny_cache, "-c", "fp16", "--objective", "kld"), "give --eval-text")
