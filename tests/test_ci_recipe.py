"""The CI recipe runs as written, and kvtool's own gate (Makefile `gate`, run by `make test`) catches codec
regressions: its bounds are read from the Makefile and applied to reports of degraded codecs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _cli import run

ROOT = Path(__file__).parents[1]
SAMPLE = ROOT / "samples" / "smollm2-apache-256.h5"


# ----------------------------------------------------------------------------------- the Makefile gate


def gate_commands() -> list[list[str]]:
    """The `gate` target's commands, continuation lines joined, split like a shell would."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index("gate: install") + 1
    commands, current = [], ""
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        current += line.strip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            commands.append(shlex.split(current.split(">", 1)[0]))
            current = ""
    return commands


def gate_checks() -> list[tuple[str, list[str]]]:
    """(codec spec compressed, the check's threshold options) for each compress → check pair of the gate."""
    pairs, method = [], None
    for cmd in gate_commands():
        if cmd[1:2] == ["compress"]:
            method = cmd[cmd.index("--method") + 1]
        elif cmd[1:2] == ["check"]:
            opts = [a for i, a in enumerate(cmd[3:]) if a.startswith("--m") or cmd[3:][i - 1].startswith("--m")]
            pairs.append((method, opts))
    return pairs


@pytest.fixture(scope="module")
def report_of(tmp_path_factory: pytest.TempPathFactory):
    from kvtool.codecs import parse_pair
    from kvtool.compress import compress

    folder = tmp_path_factory.mktemp("gate")

    def make(method: str) -> Path:
        path = folder / (method.replace(":", "_").replace(",", "_") + ".json")
        if not path.exists():
            keys, values = parse_pair(method, None, None)
            path.write_text(json.dumps(compress(SAMPLE, keys, values)))
        return path

    return make


BEST = "turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true"  # the README's recommended 3-bit form


def test_the_gate_compresses_the_sample_with_three_codecs() -> None:
    pairs = gate_checks()
    assert [m for m, _ in pairs] == ["turboquant:bits=3", BEST, "kivi:bits=2"]
    assert all(any(o.startswith("total.bits_per_element=") for o in opts) for _, opts in pairs)


@pytest.mark.parametrize("method, regressed, failing", [
    ("turboquant:bits=3", "turboquant:bits=2", "total.attention_output_rel_error"),  # a bit lost
    ("turboquant:bits=3", "turboquant:bits=4", "total.bits_per_element"),            # more stored
    ("kivi:bits=2", "kivi:bits=2,group=64", "total.attention_output_rel_error"),     # coarser groups
    (BEST, BEST.replace(",unbiased=true", ""), "total.attention_output_rel_error"),   # the norm correction lost
    (BEST, BEST.replace("center=true", "center=false"), "total.attention_output_rel_error"),  # no centring
])
def test_the_gate_passes_the_codecs_and_fails_regressions(report_of, method: str, regressed: str,
                                                          failing: str) -> None:
    opts = dict(gate_checks())[method]
    ok = run("check", report_of(method), *opts)
    assert ok.exit_code == 0, ok.output
    bad = run("check", report_of(regressed), *opts)
    assert bad.exit_code == 1 and failing in bad.stderr, bad.output


# ------------------------------------------------------------------------------------ example workflows


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / "ci" / name).read_text())


def github_kvtool_lines() -> list[str]:
    steps = load("github-actions.yml")["jobs"]["kv-gate"]["steps"]
    lines = []
    for step in steps:
        text = step.get("run", "").replace("\\\n", " ")
        lines += [x.strip() for x in text.splitlines() if x.strip().startswith(("kvtool ", "mkdir "))]
    return lines


def gitlab_kvtool_lines() -> list[str]:
    script = load("gitlab-ci.yml")["kv-quality-gate"]["script"]
    return [x.strip() for x in script if x.strip().startswith(("kvtool ", "mkdir "))]


def normalise(line: str) -> list[str]:
    words = shlex.split(line)
    # the summary goes to GitHub's step summary there, to a file here
    return [w for i, w in enumerate(words) if w != "--summary" and (i == 0 or words[i - 1] != "--summary")]


def test_workflows_cache_the_model_upload_artifacts_and_agree() -> None:
    gh = load("github-actions.yml")
    job = gh["jobs"]["kv-gate"]
    assert job["env"]["KVTOOL_CACHE_DIR"]
    uses = {s.get("uses", "").split("@")[0]: s for s in job["steps"]}
    assert uses["actions/cache"]["with"]["path"] == "${{ env.KVTOOL_CACHE_DIR }}"
    upload = uses["actions/upload-artifact"]
    assert upload["if"] == "always()" and "*.xml" in upload["with"]["path"]
    gl = load("gitlab-ci.yml")["kv-quality-gate"]
    assert ".kvtool-cache/" in gl["cache"]["paths"] and gl["variables"]["KVTOOL_CACHE_DIR"].endswith(".kvtool-cache")
    assert gl["artifacts"]["when"] == "always"
    assert gl["artifacts"]["reports"]["junit"] == ["kvtool-out/junit.xml", "kvtool-out/eval-junit.xml"]
    assert [normalise(x) for x in github_kvtool_lines()] == [normalise(x) for x in gitlab_kvtool_lines()]
    assert [normalise(x)[1] for x in github_kvtool_lines() if x.startswith("kvtool")] == [
        "capture", "compress", "eval", "check", "check"]


@pytest.mark.model
def test_the_github_workflow_runs(tmp_path: Path) -> None:
    """Its kvtool steps, in a shell, on the bundled model: capture → compress → eval → check both reports, then
    a degraded codec through the compress gate fails it."""
    lines = github_kvtool_lines()
    shim = f'kvtool() {{ "{sys.executable}" -m kvtool "$@"; }}\nset -e\n'
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", "-c", shim + "\n".join(lines)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"cache.h5", "compress.json", "junit.xml", "check.json", "eval.json",
                                                "eval-junit.xml", "eval-check.json"}
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("✅ passed") == 2 and "eval report" in summary
    degraded = [x.replace("turboquant:bits=3", "turboquant:bits=2") for x in lines
                if "capture" not in x and "eval" not in x]
    done = subprocess.run(["bash", "-c", shim.replace("set -e\n", "") + "\n".join(degraded)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed" in done.stderr and "❌ failed" in (tmp_path / "summary.md").read_text()
