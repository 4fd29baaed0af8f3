"""The lm-evaluation-harness bridge (kvtool.lmeval): with method=none it gives lm-eval's own hf backend's
results on the same model and task, offline (a local task YAML over a JSONL file under tests/data/lmeval)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_var, "1")

pytest.importorskip("lm_eval")

from _cli import assert_one_line_error  # noqa: E402
from _cli import run as cli_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lmeval"


def test_split_spec_is_joined_again():
    from lm_eval.utils import simple_parse_args_string

    from kvtool.errors import InputError
    from kvtool.lmeval import join_split_specs

    args = simple_parse_args_string("model=default,method=turboquant:bits=3,center=true,sink=4,queries=64")
    assert join_split_specs(args) == {"model": "default", "method": "turboquant:bits=3,center=true,sink=4",
                                      "queries": 64}
    with pytest.raises(InputError, match="unknown model argument 'colour'"):
        join_split_specs({"colour": 1})


def test_kvtool_backend_is_registered():
    from lm_eval.api.registry import get_model

    import kvtool.lmeval

    assert get_model("kvtool") is kvtool.lmeval.KvtoolLM


@pytest.fixture(scope="module")
def tiny_folder(tiny_model_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return tiny_model_factory(config, "lmeval-tiny")


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)  # lm-eval's own tasks: slow to index


def _evaluate(manager, model: str, args: str, tasks: list[str]) -> dict:
    import lm_eval

    import kvtool.lmeval  # noqa: F401  (registers "kvtool")

    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, device="cpu", batch_size=1,
                                   task_manager=manager, log_samples=True,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0)


@pytest.mark.model
def test_none_equals_the_hf_backend_and_a_codec_differs(tiny_folder, manager, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their JSONL relative to the repository root
    tasks = ["kvtool_tiny_mc", "kvtool_tiny_gen"]
    ours = _evaluate(manager, "kvtool", f"model={tiny_folder},method=none", tasks)
    hf = _evaluate(manager, "hf", f"pretrained={tiny_folder},dtype=float32", tasks)
    assert ours["results"]["kvtool_tiny_mc"]["acc,none"] == hf["results"]["kvtool_tiny_mc"]["acc,none"]
    assert ours["results"]["kvtool_tiny_gen"]["exact_match,none"] == \
        hf["results"]["kvtool_tiny_gen"]["exact_match,none"]
    for a, b in zip(ours["samples"]["kvtool_tiny_mc"], hf["samples"]["kvtool_tiny_mc"], strict=True):
        assert a["doc_id"] == b["doc_id"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            assert ll_a == pytest.approx(ll_b, abs=1e-4) and greedy_a == greedy_b
    gen_a = [s["filtered_resps"] for s in ours["samples"]["kvtool_tiny_gen"]]
    gen_b = [s["filtered_resps"] for s in hf["samples"]["kvtool_tiny_gen"]]
    assert gen_a == gen_b and any(g[0] for g in gen_a)  # something was generated, and the same thing
    coded = _evaluate(manager, "kvtool", f"model={tiny_folder},method=uniform:bits=2", ["kvtool_tiny_mc"])
    ll = [r[0] for s in ours["samples"]["kvtool_tiny_mc"] for r in s["filtered_resps"]]
    ll2 = [r[0] for s in coded["samples"]["kvtool_tiny_mc"] for r in s["filtered_resps"]]
    assert max(abs(a - b) for a, b in zip(ll, ll2, strict=True)) > 1e-4  # the codec is really in the cache


@pytest.mark.model
def test_cli_lm_eval_round_trip(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "lm.json"
    r = cli_run("lm-eval", "--model", tiny_folder, "--method", "none", "--tasks", "kvtool_tiny_mc",
                "--include-path", TASKS, "--json", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["kvtool_report"] == "lmeval" and "acc,none" in report["results"]["kvtool_tiny_mc"]
    gate = cli_run("check", out, "--min", "results.kvtool_tiny_mc.acc,none=0")
    assert gate.exit_code == 0, gate.output


def test_cli_lm_eval_bad_input_is_one_line():
    assert_one_line_error(cli_run("lm-eval", "--tasks", " , "), "at least one lm-eval task")
    assert_one_line_error(cli_run("lm-eval", "--tasks", "x", "--include-path", "/nonexistent"), "no such folder")
