"""Age-aware precision: bands of token age, each with its own codec; syntax on the command line and in
JSON plan specs; the recent band and the sinks bit-exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from _cli import assert_one_line_error, run
from _synth_cache import HEAD_DIM, KV_HEADS, Q_HEADS, gaussian, write_cache

from kvtool.codecs import LayerContext, parse_spec
from kvtool.codecs.assignment import Assignment
from kvtool.errors import CodecError

SPEC = "age:bands=[0-128:fp16;128-1152:turboquant:bits=4;1152-:turboquant:bits=2],sink=4"


def fp16_tensor(tokens: int = 1500, seed: int = 0) -> np.ndarray:
    """Values a float16 cache can hold exactly, as float32 ``(3, tokens, 64)``."""
    x = np.random.default_rng(seed).standard_normal((3, tokens, 64)) * 4
    return x.astype(np.float16).astype(np.float32)


def test_recent_band_and_sinks_are_bit_exact_and_older_bands_cheaper() -> None:
    x = fp16_tensor()
    codec = parse_spec(SPEC).fit(x)
    enc = codec.encode(x)
    y = parse_spec(codec.spec()).decode(enc)
    np.testing.assert_array_equal(y[:, -128:], x[:, -128:])
    np.testing.assert_array_equal(y[:, :4], x[:, :4])
    err = lambda a, b: float(np.square(y[:, a:b] - x[:, a:b]).sum() / np.square(x[:, a:b]).sum())  # noqa: E731
    assert 0 < err(1500 - 1152, 1500 - 128) < err(4, 1500 - 1152)  # 4 bits beat 2 bits
    bands = codec.report(enc)["bands"]
    assert [b["ages"] for b in bands] == ["0-128", "128-1152", "1152-"]
    assert [b["tokens"] for b in bands] == [128, 1024, 1500 - 1152 - 4]
    assert [round(b["bits_per_element"], 2) for b in bands] == [16.0, 4.25, 2.25]
    expected = (4 * 16 * 64 + 128 * 16 * 64 + 1024 * (4 * 64 + 16) + 344 * (2 * 64 + 16)) * 3
    assert enc.nbytes * 8 == expected


def test_short_cache_fills_the_youngest_bands_first() -> None:
    x = fp16_tensor(100)
    codec = parse_spec(SPEC).fit(x)
    enc = codec.encode(x)
    assert set(enc.arrays) == {"sink", "band0.data"}  # 4 sinks and 96 tokens, all younger than 128
    np.testing.assert_array_equal(codec.decode(enc), x)


def test_spec_round_trips_on_the_command_line_and_in_a_json_plan() -> None:
    codec = parse_spec(" age : bands = [ 0-128 : fp16 ; 1152- : turboquant:bits=2 ; 128-1152 : "
                       "turboquant:bits=4,center=true ] , sink=4 ")
    canonical = codec.spec()
    assert canonical.startswith("age:bands=[0-128:fp16;128-1152:turboquant:bits=4,seed=0,")
    assert parse_spec(canonical) == codec and parse_spec(canonical).spec() == canonical
    # a plan file holds spec strings per layer and role: through JSON and an Assignment unchanged
    plan = json.loads(json.dumps({"keys": canonical, "values": "fp16", "layers": {"3": {"values": SPEC}}}))
    a = Assignment(plan["keys"], plan["values"], {int(k): v for k, v in plan["layers"].items()})
    assert a.codec(0, "keys") == codec
    assert a.codec(3, "values").spec() == parse_spec(SPEC).spec()


def test_a_band_may_evict_and_may_chain() -> None:
    x = fp16_tensor(600, 1)
    q = np.random.default_rng(2).standard_normal((6, 16, 64)).astype(np.float32)
    ctx = LayerContext(layer=0, role="keys", queries=q, query_positions=np.arange(584, 600),
                       key_positions=np.arange(600), keys=x)
    codec = parse_spec("age:bands=[0-100:fp16;100-:knorm:keep=0.5+uniform:bits=4]").fit(x, ctx)
    enc = codec.encode(x)
    mask = codec.token_mask(enc)
    assert mask[:, -100:].all() and mask[:, :-100].sum(axis=1).tolist() == [250] * 3
    np.testing.assert_array_equal(codec.decode(enc)[:, -100:], x[:, -100:])


@pytest.mark.parametrize("bands,message", [
    ("[0-128:fp16;100-:uniform:bits=4]", "age bands 0-128 and 100- overlap"),
    ("[0-128:fp16;200-:uniform:bits=4]", "leave ages 128..199 without a codec"),
    ("[0-128:fp16;128-512:uniform:bits=4]", "the last age band must be open-ended"),
    ("[64-:fp16]", "must start at age 0"),
    ("[0-x:fp16;x-:fp16]", "expected FROM-TO:SPEC or FROM-:SPEC"),
    ("[0-0:fp16;0-:fp16]", "the end must be above the start"),
    ("[0-128:fp16;128-:uniform:bits=9]", "age band 128-: bits must be one of 1..8, got 9"),
    ("[]", "age needs bands"),
    ("[0-128:fp16;128-:uniform:bits=4", "unbalanced '['"),
])
def test_bad_bands(bands: str, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        parse_spec(f"age:bands={bands}")


def test_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "c.h5", 2, 300,
                        lambda i: (gaussian(rng, KV_HEADS, 300, HEAD_DIM), gaussian(rng, KV_HEADS, 300, HEAD_DIM),
                                   gaussian(rng, Q_HEADS, 8, HEAD_DIM)), num_queries=8)
    out = tmp_path / "out.h5"
    result = run("compress", cache, "--method", "age:bands=[0-64:fp16;64-:turboquant:bits=3],sink=1", "-o", out,
                 "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layers"][0]["keys"]["resolved"]["bands"][0]["tokens"] == 64
    bad = tmp_path / "bad.h5"
    assert_one_line_error(run("compress", cache, "--method", "age:bands=[0-64:fp16;32-:fp16]", "-o", bad),
                          "age bands 0-64 and 32- overlap")
    assert not bad.exists()


def test_age_spec_in_a_plan_file(tmp_path: Path) -> None:
    """A plan file holds one spec string per layer and role; an age spec goes through JSON, load_plan and
    compress --plan unchanged."""
    from kvtool.codecs.planfile import Plan, load_plan, save_plan
    from kvtool.store import read_info

    rng = np.random.default_rng(1)
    cache = write_cache(tmp_path / "c.h5", 2, 300,
                        lambda i: (gaussian(rng, KV_HEADS, 300, HEAD_DIM), gaussian(rng, KV_HEADS, 300, HEAD_DIM),
                                   gaussian(rng, Q_HEADS, 8, HEAD_DIM)), num_queries=8)
    info = read_info(cache)
    spec = "age:bands=[0-64:fp16;64-:snapkv:keep=0.5,window=4+turboquant:bits=3,center=true],sink=2"
    plan = Plan({"model": info.model, "model_source": info.model_source,
                 "model_architecture": info.model_architecture},
                {"num_layers": 2, "num_q_heads": Q_HEADS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
                [spec, "fp16"], {0: {"keys": spec, "values": spec}, 1: {"keys": "fp16", "values": "fp16"}})
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path).choices[0]["keys"] == spec
    result = run("compress", cache, "--plan", path, "--json", "-")
    assert result.exit_code == 0, result.output
    layer0 = json.loads(result.stdout)["layers"][0]
    assert layer0["keys"]["spec"] == parse_spec(spec).for_role("keys").spec()
    assert layer0["kept_fraction"] == pytest.approx((2 + 64 + 117) / 300)  # sinks, fp16 band, half the rest


def test_sink_is_the_first_positions_not_the_first_held_rows() -> None:
    """A sliding-window layer holds its newest tokens: rows past position ``sink`` are no sinks, so they
    are coded by their age band; a layer whose rows start at position 2 holds the 2 remaining sinks."""
    x = fp16_tensor(600)
    later = LayerContext(key_positions=np.arange(600) + 1000)
    codec = parse_spec("age:bands=[0-16:fp16;16-:turboquant:bits=2],sink=4").fit(x, later)
    enc = codec.encode(x)
    assert "sink" not in enc.arrays
    assert [b["tokens"] for b in codec.report(enc)["bands"]] == [16, 584]
    assert np.abs(codec.decode(enc)[:, :4] - x[:, :4]).max() > 0  # the first rows are coded at 2 bits
    near = LayerContext(key_positions=np.arange(600) + 2)
    codec = parse_spec("age:bands=[0-16:fp16;16-:turboquant:bits=2],sink=4").fit(x, near)
    enc = codec.encode(x)
    assert enc.arrays["sink"].shape[1] == 2
    np.testing.assert_array_equal(parse_spec(codec.spec()).decode(enc)[:, :2], x[:, :2])
    assert [b["tokens"] for b in codec.report(enc)["bands"]] == [16, 582]
