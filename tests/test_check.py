"""`kvtool check`: thresholds with wildcards, baselines (tolerance and the one-tailed test), JUnit XML, the
Markdown summary and exit codes 0 / 1 / 2, on constructed reports and on a real compress report."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from statistics import NormalDist

import pytest
from _cli import assert_one_line_error, one_line_error, run

from kvtool.check import gate, junit_xml, markdown_summary
from kvtool.report import header

SAMPLE = Path(__file__).parents[1] / "samples" / "smollm2-apache-256.h5"


def compress_like(errors: list[float], *, model_source: str = "sha256:abc", bits: float = 3.25) -> dict:
    layers = [{"layer": i, "attention_output_rel_error": e, "keys": {"rel_mse": e / 10}} for i, e in
              enumerate(errors)]
    total = {"attention_output_rel_error": sum(errors) / len(errors), "bits_per_element": bits,
             "keys": {"rel_mse": sum(errors) / len(errors) / 10}, "values": {"rel_mse": 0.03}}
    return {**header("compress", model="default", model_source=model_source), "layers": layers, "total": total}


def eval_like(dppl: float, dppl_se: float, top1: float, top1_se: float, **extra: object) -> dict:
    # the field names eval reports carry (kvtool.metrics.summarize_next_token): a metric K and its standard
    # error K_stderr beside it; the mean KL divergence kld_mean with kld_stderr
    return {**header("eval", model="default", model_source="sha256:abc"), "delta_ppl_pct": dppl,
            "delta_ppl_pct_stderr": dppl_se, "top1_agreement": top1, "top1_agreement_stderr": top1_se,
            "kld_mean": 0.01, "kld_stderr": 0.001, **extra}


def write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------------ exit codes


def test_pass_fail_and_unknown_key_exit_0_1_2(tmp_path: Path) -> None:
    report = write(tmp_path, "r.json", compress_like([0.2, 0.3, 0.25]))
    ok = run("check", report, "--max", "total.attention_output_rel_error=0.3", "--min", "total.bits_per_element=3")
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.stdout and "all 2 checks passed" in ok.stdout

    bad = run("check", report, "--max", "total.attention_output_rel_error=0.2", "--max", "total.bits_per_element=4")
    line = one_line_error(bad, code=1)
    # names the failure with its value against its threshold
    assert "1 of 2 checks failed" in line and "total.attention_output_rel_error = 0.25 > 0.2" in line
    assert "FAIL" in bad.stdout

    unknown = run("check", report, "--max", "layers.*.attention_output_rel_eror=0.3")
    assert_one_line_error(unknown, "closest: layers.*.attention_output_rel_error")


def test_a_wildcard_fails_when_one_layer_fails(tmp_path: Path) -> None:
    report = write(tmp_path, "r.json", compress_like([0.20, 0.21, 0.42, 0.19]))
    r = run("check", report, "--max", "layers.*.attention_output_rel_error=0.4")
    line = one_line_error(r, code=1)
    assert "1 of 4 fail, worst layer 2 = 0.42 > 0.4" in line
    assert run("check", report, "--max", "layers.*.attention_output_rel_error=0.5").exit_code == 0
    # deeper paths through the wildcard, and one item by index
    assert run("check", report, "--max", "layers.*.keys.rel_mse=0.041").exit_code == 1
    assert run("check", report, "--max", "layers.2.keys.rel_mse=0.043").exit_code == 0


def test_wildcard_over_mapping_values_and_null_values_fail() -> None:
    report = {**header("budget", model="m"), "rows": [{"kv": {"fp16": {"bytes": 10}, "fp8": {"bytes": None}}}]}
    from kvtool.check import Check, _against_bound, resolve

    matches = resolve(report, "rows.*.kv.*.bytes")
    assert [m.path for m in matches] == ["rows.0.kv.fp16.bytes", "rows.0.kv.fp8.bytes"]
    result = _against_bound(Check("max", "rows.*.kv.*.bytes", 100.0), matches)
    assert not result.passed and "is null" in result.message()  # a NaN written as null is a regression


@pytest.mark.parametrize("args, fragment", [
    (["--max", "total.bits_per_element=abc"], "'abc' is not a number"),
    (["--max", "=3"], "no key"),
    (["--min", "total..bits=3"], "empty path segment"),
    (["--max", "total.bits_per_element=inf"], "finite"),
    (["--max", "total.bits_per_element"], "no bound; write KEY=NUMBER"),
    ([], "nothing to check"),
    (["--max", "total=1"], "names a mapping"),
    (["--max", "total.bits_per_element=4", "--tolerance", "5%"], "add --baseline"),
])
def test_malformed_checks_are_bad_input(tmp_path: Path, args: list[str], fragment: str) -> None:
    report = write(tmp_path, "r.json", compress_like([0.2]))
    assert_one_line_error(run("check", report, *args), fragment)


@pytest.mark.parametrize("content, fragment", [
    ({**compress_like([0.2]), "kvtool_report": "nonsense"}, "unknown report kind 'nonsense'"),
    ({"layers": []}, "not a kvtool report"),
    ("{not json", "not JSON"),
    ([1, 2], "not a kvtool report"),
])
def test_reports_that_are_not_kvtool_reports_are_bad_input(tmp_path: Path, content: object, fragment: str) -> None:
    report = write(tmp_path, "r.json", content)
    assert_one_line_error(run("check", report, "--max", "total.bits_per_element=4"), fragment)
    assert_one_line_error(run("check", tmp_path / "missing.json", "--max", "a=1"), "no such report file")


# ------------------------------------------------------------------------------------------- baselines


def test_baseline_of_another_kind_or_model_is_bad_input(tmp_path: Path) -> None:
    report = write(tmp_path, "r.json", compress_like([0.2]))
    other_model = write(tmp_path, "m.json", compress_like([0.2], model_source="sha256:def"))
    other_kind = write(tmp_path, "k.json", eval_like(1.0, 0.1, 0.9, 0.01))
    assert_one_line_error(run("check", report, "--baseline", other_model, "--tolerance", "5%"), "of one model")
    assert_one_line_error(run("check", report, "--baseline", other_kind, "--tolerance", "5%"), "of one kind")
    assert_one_line_error(run("check", report, "--baseline", report), "needs --tolerance")
    assert_one_line_error(run("check", report, "--baseline", report, "--tolerance", "five"), "--tolerance")
    assert_one_line_error(run("check", report, "--baseline", report, "--significance", "0.7"), "(0, 0.5)")


def test_tolerance_decides_against_the_baseline(tmp_path: Path) -> None:
    base = write(tmp_path, "base.json", compress_like([0.30, 0.30]))
    slightly = write(tmp_path, "a.json", compress_like([0.31, 0.31]))  # +3.3%
    clearly = write(tmp_path, "b.json", compress_like([0.32, 0.32]))   # +6.7%
    key = "total.attention_output_rel_error"
    assert run("check", slightly, "--max", key, "--baseline", base, "--tolerance", "5%").exit_code == 0
    line = one_line_error(run("check", clearly, "--max", key, "--baseline", base, "--tolerance", "5%"), code=1)
    assert "0.32 > 0.315 (baseline 0.3)" in line
    # an absolute tolerance, and a per-layer comparison through the wildcard
    assert run("check", clearly, "--max", "layers.*.attention_output_rel_error", "--baseline", base,
               "--tolerance", "0.025").exit_code == 0
    assert run("check", clearly, "--max", "layers.*.attention_output_rel_error", "--baseline", base,
               "--tolerance", "0.015").exit_code == 1
    # --min: a fall is what fails
    assert run("check", base, "--min", key, "--baseline", clearly, "--tolerance", "5%").exit_code == 1
    assert run("check", clearly, "--min", key, "--baseline", base, "--tolerance", "0%").exit_code == 0


def test_default_baseline_checks_for_compress(tmp_path: Path) -> None:
    base = write(tmp_path, "base.json", compress_like([0.30, 0.30]))
    more_bits = write(tmp_path, "a.json", compress_like([0.30, 0.30], bits=3.5))
    result = gate(more_bits, baseline_path=base, tolerance="1%")
    keys = [r.check.key for r in result.results]
    assert keys == ["total.bits_per_element", "total.keys.rel_mse", "total.values.rel_mse",
                    "total.attention_output_rel_error"]
    assert [r.passed for r in result.results] == [False, True, True, True]


def test_one_tailed_test_tolerates_noise_and_catches_a_real_shift(tmp_path: Path) -> None:
    base = write(tmp_path, "base.json", eval_like(1.00, 0.50, 0.950, 0.004))
    noisy = write(tmp_path, "noisy.json", eval_like(1.60, 0.50, 0.946, 0.004))    # z = 0.85, p = 0.20
    shifted = write(tmp_path, "shift.json", eval_like(3.00, 0.50, 0.930, 0.004))  # z = 2.83, p = 0.002
    args = ["--max", "delta_ppl_pct", "--min", "top1_agreement", "--baseline", base]
    # a fixed 5% tolerance flaps on the noisy run; the test at 0.05 does not
    assert run("check", noisy, *args, "--tolerance", "5%").exit_code == 1
    assert run("check", noisy, *args, "--significance", "0.05").exit_code == 0
    r = run("check", shifted, *args, "--significance", "0.05")
    line = one_line_error(r, code=1)
    assert "2 of 2 checks failed" in line and "delta_ppl_pct = 3 >" in line

    # the limit is the baseline plus z(0.95) standard errors of the difference, and p is one-tailed
    result = gate(noisy, ["delta_ppl_pct"], baseline_path=base, significance=0.05)
    item = result.results[0].items[0]
    spread = (0.5**2 + 0.5**2) ** 0.5
    assert item.limit == pytest.approx(1.0 + NormalDist().inv_cdf(0.95) * spread)
    assert item.z == pytest.approx(0.6 / spread)
    assert item.p_value == pytest.approx(1 - NormalDist().cdf(0.6 / spread))
    top1 = gate(shifted, minima=["top1_agreement"], baseline_path=base, significance=0.05).results[0].items[0]
    assert top1.z == pytest.approx(0.02 / (2 * 0.004**2) ** 0.5) and not top1.passed


def test_significance_needs_standard_errors(tmp_path: Path) -> None:
    base = write(tmp_path, "base.json", eval_like(1.0, 0.5, 0.95, 0.004, bits_per_element=3.25))
    cur = write(tmp_path, "cur.json", eval_like(1.0, 0.5, 0.95, 0.004, bits_per_element=3.5))
    assert_one_line_error(run("check", cur, "--max", "bits_per_element", "--baseline", base, "--significance",
                              "0.05"), "has no standard error")
    # with both: the test where standard errors exist, the tolerance elsewhere
    result = gate(cur, ["bits_per_element", "delta_ppl_pct"], baseline_path=base, significance=0.05,
                  tolerance="5%")
    assert [r.mode for r in result.results] == ["tolerance", "significance"]
    assert [r.passed for r in result.results] == [False, True]
    # eval reports get default checks, kld_mean tested with its kld_stderr
    defaults = gate(cur, baseline_path=base, significance=0.05)
    assert [(r.check.op, r.check.key, r.mode) for r in defaults.results] == [
        ("max", "delta_ppl_pct", "significance"), ("max", "kld_mean", "significance"),
        ("min", "top1_agreement", "significance")]
    assert defaults.results[1].items[0].stderr == pytest.approx(0.001 * 2**0.5)
    # another kind with standard errors: every key whose better direction its name tells
    other = {**eval_like(1.0, 0.5, 0.95, 0.004), "kvtool_report": "sweep", "rms_dp": 0.1, "rms_dp_stderr": 0.01}
    path = write(tmp_path, "sweep.json", other)
    keys = [r.check.key for r in gate(path, baseline_path=path, significance=0.05).results]
    assert keys == ["delta_ppl_pct", "top1_agreement", "kld_mean"]


# ----------------------------------------------------------------------------------- JUnit and Markdown


TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")


def test_junit_has_the_schemas_required_elements(tmp_path: Path) -> None:
    """The Ant JUnit schema (windyroad/JUnit-Schema JUnit.xsd), which GitLab's and GitHub's JUnit reporters
    read: required attributes and the element order properties, testcase*, system-out, system-err."""
    report = write(tmp_path, "r.json", compress_like([0.2, 0.5]))
    junit = tmp_path / "out" / "junit.xml"
    r = run("check", report, "--junit", junit, "--max", "layers.*.attention_output_rel_error=0.4",
            "--max", "total.bits_per_element=4", "--min", "total.bits_per_element=3")
    assert r.exit_code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    suites = list(root)
    assert [s.tag for s in suites] == ["testsuite"]
    suite = suites[0]
    for attr in ("name", "package", "id", "timestamp", "hostname", "tests", "failures", "errors", "time"):
        assert suite.get(attr), attr
    assert TIMESTAMP.fullmatch(suite.get("timestamp"))
    float(suite.get("time"))
    children = [c.tag for c in suite]
    assert children == ["properties", "testcase", "testcase", "testcase", "system-out", "system-err"]
    assert all(p.get("name") and p.get("value") is not None for p in suite.find("properties"))
    cases = suite.findall("testcase")
    assert (int(suite.get("tests")), int(suite.get("failures")), int(suite.get("errors"))) == (3, 1, 0)
    for case in cases:
        assert case.get("name") and case.get("classname") == "kvtool.check.compress"
        float(case.get("time"))
    failure = cases[0].find("failure")
    assert failure is not None and failure.get("type") and "layer 1 = 0.5 > 0.4" in failure.get("message")
    assert "\n" not in failure.get("message")
    assert [c.find("failure") for c in cases[1:]] == [None, None]
    # the whole file is well-formed with an XML declaration
    assert junit.read_text().startswith('<?xml version="1.0" encoding="UTF-8"?>')


def test_markdown_summary_is_appended_and_json_written(tmp_path: Path) -> None:
    report = write(tmp_path, "r.json", compress_like([0.2, 0.5]))
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    out = tmp_path / "check.json"
    r = run("check", report, "--summary", summary, "--json", out, "--max",
            "layers.*.attention_output_rel_error=0.4", "--max", "total.bits_per_element=4")
    assert r.exit_code == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n### kvtool check: ❌ failed")
    assert "| ❌ | `layers.*.attention_output_rel_error <= 0.4` | 0.5 (layer 1) | 0.4 | 1 of 2 fail |" in text
    assert "- layer 1 = 0.5 > 0.4" in text
    data = json.loads(out.read_text())
    assert data["kvtool_report"] == "check" and data["report_kind"] == "compress" and not data["passed"]
    assert [c["passed"] for c in data["checks"]] == [False, True]
    # --json - prints only JSON, and the exit code still says the gate failed
    r = run("check", report, "--json", "-", "--max", "total.bits_per_element=3")
    assert r.exit_code == 1 and json.loads(r.stdout)["passed"] is False


# ------------------------------------------------------------------------------- a real compress report


@pytest.fixture(scope="module")
def real_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kvtool.codecs import parse_pair
    from kvtool.compress import compress

    keys, values = parse_pair("turboquant:bits=3", None, None)
    path = tmp_path_factory.mktemp("check") / "tq3.json"
    path.write_text(json.dumps(compress(SAMPLE, keys, values)))
    return path


def test_gate_on_a_real_compress_report(real_report: Path, tmp_path: Path) -> None:
    data = json.loads(real_report.read_text())
    errors = sorted(r["attention_output_rel_error"] for r in data["layers"])
    worst, worst_layer = errors[-1], max(data["layers"], key=lambda r: r["attention_output_rel_error"])["layer"]
    assert run("check", real_report, "--max", f"layers.*.attention_output_rel_error={worst * 1.001}",
               "--max", "total.bits_per_element=3.25").exit_code == 0
    between = (errors[-1] + errors[-2]) / 2
    r = run("check", real_report, "--max", f"layers.*.attention_output_rel_error={between}")
    assert f"1 of 30 fail, worst layer {worst_layer} = {worst:.6g}" in one_line_error(r, code=1)
    # every per-head value too, through two wildcards
    heads = [h["keys_rel_mse"] for layer in data["layers"] for h in layer["heads"]]
    assert run("check", real_report, "--max", f"layers.*.heads.*.keys_rel_mse={max(heads) * 0.999}").exit_code == 1
    # the report against itself as a baseline: the default compress checks all pass
    result = gate(real_report, baseline_path=real_report, tolerance="0%")
    assert result.passed and len(result.results) == 5
    assert "kvtool.check.compress" in junit_xml(result) and "✅ passed" in markdown_summary(result)
