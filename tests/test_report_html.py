"""`kvtool report`: the static HTML page, opened in a real headless Chromium (Debian's `chromium` package)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _browser import chromium, render
from _cli import assert_one_line_error, run
from _tiny_gguf import write_tiny_gguf

pytest.importorskip("pyarrow", reason="kvtool[grid] (pyarrow) is not installed")
pytest.importorskip("plotly", reason="kvtool[grid] (plotly) is not installed")

from kvtool.grid import InlineExecutor, ResultsStore, load_experiment, run_grid  # noqa: E402
from kvtool.grid.html import load_inputs, pareto, rows_from_eval, task_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_chromium = pytest.mark.skipif(chromium() is None, reason="chromium is not installed "
                                    "(apt-get install -y chromium)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """A results folder (one tiny model, 3 methods, one of them bad) and a compress report of 4 layers."""
    d = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVTOOL_CACHE_DIR", str(d / "cache"))
        return _make_inputs(d)


def _make_inputs(d: Path) -> list[Path]:
    model = write_tiny_gguf(d / "tiny.gguf", d=64, heads=4, kv_heads=2)
    exp = d / "r.toml"
    exp.write_text(f'models = ["{model}"]\ntexts = ["{REPO / "samples" / "apache-2.0.txt"}"]\ncontexts = [32]\n'
                   'max_tokens = 64\nmethods = ["turboquant:bits=3", "turboquant:bits=4", "bogus:bits=1"]\n')
    run_grid(load_experiment(exp), ResultsStore(d / "r.results"), InlineExecutor())
    compress = d / "compress.json"
    r = run("compress", REPO / "samples" / "smollm2-apache-256.h5", "--method", "turboquant:bits=3", "--layers",
            "0-3", "--json", compress)
    assert r.exit_code == 0, r.output
    return [d / "r.results", compress]


def test_pareto_front():
    assert pareto([(3, 0.1), (2, 0.3), (4, 0.2), (2.5, 0.05)]) == [(2, 0.3), (2.5, 0.05)]


def test_inputs_of_every_kind(inputs, tmp_path):
    eval_report = {"kvtool_report": "eval", "model": "m", "text": "t.txt", "context": 64, "mode": "prefill",
                   "methods": [{"label": "a", "kld_mean": 0.1, "bits_per_element": 3.0}]}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(eval_report))
    got = load_inputs([*inputs, path])
    assert len(got.rows) == 3 + 1 and len(got.compress) == 1
    assert rows_from_eval(eval_report, "eval.json")[0]["kld_mean"] == 0.1
    other = tmp_path / "budget.json"
    other.write_text(json.dumps({"kvtool_report": "budget"}))
    assert_one_line_error(run("report", other, "-o", tmp_path / "x.html"), "of kind 'budget'")
    assert_one_line_error(run("report", tmp_path / "nope", "-o", tmp_path / "x.html"), "no such file")
    assert not (tmp_path / "x.html").exists()


def _task_report() -> dict:
    """A task report as `kvtool eval --task` writes it (the fields the page reads): accuracy per
    (length, depth), for the exact cache and one method."""
    acc = {1024: (1, 1, 0.5), 2048: (1, 0.5, 0)}
    cells = [{"length": n, "depth": d, "accuracy": acc[n][i]} for n in acc for i, d in enumerate((0, 0.5, 1))]
    return {"kvtool_report": "task", "model": "tiny", "task": "passkey", "exact": {"label": "exact", "cells": cells},
            "methods": [{"label": "streaming", "cells": cells[::-1]}]}


def test_task_records_from_task_rows_and_reports():
    row = {"kind": "task", "status": "ok", "report_json": json.dumps(_task_report())}
    records = task_records([row, row, {"kind": "eval", "status": "ok"}])
    assert len(records) == 12 and [r["method"] for r in records[::6]] == ["exact", "streaming"]
    assert task_records([], [_task_report()]) == records


@needs_chromium
def test_report_renders_in_chromium_without_console_errors(inputs, tmp_path):
    task = tmp_path / "task.json"
    task.write_text(json.dumps(_task_report()))
    page = tmp_path / "report.html"
    r = run("report", *inputs, task, "-o", page, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ok"] == 2 and summary["failed"] == 1 and summary["compress_reports"] == 1
    text = page.read_text()
    assert "<script src=" not in text  # self-contained: plotly.js is inlined
    shown = render(page, tmp_path, screenshot=tmp_path / "shot.png")
    assert shown.errors == [], shown.errors
    # plotly drew every figure: the frontier, the heatmap (2 panels, 1 figure), the per-layer profile
    assert shown.dom.count('class="main-svg"') >= 3 * 2, "plotly did not render the figures"
    assert "turboquant:bits=4" in shown.dom and "unknown codec 'bogus'" in shown.dom
    assert "passkey accuracy" in shown.dom and "attention output rel. error" in shown.dom
    assert (tmp_path / "shot.png").stat().st_size > 20_000


@needs_chromium
def test_the_browser_check_sees_console_errors(tmp_path):
    """The check above can fail: a page with a console error and an uncaught exception is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><script>console.error("drawn wrong");'
                    "</script><script>notDefined()</script></body></html>")
    errors = render(page, tmp_path).errors
    assert any("drawn wrong" in e for e in errors) and any("notDefined" in e for e in errors)
