"""Retrieval tasks (kvtool.tasks): deterministic prompts, needles at their depth in tokens, scoring, and the
codec in the cache on the bundled model (none = exact; a selector evicting the needle loses it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from _cli import assert_one_line_error
from _cli import run as cli_run

from kvtool.errors import InputError
from kvtool.tasks import TASKS, build_prompts, parse_depths, parse_lengths, parse_task
from kvtool.tasks.core import SNAP, Haystack
from kvtool.tasks.scoring import is_match, normalize, summarize, wilson

GPL = Path(__file__).resolve().parents[1] / "samples" / "gpl-3.0.txt"


class WordTokenizer:
    """A stand-in tokenizer for unit tests: one token per whitespace-led piece, ids assigned on first sight."""

    chat_template = None
    bos_token_id = None

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.pieces: list[str] = []

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.vocab[piece]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [self._id(p) for p in re.findall(r"\s*\S+|\s+$", text)]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[int(i)] for i in ids)

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


@pytest.fixture(scope="module")
def word_haystack():
    tok = WordTokenizer()
    return tok, Haystack.from_text(tok, GPL.read_text(), "gpl-3.0.txt")


# -- generation (no model) ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_prompts_and_answers(word_haystack, name):
    tok, hay = word_haystack
    task = parse_task(name)
    a = build_prompts(tok, task, hay, [300, 600], [0.0, 0.5, 1.0], 2, seed=7, template="plain")
    b = build_prompts(tok, task, hay, [300, 600], [0.0, 0.5, 1.0], 2, seed=7, template="plain")
    c = build_prompts(tok, task, hay, [300, 600], [0.0, 0.5, 1.0], 2, seed=8, template="plain")
    assert [p.answer for p in a] == [p.answer for p in b]
    assert all(np.array_equal(p.ids, q.ids) for p, q in zip(a, b, strict=True))
    assert [p.answer for p in a] != [p.answer for p in c]
    # a cell's prompts do not depend on the rest of the grid
    alone = build_prompts(tok, task, hay, [600], [0.5], 2, seed=7, template="plain")
    same = [p for p in a if p.length == 600 and p.depth == 0.5]
    assert all(np.array_equal(p.ids, q.ids) for p, q in zip(alone, same, strict=True))
    # every prompt has exactly its length; samples of one cell differ
    assert all(len(p.ids) == p.length for p in a)
    assert not np.array_equal(a[0].ids, a[1].ids)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_sits_at_its_depth_in_tokens(word_haystack, name, depth):
    tok, hay = word_haystack
    for p in build_prompts(tok, parse_task(name), hay, [500, 1500], [depth], 2, seed=3, template="plain"):
        first, end = p.haystack_span
        needle_tokens = p.needle_lengths
        filler = (end - first) - sum(needle_tokens)
        before = sum(n for pos, n in zip(p.needle_positions, needle_tokens, strict=True)
                     if pos < p.needle_position)
        offset = p.needle_position - first - before  # filler tokens before the asked needle
        assert abs(offset - depth * filler) <= SNAP + 0.5, (offset, depth * filler)
        assert p.needle_depth == pytest.approx(offset / filler)
        asked = tok.decode(p.ids[p.needle_position:p.needle_position + needle_tokens[0]])
        assert p.answer in asked  # the asked needle (the value's assignment for vartrack) holds the answer


def test_grid_and_spec_errors_name_the_allowed_values(word_haystack):
    tok, hay = word_haystack
    assert parse_lengths("1k, 2k,4096") == [1024, 2048, 4096]
    assert parse_depths("0,0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(InputError, match="not a token count"):
        parse_lengths("1m")
    with pytest.raises(InputError, match="outside 0..1"):
        parse_depths("1.5")
    with pytest.raises(InputError, match="unknown task 'needle'; tasks: passkey, fact, multikey, vartrack"):
        parse_task("needle")
    with pytest.raises(InputError, match="keys must be one of 2..32"):
        parse_task("multikey:keys=1")
    with pytest.raises(InputError, match="unknown parameter"):
        parse_task("passkey:color=3")
    with pytest.raises(InputError, match="length 40 leaves"):
        build_prompts(tok, parse_task("passkey"), hay, [40], [0.5], 1, template="plain")


def test_distractors_are_drawn_from_the_text(word_haystack):
    tok, hay = word_haystack
    p = build_prompts(tok, parse_task("multikey:keys=4"), hay, [800], [0.5], 1, seed=1, template="plain")[0]
    text = tok.decode(p.ids)
    keys = re.findall(r"special magic numbers for (\w+) is: (\d+)", text)
    assert len(keys) == 4 and len({k for k, _ in keys}) == 4
    assert all(k in hay.words for k, _ in keys)
    asked = re.search(r"magic number for (\w+) mentioned", text).group(1)
    assert dict(keys)[asked] == p.answer


# -- scoring --------------------------------------------------------------------------------------------


def test_scoring_normalises_and_matches_the_first_words():
    assert normalize("  The Pass-Key: 48213! ") == "the pass key 48213"
    assert is_match(" 48213.", "48213") and is_match("48213, as stated", "48213")
    assert not is_match("482139", "48213") and not is_match("the key is 48213", "48213")
    assert not is_match("", "48213")
    # Wilson 1927: 0 of 10 -> [0, 0.2775]; 5 of 10 -> [0.2366, 0.7634] (z = 1.96)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    items = [{"length": 1, "depth": d, "answer": "7"} for d in (0.0, 0.0, 1.0)]
    s = summarize(items, ["7", "8", "7."], ["7", "8", "9"], [1], [0.0, 1.0])
    assert s["correct"] == 2 and s["accuracy"] == pytest.approx(2 / 3) and s["agreement"] == pytest.approx(2 / 3)
    assert [c["correct"] for c in s["cells"]] == [1, 1]


# -- the bundled model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def passkey_prompts(smollm):
    from kvtool.tasks.run import load_haystack

    hay = load_haystack(smollm.tokenizer, GPL)
    # seed 0, depth 0: a prompt the model answers with the exact cache (checked below)
    return hay, build_prompts(smollm.tokenizer, parse_task("passkey"), hay, [384], [0.0], 1, seed=0)


@pytest.mark.model
def test_real_tokenizer_needle_at_depth(passkey_prompts, smollm):
    _, prompts = passkey_prompts
    p = prompts[0]
    assert len(p.ids) == 384 and p.needle_position == p.haystack_span[0] and p.needle_depth == 0.0
    assert smollm.tokenizer.decode(p.ids[p.needle_position:p.needle_position + 8]).strip().startswith("The pass key")
    hay = passkey_prompts[0]
    for q in build_prompts(smollm.tokenizer, parse_task("multikey"), hay, [384, 2048], [0.25, 0.5, 0.75], 1):
        first, end = q.haystack_span
        filler = end - first - sum(q.needle_lengths)
        before = sum(n for pos, n in zip(q.needle_positions, q.needle_lengths, strict=True) if pos < q.needle_position)
        assert len(q.ids) == q.length
        assert abs(q.needle_position - first - before - q.depth * filler) <= SNAP + 0.5
        assert q.answer in smollm.tokenizer.decode(q.ids[q.needle_position:q.needle_position + q.needle_lengths[0]])


@pytest.mark.model
def test_none_equals_exact_and_evicting_the_needle_fails(smollm, passkey_prompts, test_selectors):
    from kvtool.tasks.run import run_tasks

    hay, prompts = passkey_prompts
    p = prompts[0]
    needle = len(smollm.tokenizer(" The pass key is 00000. Remember it. 00000 is the pass key.",
                                  add_special_tokens=False)["input_ids"])
    drop_needle = f"droprange:start={p.needle_position},stop={p.needle_position + needle}"
    later = p.needle_position + needle + 40
    drop_elsewhere = f"droprange:start={later},stop={later + needle}"
    r = run_tasks(smollm, "passkey", hay, ["none", drop_needle, drop_elsewhere], lengths=[384], depths=[0.0],
                  samples=1, seed=0)
    assert r["kvtool_report"] == "task" and r["items"][0]["needle_position"] == p.needle_position
    assert r["exact"]["accuracy"] == 1.0, r["items"]  # the model finds this needle with the exact cache
    none, gone, elsewhere = r["methods"]
    assert none["agreement"] == 1.0 and r["items"][0]["methods"][0] == r["items"][0]["exact"]
    assert gone["accuracy"] == 0.0, r["items"]  # the needle's tokens evicted: the pass key is lost
    assert elsewhere["accuracy"] == 1.0, r["items"]  # as many tokens evicted elsewhere: still found


@pytest.mark.model
def test_cli_task_report_plot_and_gate(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "heat.png"
    res = cli_run("eval", "--task", "passkey", "--text", GPL, "--lengths", "256", "--depths", "1",
                  "--method", "none", "--json", out, "--plot", png)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["kvtool_report"] == "task" and r["prompts"] == 1 and r["methods"][0]["agreement"] == 1.0
    assert png.stat().st_size > 1000 and "acc %" in res.stdout
    ok = cli_run("check", out, "--min", "methods.*.agreement=1")
    assert ok.exit_code == 0, ok.output
    bad = cli_run("check", out, "--min", "exact.accuracy=1.01")
    assert bad.exit_code == 1


@pytest.mark.model
def test_cli_length_over_the_context_is_refused_in_one_line():
    assert_one_line_error(cli_run("eval", "--task", "passkey", "--text", GPL, "--lengths", "8k", "--method", "none"),
                          "length 8192 + ")


def test_cli_bad_task_options_fail_before_the_model_loads():
    assert_one_line_error(cli_run("eval", "--task", "nope", "--text", GPL), "unknown task 'nope'")
    assert_one_line_error(cli_run("eval", "--task", "passkey", "--text", GPL, "--lengths", "abc"),
                          "not a token count")
    assert_one_line_error(cli_run("eval", "--task", "passkey", "--text", GPL, "--mode", "streaming"),
                          "prefill mode")
    assert_one_line_error(cli_run("eval", "--task", "passkey"), "--task needs --text")
    assert_one_line_error(cli_run("eval", "--method", "none"), "give --text")
    assert_one_line_error(cli_run("eval", "--text", GPL, "--plot", "x.png"), "use it with --task")


def _synthetic_report(exact_hits: list[bool], method_hits: list[bool]) -> dict:
    from kvtool.report import header

    items = [{"length": n, "depth": d, "answer": "1"} for n in (1024, 2048) for d in (0.0, 1.0)]
    exact = [("1" if h else "2") for h in exact_hits]
    replies = [("1" if h else "3") for h in method_hits]
    method = {"label": "m", **summarize(items, replies, exact, [1024, 2048], [0.0, 1.0])}
    report = header("task", model="x")
    report.update({"task": "passkey", "seed": 0, "samples": 1, "lengths": [1024, 2048], "depths": [0.0, 1.0],
                   "exact": {"label": "exact", **summarize(items, exact, None, [1024, 2048], [0.0, 1.0])},
                   "methods": [method], **{k: v for k, v in method.items() if k.startswith(("accuracy", "agree"))}})
    return report


def test_heatmap_and_default_baseline_checks(tmp_path):
    from kvtool.check import gate
    from kvtool.tasks.plot import heatmap

    good = _synthetic_report([True] * 4, [True] * 4)
    worse = _synthetic_report([True] * 4, [True, False, False, False])
    assert heatmap(good, tmp_path / "h.png").stat().st_size > 1000
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    assert gate(tmp_path / "good.json", baseline_path=tmp_path / "good.json", tolerance="10%").passed
    result = gate(tmp_path / "worse.json", baseline_path=tmp_path / "good.json", tolerance="10%")
    assert not result.passed and any("accuracy" in c.name for c in result.failed)
    assert not any("exact.accuracy" in c.name for c in result.failed)  # exact did not change
    with pytest.raises(InputError, match="cannot write"):
        heatmap(good, tmp_path / "h.xyz")
