"""Plans inside the model: `kvtool eval --plan`, evaluate() and CodecCache take a plan (checked first)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _cli import assert_one_line_error
from _cli import run as cli_run

from kvtool.cache import CodecCache
from kvtool.errors import InputError
from kvtool.evaluate import evaluate
from kvtool.models import LoadedModel
from kvtool.plan import Plan, save_plan

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
    from kvtool.capture import model_shape

    shape = model_shape(smollm.config)
    geometry = {g: getattr(shape, g) for g in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")}
    choices = {i: {"keys": "turboquant:bits=3", "values": "turboquant:bits=3"} for i in range(shape.num_layers)}
    choices[0] = {"keys": "heads[fp16|turboquant:bits=2|turboquant:bits=4]", "values": "kivi:bits=2"}
    plan = Plan({"model": smollm.spec, "model_source": smollm.source, "model_architecture": smollm.architecture},
                geometry, ["turboquant:bits=3"], choices, budget_bits=3.5)
    path = save_plan(plan, tmp_path / "p.json")
    out = tmp_path / "e.json"
    r = cli_run("eval", "--text", "samples/apache-2.0.txt", "--context", "64", "--max-tokens", "64", "--plan",
                path, "--method", "turboquant:bits=3", "--json", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    tq, planned = report["methods"]
    assert planned["label"] == "plan p.json (3.5 bits)" and planned["kld_mean"] > 0
    assert planned["bits_per_element"] != tq["bits_per_element"]
    bad = json.loads(path.read_text())
    bad["geometry"]["num_layers"] = 31
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert_one_line_error(cli_run("eval", "--text", "samples/apache-2.0.txt", "--context", "64", "--plan",
                                  tmp_path / "bad.json"), "the plan must choose for layers 0..30")
    bad["kvtool_plan"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert_one_line_error(cli_run("eval", "--text", "samples/apache-2.0.txt", "--plan", tmp_path / "bad.json"),
                          "plan version 7 is not supported")
