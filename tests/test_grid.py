"""`kvtool grid`: the experiment file, rows equal to single `kvtool eval` runs, failed cells, interruption and
resume, local processes and Ray giving the same rows. Tiny random GGUF models (they convert in a second)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import assert_one_line_error, run
from _tiny_gguf import write_tiny_gguf

pytest.importorskip("pyarrow", reason="kvtool[grid] (pyarrow) is not installed")

from kvtool.errors import InputError  # noqa: E402
from kvtool.grid import (  # noqa: E402
    InlineExecutor,
    ResultsStore,
    load_experiment,
    parse_experiment,
    read_results,
    run_grid,
)
from kvtool.grid.cells import EVAL_METHOD_FIELDS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXTS = [str(REPO / "samples" / "apache-2.0.txt"), str(REPO / "samples" / "gpl-3.0.txt")]
METHODS = ["turboquant:bits=3", "uniform:bits=4"]
#: Fields that depend on timing or on where the cell ran, not on what it computed.
VOLATILE = {"seconds", "seconds_exact", "worker", "hostname", "model_loaded", "model_load_seconds", "wall_seconds",
            "started_at", "finished_at", "report_json"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("grid-models")
    return [str(write_tiny_gguf(d / f"tiny{s}.gguf", d=64, heads=4, kv_heads=2, seed=s)) for s in (0, 1)]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    # converted GGUF copies of the tiny models: one folder for the module (spawned workers inherit it)
    monkeypatch.setenv("KVTOOL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kvtool-cache"))


def write_experiment(path: Path, models: list[str], methods: list[str] = METHODS, texts: list[str] = TEXTS,
                     contexts: tuple[int, ...] = (32,), max_tokens: int = 96) -> Path:
    lines = ['name = "t"', f"models = {json.dumps(models)}", f"texts = {json.dumps(texts)}",
             f"contexts = {list(contexts)}", f"methods = {json.dumps(methods)}", f"max_tokens = {max_tokens}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def stable(rows: list[dict]) -> dict[str, dict]:
    return {r["cell_id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


# -- the experiment file ------------------------------------------------------------------------------------


def test_cells_are_the_product_of_the_axes(tmp_path):
    exp = parse_experiment({"models": ["a", {"spec": "b", "dtype": "float32"}], "texts": ["x.txt"],
                            "contexts": [64, 128], "modes": ["prefill", "streaming"],
                            "methods": ["none", {"keys": "turboquant:bits=4", "values": "kivi:bits=2"}]},
                           base=tmp_path)
    cells = exp.cells()
    assert len(cells) == 2 * 1 * 2 * 2 * 2
    assert len({c.cell_id for c in cells}) == len(cells)
    assert cells[0].text_path == str(tmp_path / "x.txt") and cells[-1].model.dtype == "float32"
    assert cells[1].method == "K turboquant:bits=4 | V kivi:bits=2"
    # ids depend on what was asked, not on where the file lies
    again = parse_experiment({"models": ["a", {"spec": "b", "dtype": "float32"}], "texts": ["x.txt"],
                              "contexts": [64, 128], "modes": ["prefill", "streaming"],
                              "methods": ["none", {"keys": "turboquant:bits=4", "values": "kivi:bits=2"}]},
                             base=tmp_path / "elsewhere")
    assert [c.cell_id for c in again.cells()] == [c.cell_id for c in cells]


@pytest.mark.parametrize(("body", "message"), [
    ('models = ["default"]\ntexts = ["a.txt"]\nmethods = ["none"]\ncolour = 1', "unknown key 'colour'"),
    ('texts = ["a.txt"]\nmethods = ["none"]', "models must list at least one entry"),
    ('models = ["default"]\nmethods = ["none"]', "give 'texts'"),
    ('models = ["default"]\ntexts = ["a.txt"]', "give 'methods'"),
    ('models = ["default"]\ntexts = ["a.txt"]\nmethods = ["none"]\nmodes = ["batch"]', "prefill, streaming"),
    ('models = ["default"]\ntexts = ["a.txt"]\nmethods = ["none"]\ncontexts = [0]', "whole numbers >= 1"),
    ('models = ["default"]\ntexts = ["a.txt"]\nmethods = ["none", "none"]', "appears twice"),
    ('models = ["default"\n', "not valid TOML"),
    ('models = ["default"]\ntasks = ["passkey"]\nmethods = ["none"]', "task cells need kvtool.tasks"),
])
def test_bad_experiment_is_one_line(tmp_path, body, message):
    path = tmp_path / "e.toml"
    path.write_text(body + "\n")
    assert_one_line_error(run("grid", path), message)
    assert not (tmp_path / "e.results").exists()


# -- rows equal single evals; failed cells -------------------------------------------------------------------


def test_rows_equal_single_eval_runs(models, tmp_path):
    """2 models × 2 texts × 2 methods: every row's numbers are those of `kvtool eval` on that cell alone."""
    exp = load_experiment(write_experiment(tmp_path / "g.toml", models))
    executor = InlineExecutor()
    summary = run_grid(exp, ResultsStore(tmp_path / "g.results"), executor)
    assert summary.ok == 8 and summary.failed == 0
    assert executor.worker.loads == 2  # cells grouped by model: each model loaded once
    assert sum(r["model_loaded"] for r in read_results(tmp_path / "g.results")) == 2
    rows = read_results(tmp_path / "g.results")
    assert len(rows) == 8
    for row in rows:
        out = tmp_path / f"{row['cell_id']}.json"
        e = run("eval", "--model", row["model_path"], "--text", row["text_path"], "--context", row["context"],
                "--max-tokens", row["max_tokens"], "--method", row["method"], "--json", out)
        assert e.exit_code == 0, e.output
        single = json.loads(out.read_text())["methods"][0]
        for f in EVAL_METHOD_FIELDS:
            if f != "seconds":
                assert row[f] == single[f], (f, row["method"], row["text"])
        assert row["status"] == "ok" and row["error"] is None
        assert row["torch_version"] and row["transformers_version"] and row["kvtool_version"]
        assert json.loads(row["report_json"])["methods"][0]["kld_mean"] == row["kld_mean"]


def test_a_bad_cell_is_recorded_and_the_rest_finish(models, tmp_path):
    texts = [TEXTS[0], str(tmp_path / "missing.txt")]
    exp = load_experiment(write_experiment(tmp_path / "g.toml", models[:1], ["bogus:bits=3", "none"], texts))
    executor = InlineExecutor()
    summary = run_grid(exp, ResultsStore(tmp_path / "r"), executor)
    rows = {(r["text"], r["method"]): r for r in read_results(tmp_path / "r")}
    assert summary.ok == 1 and summary.failed == 3 and len(rows) == 4
    assert rows[(TEXTS[0], "none")]["status"] == "ok" and rows[(TEXTS[0], "none")]["kld_mean"] == 0.0
    bad = rows[(TEXTS[0], "bogus:bits=3")]
    assert bad["status"] == "failed" and bad["error"].startswith("unknown codec 'bogus'") and "\n" not in bad["error"]
    assert bad["kld_mean"] is None
    assert "no such text file" in rows[(texts[1], "none")]["error"]
    assert executor.worker.loads == 1  # one model, loaded once for its cells (bad input fails before loading)


def test_cli_exit_code_and_refusing_to_mix_runs(models, tmp_path):
    exp = write_experiment(tmp_path / "g.toml", models[:1], ["bogus:bits=3", "none"], TEXTS[:1])
    r = run("grid", exp)
    assert r.exit_code == 1 and "unknown codec 'bogus'" in r.stderr
    assert_one_line_error(run("grid", exp), "already holds 2 finished cell(s): pass --resume")
    dry = run("grid", exp, "--dry-run", "--resume", "--json", "-")
    assert dry.exit_code == 0, dry.output
    states = {c["method"]: c["state"] for c in json.loads(dry.stdout)["cells"]}
    assert states == {"bogus:bits=3": "finished failed", "none": "finished ok"}
    assert run("grid", exp, "--resume").exit_code == 0  # nothing left to run
    again = run("grid", exp, "--resume", "--retry-failed", "--json", "-")
    assert again.exit_code == 1 and json.loads(again.stdout)["failed"] == 1  # the bad cell ran again
    assert_one_line_error(run("grid", exp, "--retry-failed"), "--retry-failed goes with --resume")


# -- interruption, resume, local processes ------------------------------------------------------------------


def _parts(d: Path) -> list[Path]:
    return sorted(d.glob("cell-*.parquet")) if d.is_dir() else []


KILLED_METHODS = ["none", "turboquant:bits=3", "uniform:bits=4"]


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> dict[str, dict]:
    """The table of the interrupted runs' grid, run in one go."""
    d = tmp_path_factory.mktemp("reference")
    exp = write_experiment(d / "g.toml", models, KILLED_METHODS, TEXTS[:1])
    run_grid(load_experiment(exp), ResultsStore(d / "ref"), InlineExecutor())
    return stable(read_results(d / "ref"))


@pytest.mark.parametrize(("sig", "code", "workers"), [(signal.SIGINT, 2, 1), (signal.SIGTERM, 143, 2)])
def test_a_killed_run_resumes_to_the_same_table(models, reference, tmp_path, sig, code, workers):
    """Killed in the middle (in this process, or with 2 local worker processes): the finished rows stay,
    nothing partial is left, and --resume completes the table equal to an uninterrupted run's."""
    exp = write_experiment(tmp_path / "g.toml", models, KILLED_METHODS, TEXTS[:1])
    results = tmp_path / "g.results"
    proc = subprocess.Popen([sys.executable, "-m", "kvtool", "grid", str(exp), "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 120
    while len(_parts(results)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    kept = _parts(results)
    assert 2 <= len(kept) < len(reference), "the run was not interrupted in the middle"
    assert proc.returncode == code, err
    assert "interrupted" in err and str(results) in err
    assert not [p for p in results.iterdir() if p.name.startswith(".")]  # no temporary file left
    before = stable(read_results(results))
    assert {r["worker"] for r in read_results(results)} <= {f"local:{i}" for i in range(workers)}
    r = run("grid", exp, "--resume", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == len(kept)
    after = stable(read_results(results))
    assert {k: after[k] for k in before} == before  # finished rows are kept as they were
    assert after == reference


def test_ray_equals_local(models, tmp_path):
    """`--ray local --workers 2`: a local Ray instance (ray.init(num_cpus=2)), two actors; rows equal the
    in-process executor's, and the instance kvtool started is stopped at the end."""
    ray = pytest.importorskip("ray", reason="kvtool[ray] is not installed")

    exp = write_experiment(tmp_path / "g.toml", models, METHODS, TEXTS[:1])
    run_grid(load_experiment(exp), ResultsStore(tmp_path / "local"), InlineExecutor())
    r = run("grid", exp, "--ray", "local", "--workers", 2, "-o", tmp_path / "ray")
    assert r.exit_code == 0, r.output
    assert not ray.is_initialized()
    rows = read_results(tmp_path / "ray")
    assert stable(rows) == stable(read_results(tmp_path / "local"))
    assert {r["worker"] for r in rows} <= {"ray:0", "ray:1"} and len(rows) == 4


def test_ray_memory_and_errors():
    from kvtool.grid.executors import parse_memory

    assert parse_memory("4GiB") == 4 * 2**30 and parse_memory("512MB") == 512 * 10**6
    with pytest.raises(InputError, match="--ray-memory"):
        parse_memory("lots")
    assert_one_line_error(run("grid", "x.toml", "--ray-gpus", "1"), "go with --ray")
