"""`kvtool plan`, plan files and `compress --plan`, on synthetic caches with a planted sensitive layer."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cli import assert_one_line_error, run
from _synth_cache import HEAD_DIM, KV_HEADS, Q_HEADS, gaussian, write_cache

from kvtool.codecs import parse_spec
from kvtool.codecs.base import ROLES
from kvtool.codecs.planfile import PLAN_VERSION, load_plan, save_plan
from kvtool.compress import compress
from kvtool.errors import InputError
from kvtool.plan import make_plan, measure, plan

LAYERS, TOKENS, N_Q, SENSITIVE = 4, 64, 8, 1
CANDIDATES = ["uniform:bits=2", "uniform:bits=3", "uniform:bits=4", "uniform:bits=6"]


def _layers(seed: int, sharp: float):
    rng = np.random.default_rng(seed)

    def layer(i: int):
        k, v = gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM), gaussian(rng, KV_HEADS, TOKENS, HEAD_DIM)
        q = gaussian(rng, Q_HEADS, N_Q, HEAD_DIM)
        if i == SENSITIVE:  # larger logits: sharper attention, so key errors move the output far more
            k, q = k * sharp, q * sharp
        return k, v, q

    return layer


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("plan") / "c.h5", LAYERS, TOKENS, _layers(0, 5.0),
                       num_queries=N_Q)


@pytest.fixture(scope="module")
def measured(cache: Path):
    return {g: measure(cache, CANDIDATES, granularity=g) for g in ("layer", "head")}


def _bits(account) -> list[float]:
    return [r["keys_bits"] + r["values_bits"] for r in account["predicted"]["layers"]]


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_the_sensitive_layer_gets_more_bits(measured, granularity: str) -> None:
    _, account = make_plan(measured[granularity], 4.5)
    bits = _bits(account)
    keys = [r["keys_bits"] for r in account["predicted"]["layers"]]
    others = [b for i, b in enumerate(bits) if i != SENSITIVE]
    assert bits[SENSITIVE] > max(others), bits
    assert keys[SENSITIVE] > max(k for i, k in enumerate(keys) if i != SENSITIVE), keys
    # and the plan's predicted error is below every uniform candidate that fits the same budget
    fitting = [u for u in account["uniform"] if u["stored_bytes"] <= account["budget_bytes"]]
    assert account["predicted"]["objective"] < min(u["objective"] for u in fitting)


def test_plan_equals_brute_force_over_every_combination(measured) -> None:
    m = measured["layer"]
    n_el = 2 * LAYERS * KV_HEADS * TOKENS * HEAD_DIM
    groups = [(i, r) for i in m.layers for r in ROLES]
    cost, err = np.zeros(()), np.zeros(())  # every combination at once: one axis per group
    for i, r in groups:
        c = np.array([m.full[(i, r, n)].cost for n in range(len(CANDIDATES))], float)
        e = np.array([sum(m.full[(i, r, n)].errors) / sum(m.energy[i]) for n in range(len(CANDIDATES))])
        cost, err = cost[..., None] + c, err[..., None] + e
    for budget_bits in (3.4, 4.3, 5.2):  # uniform:bits=2 stores 3 bits per element at head_dim 32
        best = err[cost <= int(budget_bits * n_el / 8)].min()
        _, account = make_plan(m, budget_bits)
        assert account["predicted"]["objective"] == pytest.approx(best, rel=1e-12)
        assert account["dp_exact"]


def _stored(path: Path) -> int:
    with h5py.File(path) as f:
        return sum(g[k].nbytes for i in f["sequences/0/layers"] for name in ROLES
                   for g in [f[f"sequences/0/layers/{i}/{name}"]] for k in g)


def _file_specs(path: Path) -> dict[int, dict[str, str]]:
    with h5py.File(path) as f:
        layers = f["sequences/0/layers"]
        return {int(i): {r: str(layers[i][r].attrs["codec"]) for r in ROLES} for i in layers}


def test_budget_met_as_stored_bytes_and_applying_the_plan_stores_what_it_promised(cache: Path,
                                                                                   tmp_path: Path) -> None:
    plan_path, out = tmp_path / "p.json", tmp_path / "c.h5"
    report = plan(cache, 3.3, CANDIDATES, output=plan_path, granularity="head")  # per-head codecs applied too
    assert report["kvtool_report"] == "plan"
    budget, predicted = report["budget_bytes"], report["predicted"]["stored_bytes"]
    assert budget == int(3.3 * 2 * LAYERS * KV_HEADS * TOKENS * HEAD_DIM / 8)
    assert predicted <= budget and report["verify"]["plan"]["stored_bytes"] == predicted
    assert any(c[r].startswith("heads[") for c in report["plan"]["choices"].values() for r in ROLES)
    r = run("compress", cache, "--plan", plan_path, "-o", out, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "plan at 3.3 bits" in r.stdout
    assert _stored(out) == predicted  # every byte in the file, shared state included
    chosen = load_plan(plan_path).choices
    for i, specs in _file_specs(out).items():
        for role in ROLES:
            assert specs[role] == parse_spec(chosen[i][role]).for_role(role).spec()
    measured = json.loads((tmp_path / "r.json").read_text())
    assert measured["plan"]["budget_bits"] == 3.3
    assert measured["total"]["attention_output_rel_error"] == pytest.approx(
        report["verify"]["plan"]["attention_output_rel_error"])
    assert run("decompress", out, "-o", tmp_path / "back.h5").exit_code == 0


def test_plan_file_round_trip_and_refusals(cache: Path, measured, tmp_path: Path) -> None:
    the_plan, _ = make_plan(measured["head"], 3.0)
    path = save_plan(the_plan, tmp_path / "p.json")
    back = load_plan(path)
    assert back == the_plan and back.assignment() == the_plan.assignment()
    assert json.loads(path.read_text())["kvtool_plan"] == PLAN_VERSION
    with pytest.raises(InputError, match="exists"):
        save_plan(the_plan, path)
    data = the_plan.to_json()
    for change, message in ((lambda d: d.update(kvtool_plan=99), "plan version 99 is not supported"),
                            (lambda d: d["geometry"].update(head_dim=64), "head_dim 64 vs 32"),
                            (lambda d: d["model"].update(model="other"), "made for model 'other'"),
                            (lambda d: d.pop("choices"), "malformed kvtool plan"),
                            (lambda d: d.pop("kvtool_plan"), "not a kvtool plan file")):
        bad = json.loads(json.dumps(data))
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=message):
            compress(cache, plan=tmp_path / "bad.json")
        assert_one_line_error(run("compress", cache, "--plan", tmp_path / "bad.json"), message.split(" vs")[0])
    (tmp_path / "junk.json").write_text("{not json")
    assert_one_line_error(run("compress", cache, "--plan", tmp_path / "junk.json"), "not a kvtool plan file")
    assert_one_line_error(run("compress", cache, "--plan", path, "--method", "fp16"), "not both")


def test_plan_cli_prints_and_writes(cache: Path, tmp_path: Path) -> None:
    out, report_path = tmp_path / "p.json", tmp_path / "r.json"
    r = run("plan", cache, "--budget-bits", "4.2", "--candidates", *CANDIDATES, "-o", out, "--json",
            report_path)
    assert r.exit_code == 0, r.output
    assert "best uniform" in r.stdout and "within the budget" in r.stdout and "measured" in r.stdout
    assert f"holds at a {TOKENS // 2}-token prompt" in " ".join(r.stdout.split())
    report = json.loads(report_path.read_text())
    assert report["kvtool_report"] == "plan" and report["plan"] == json.loads(out.read_text())
    assert report["best_uniform"]["spec"] == "uniform:bits=3"
    assert report["plan_at_uniform_bits"]["stored_bytes"] <= report["best_uniform"]["stored_bytes"]
    assert run("plan", cache, "--budget-bits", "4.2", "-c", "uniform:bits=2", "-o", out).exit_code == 2  # exists


def test_plan_cli_bad_input(cache: Path, tmp_path: Path) -> None:
    assert_one_line_error(run("plan", cache, "--budget-bits", "17", "-c", "uniform:bits=4"),
                          "--budget-bits must be in")
    assert_one_line_error(run("plan", cache, "--budget-bits", "2", "-c", "uniform:bits=4"),
                          "below the cheapest candidates (5.000 stored bits per element); allowed: 5.000..16")
    assert_one_line_error(run("plan", cache, "--budget-bits", "3", "-c", ""), "no candidates")
    assert_one_line_error(run("plan", cache, "-c", "nosuch"), "unknown preset or codec 'nosuch'")
    assert_one_line_error(run("plan", cache, "-c", "fp16", "--objective", "ppl"), "objective must be one of")
    assert_one_line_error(run("plan", cache, "-c", "fp16", "--granularity", "channel"),
                          "granularity must be one of")
    noq = write_cache(tmp_path / "noq.h5", 2, TOKENS, lambda i: (np.ones((KV_HEADS, TOKENS, HEAD_DIM)),) * 2
                      + (None,))
    assert_one_line_error(run("plan", noq, "-c", "fp16"), "no captured queries")


def test_prescreen_drops_dominated_candidates_only(cache: Path) -> None:
    dominated = "uniform:bits=3,group=8"  # 3 + 32/8 = 7 bits, far worse than uniform:bits=6 at 7 bits
    full = measure(cache, [*CANDIDATES, dominated], granularity="layer")
    screened = measure(cache, [*CANDIDATES, dominated], granularity="layer", prescreen=2)
    assert screened.screened == [0, LAYERS - 1] and screened.dropped == [dominated]
    assert screened.candidates == CANDIDATES and len(screened.full) == LAYERS * 2 * len(CANDIDATES)
    for b in (3.5, 5.0):
        assert make_plan(screened, b)[0].choices == make_plan(full, b)[0].choices
    assert_one_line_error(run("plan", cache, "-c", "minicache"), "codes two layers together")


def test_sensitivity_weights_move_bits_to_the_weighted_layer(measured) -> None:
    m = measured["layer"]
    plain = _bits(make_plan(m, 4.5)[1])
    weights = {i: 50.0 if i == 2 else 1.0 for i in m.layers}
    weighted = _bits(make_plan(m, 4.5, objective="kld", sensitivity=weights)[1])
    assert weighted[2] > plain[2]
    with pytest.raises(InputError, match="sensitivities"):
        make_plan(m, 4.5, objective="kld")


def test_role_sensitivities_move_bits_between_keys_and_values(measured) -> None:
    m = measured["layer"]

    def role_bits(weights: dict) -> tuple[float, float]:
        rows = make_plan(m, 4.5, objective="kld", sensitivity=weights)[1]["predicted"]["layers"]
        return sum(r["keys_bits"] for r in rows), sum(r["values_bits"] for r in rows)

    keys_heavy = role_bits({(i, r): 50.0 if r == "keys" else 1.0 for i in m.layers for r in ("keys", "values")})
    values_heavy = role_bits({(i, r): 50.0 if r == "values" else 1.0 for i in m.layers for r in ("keys", "values")})
    assert keys_heavy[0] > values_heavy[0] and keys_heavy[1] < values_heavy[1]


def test_sliding_window_layers_count_only_their_window(tmp_path: Path) -> None:
    from _synth_cache import header

    from kvtool.store import CacheWriter

    rng, window = np.random.default_rng(3), 16
    path = tmp_path / "sliding.h5"
    with CacheWriter(path, header(2)) as w:
        w.add_sequence(np.arange(TOKENS), source="synthetic", text="synthetic")
        for i, n in enumerate((TOKENS, window)):  # layer 1 holds only the last `window` keys
            w.write_layer(0, i, gaussian(rng, KV_HEADS, n, HEAD_DIM), gaussian(rng, KV_HEADS, n, HEAD_DIM),
                          queries=gaussian(rng, Q_HEADS, N_Q, HEAD_DIM),
                          query_positions=np.arange(TOKENS - N_Q, TOKENS), layer_type="sliding" if i else "full",
                          sliding_window=window if i else 0, key_start=TOKENS - n)
    report = plan(path, 5.0, CANDIDATES)
    elements = 2 * KV_HEADS * HEAD_DIM * (TOKENS + window)
    assert report["elements"] == elements and report["budget_bytes"] == int(5.0 * elements / 8)
    assert report["verify"]["plan"]["stored_bytes"] == report["predicted"]["stored_bytes"] <= report["budget_bytes"]
    assert report["verify"]["plan"]["stored_bits"] == pytest.approx(report["predicted"]["stored_bits"])


def test_the_default_plans_per_layer(cache: Path) -> None:
    """Per layer is the default (measured better in the model than per head: docs/PLAN.md): no per-head codec."""
    report = plan(cache, 3.3, CANDIDATES)
    assert report["plan"]["granularity"] == "layer"
    assert not any(c[r].startswith("heads[") for c in report["plan"]["choices"].values() for r in ROLES)


def test_the_budget_holds_at_the_shorter_prompt(cache: Path) -> None:
    # fp16 sinks: 8 of 64 rows at full length, 8 of 32 at half; the plan must fit the budget at half
    sinks = ["turboquant:bits=2,sink=8", "turboquant:bits=3,sink=8", "turboquant:bits=4,sink=8"]
    half, full = measure(cache, sinks), measure(cache, sinks, budget_tokens=TOKENS)
    assert half.budget_tokens == TOKENS // 2 and full.budget_tokens == 0
    cost = {s: parse_spec(s).for_role("keys") for s in sinks}
    x = np.random.default_rng(0).standard_normal((KV_HEADS, TOKENS, HEAD_DIM)).astype(np.float32)
    for n, s in enumerate(sinks):  # the short cost is what the first half of the rows stores alone
        cost[s].fit(x[:, : TOKENS // 2])
        assert half.short[(0, "keys", n)] == cost[s].encode(x[:, : TOKENS // 2]).nbytes
        assert half.short[(0, "keys", n)] > half.full[(0, "keys", n)].cost / 2  # the sinks weigh more
    budget = 7.0  # above the cheapest candidate's bits at half length (5.9), below the dearest's
    acc_half, acc_full = make_plan(half, budget)[1], make_plan(full, budget)[1]
    assert acc_half["predicted"]["stored_bits_at_budget_tokens"] <= budget
    assert acc_full["predicted"]["stored_bits"] > acc_half["predicted"]["stored_bits"]
    assert acc_half["budget_tokens"] == TOKENS // 2 and acc_full["budget_tokens"] == TOKENS
    with pytest.raises(InputError, match="at least 1"):
        measure(cache, sinks, budget_tokens=0)
    assert_one_line_error(run("plan", cache, "-c", "uniform:bits=4", "--budget-tokens", "0"), "at least 1")


def test_measured_role_weights_are_kld_over_error_and_move_bits_to_keys(measured, monkeypatch) -> None:
    """role_weights divides each role's in-model KLD by its summed squared relative attention-output error;
    keys that cost more KL per unit of error then get more bits than with the roles weighed alike."""
    import kvtool.plan as plan_module

    m = measured["layer"]
    refs = {i: {r: "uniform:bits=2" for r in ROLES} for i in m.layers}
    seen = []

    def fake_evaluate(loaded, tokens, methods, **kw):
        seen.extend(methods)
        return {"methods": [{"kld_mean": 0.05}, {"kld_mean": 0.001}], "text": "t", "context": 32, "chunks": 1,
                "tokens_scored": 15, "seconds": 0.0}

    monkeypatch.setattr(plan_module, "evaluate", fake_evaluate)
    out = plan_module.role_weights(m, None, None, plan_module.EvalText(None), refs)
    assert [a.spec(1, "keys") for a in seen] == ["uniform:bits=2", "none"]  # one role coded per pass
    assert [a.spec(1, "values") for a in seen] == ["none", "uniform:bits=2"]
    n = CANDIDATES.index("uniform:bits=2")
    for r, kld in (("keys", 0.05), ("values", 0.001)):
        e2 = sum(sum(m.full[(i, r, n)].errors) / sum(m.energy[i]) for i in m.layers)
        assert out["weights"][r] == pytest.approx(kld / e2)
    equal, weighed = make_plan(m, 4.5)[1], make_plan(m, 4.5, roles=out["weights"])[1]
    keys_bits = [sum(r["keys_bits"] for r in a["predicted"]["layers"]) for a in (equal, weighed)]
    assert keys_bits[1] > keys_bits[0]


def test_role_weights_fall_back_to_equal_without_model_weights(cache: Path) -> None:
    measured_ = plan(cache, 4.2, CANDIDATES, verify=False)  # the synthetic cache names no model weights
    equal = plan(cache, 4.2, CANDIDATES, verify=False, roles="equal")
    assert "no model weights" in measured_["role_weights"]["warning"] and "role_weights" not in equal
    assert measured_["plan"]["choices"] == equal["plan"]["choices"]
    with pytest.raises(InputError, match="role-weights must be one of"):
        plan(cache, 4.2, CANDIDATES, roles="keys")
    assert_one_line_error(run("plan", cache, "-c", "uniform:bits=4", "--role-weights", "x"), "must be one of")


@pytest.mark.model
def test_role_weights_measured_in_the_bundled_model(smollm, tmp_path: Path) -> None:
    """The default plan loads the capture's model, scores every layer's keys, then values, coded in it, and
    weighs the objective by KLD per unit of error: the predicted objective is then the estimated KLD."""
    from kvtool.capture import TextInput, capture
    from kvtool.plan import role_weights
    from kvtool.store import CacheReader
    from kvtool.sweep import EvalText, load_eval

    text = TextInput("gpl", (Path(__file__).parents[1] / "samples" / "gpl-3.0.txt").read_text()[:3000])
    path = capture(smollm, [text], tmp_path / "c.h5", max_tokens=256, queries="last:16").path
    cands = ["turboquant:bits=2,center=true,sink=4", "turboquant:bits=4,center=true,sink=4"]
    report = plan(path, 3.5, cands, verify=False, model_setup=EvalText(None, max_tokens=256, context=128))
    roles = report["role_weights"]
    assert roles["eval"]["text"] == "the cache's own tokens" and roles["eval"]["chunks"] == 2
    for r in ROLES:
        assert roles["kld"][r] > 0 and roles["weights"][r] == pytest.approx(roles["kld"][r] / roles["e2"][r])
    m, setup = measure(path, cands), EvalText(None, max_tokens=256, context=128)
    tokens = load_eval(m.info, setup)[1]
    with CacheReader(path) as reader:
        assert tokens.tolist() == reader.tokens(0)[:256].tolist()  # the capture's own tokens
    again = role_weights(m, smollm, tokens, setup, {int(i): r for i, r in roles["reference"].items()})
    assert again["weights"] == pytest.approx(roles["weights"])  # the same passes give the same weights
    _, account = make_plan(m, 3.5, roles=roles["weights"])
    assert account["predicted"]["objective"] == pytest.approx(report["predicted"]["objective"])
    assert report["plan"]["choices"] == make_plan(m, 3.5, roles=roles["weights"])[0].to_json()["choices"]
