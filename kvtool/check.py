"""Regression gates on kvtool JSON reports: thresholds, baselines, JUnit XML and a Markdown summary.

A check names a dotted path into a report (``total.attention_output_rel_error``) and a bound: ``--max`` (the
value must not rise above it) or ``--min`` (must not fall below it). ``*`` takes every item of a list (or
every value of a mapping): ``layers.*.attention_output_rel_error`` checks each layer, and the check fails when
any one does. A number in the path picks one list item (``layers.3.keys.rel_mse``). Nothing here knows a
report's layout: every report kind kvtool writes (compress, analyze, eval, sweep, plan, budget, task) can be gated,
including kinds added later.

The bound is a fixed number (``KEY=0.3``) or, with a baseline report, the baseline's value at the same path:

* ``tolerance`` — the value may be worse than the baseline by a relative (``5%``) or absolute (``0.002``)
  margin;
* ``significance`` — a one-tailed z-test where the reports carry standard errors. A key ``K`` has its
  standard error in the sibling ``K_stderr`` (``delta_ppl_pct`` / ``delta_ppl_pct_stderr``), or, for a mean
  ``X_mean``, in ``X_stderr`` (``kld_mean`` / ``kld_stderr``, as eval reports name them). The check fails
  when ``(value - baseline) / sqrt(se² + se_base²)`` exceeds the ``1 - significance`` normal quantile (for
  ``--max``; mirrored for ``--min``), so a change within the noise of the measurement passes. This is the
  threshold TensorRT-LLM's accuracy suite uses, ``reference ± z · sqrt(2σ²/n)``
  (tests/integration/defs/accuracy/README.md, "Hypothesis Testing Methodology"), with the two standard
  errors each report states in place of one assumed σ. Treating the two runs as independent is conservative
  when both ran on the same tokens (a paired difference has a smaller spread).

A value of ``null`` (kvtool writes non-finite numbers as null) fails its check: a NaN error is a regression.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from kvtool.errors import InputError
from kvtool.report import KIND_FIELD, REPORT_KINDS, header, json_safe

MAX, MIN = "max", "min"
STDERR_SUFFIX = "_stderr"
#: Fields that name a list item in messages ("layer 12" rather than "layers.12"), first found wins.
LABEL_FIELDS = ("layer", "head", "label", "name", "spec", "codec", "context", "batch")

#: Keys compared with a baseline when no ``--max KEY``/``--min KEY`` is given, per report kind. Keys absent
#: from both reports are skipped (a compress report without queries has no attention figures).
DEFAULT_BASELINE_CHECKS: dict[str, tuple[tuple[str, str], ...]] = {
    "compress": ((MAX, "total.bits_per_element"), (MAX, "total.keys.rel_mse"), (MAX, "total.values.rel_mse"),
                 (MAX, "total.attention_output_rel_error"), (MAX, "total.attention_output_rel_error_max")),
    # eval reports: the first method's figures at the top level (kvtool/evaluate.py), each with a stderr
    "eval": ((MAX, "delta_ppl_pct"), (MAX, "kld_mean"), (MIN, "top1_agreement")),
    # task reports: the first method's accuracy and agreement with exact at the top level (kvtool/tasks/run.py)
    "task": ((MIN, "accuracy"), (MIN, "agreement"), (MIN, "exact.accuracy")),
}

# Metric names whose better direction is known: a lower error, a higher agreement. Used to pick default
# baseline checks on reports with standard errors (eval), never to second-guess an explicit --max/--min.
_LOWER_IS_BETTER = re.compile(r"(error|mse|kl|kld|ppl|perplexity|nll|loss|bits|bytes|seconds)", re.I)
_HIGHER_IS_BETTER = re.compile(r"(cosine|overlap|agreement|accuracy|top1|match|ratio)", re.I)


# --------------------------------------------------------------------------------------------- reports


def load_report(path: Path | str, what: str = "report") -> dict[str, Any]:
    """Read a kvtool JSON report; InputError unless it is a JSON object of a known kind."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); give a kvtool --json report") \
            from None
    if not isinstance(data, dict) or KIND_FIELD not in data:
        raise InputError(f"{path}: not a kvtool report (no {KIND_FIELD!r} field); give the --json output of "
                         f"kvtool {'/'.join(REPORT_KINDS)}")
    kind = data[KIND_FIELD]
    if kind not in REPORT_KINDS:
        raise InputError(f"{path}: unknown report kind {kind!r}; kinds: {', '.join(REPORT_KINDS)}")
    return data


def _model_id(report: dict[str, Any]) -> tuple[str, str]:
    return str(report.get("model", "")), str(report.get("model_source", ""))


def check_baseline_matches(report: dict[str, Any], baseline: dict[str, Any], baseline_path: Path | str) -> None:
    """InputError when the baseline is a report of another kind or another model."""
    kind, base_kind = report[KIND_FIELD], baseline[KIND_FIELD]
    if kind != base_kind:
        raise InputError(f"{baseline_path}: baseline is a {base_kind} report, the report is a {kind} report; "
                         "compare reports of one kind")
    (model, source), (base_model, base_source) = _model_id(report), _model_id(baseline)
    # the source (file hash or revision) identifies the weights; the spec is the fallback when it is unknown
    same = source == base_source if source and base_source else model == base_model
    if not same:
        raise InputError(f"{baseline_path}: baseline is of model {base_model!r} ({base_source or 'no source'}), "
                         f"the report of {model!r} ({source or 'no source'}); compare reports of one model")


# ----------------------------------------------------------------------------------------------- paths


def _parts(key: str) -> list[str]:
    parts = key.split(".")
    if not key or any(p == "" for p in parts):
        raise InputError(f"key {key!r}: empty path segment; use dotted names like "
                         "'total.attention_output_rel_error' or 'layers.*.keys.rel_mse'")
    return parts


@dataclass(frozen=True)
class Match:
    """One value a key resolved to: its concrete ``path``, a readable ``where`` and the ``parent`` mapping."""

    path: str
    where: str
    value: Any
    parent: Any


def _label(item: Any, index: int | str) -> str:
    if isinstance(item, dict):
        for name in LABEL_FIELDS:
            if name in item and isinstance(item[name], (int, float, str)) and not isinstance(item[name], bool):
                return f"{name} {item[name]}"
    return f"[{index}]"


def _walk(node: Any, parts: list[str], path: list[str], where: list[str], parent: Any) -> Iterator[Match]:
    if not parts:
        yield Match(".".join(path), ", ".join(where), node, parent)
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        items = list(enumerate(node)) if isinstance(node, list) else \
            list(node.items()) if isinstance(node, dict) else []
        for k, child in items:
            yield from _walk(child, rest, [*path, str(k)], [*where, _label(child, k)], node)
    elif isinstance(node, dict) and head in node:
        yield from _walk(node[head], rest, [*path, head], where, node)
    elif isinstance(node, list) and re.fullmatch(r"\d+", head) and int(head) < len(node):
        child = node[int(head)]
        yield from _walk(child, rest, [*path, head], [*where, _label(child, head)], node)


def leaf_keys(report: Any, prefix: str = "") -> list[str]:
    """Every path to a number, bool or null in ``report``, list indices written as ``*`` (for suggestions)."""
    out: list[str] = []
    if isinstance(report, dict):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in report.items()]
    elif isinstance(report, list):
        items = [("*", v) for v in report[:1]] + [("*", v) for v in report[1:] if isinstance(v, dict)]
    else:
        return [prefix] if prefix and (report is None or isinstance(report, (int, float))) else []
    seen: set[str] = set()
    for name, value in items:
        for key in leaf_keys(value, f"{prefix}.{name}" if prefix else name):
            if key not in seen:
                seen.add(key)
                out.append(key)
    return out


def resolve(report: dict[str, Any], key: str) -> list[Match]:
    """The values ``key`` names in ``report`` (several with ``*``); InputError listing the closest keys when
    it names nothing, or when it names a mapping or a list rather than numbers."""
    matches = list(_walk(report, _parts(key), [], [], None))
    if not matches:
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", key)
        close = difflib.get_close_matches(pattern, leaf_keys(report), n=5, cutoff=0.6)
        kind = report.get(KIND_FIELD, "")
        hint = f"closest: {', '.join(close)}" if close else \
            f"top-level keys: {', '.join(k for k in report if k != KIND_FIELD)}"
        raise InputError(f"unknown key {key!r} in the {kind} report; {hint}")
    for m in matches:
        if isinstance(m.value, (dict, list)):
            inner = list(m.value)[:8] if isinstance(m.value, dict) else ["*"]
            raise InputError(f"key {key!r} names a {'mapping' if isinstance(m.value, dict) else 'list'} "
                             f"({m.path}), not a number; go deeper, e.g. "
                             + ", ".join(f"{key}.{k}" for k in inner))
        if isinstance(m.value, str):
            raise InputError(f"key {key!r} names text ({m.path} = {m.value!r}), not a number")
    return matches


# ---------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """One ``--max``/``--min`` check: ``bound`` a number, or None to compare with the baseline."""

    op: str
    key: str
    bound: float | None = None

    @property
    def text(self) -> str:
        return f"--{self.op} {self.key}" + (f"={self.bound:g}" if self.bound is not None else "")


def parse_check(op: str, text: str) -> Check:
    """``KEY=NUMBER`` (a fixed bound) or ``KEY`` (compared with the baseline) → :class:`Check`."""
    if op not in (MAX, MIN):
        raise InputError(f"check must be one of max, min, got {op!r}")
    key, sep, value = text.partition("=")
    key = key.strip()
    example = f"--{op} layers.*.attention_output_rel_error=0.3"
    if not key:
        raise InputError(f"--{op} {text!r}: no key; use KEY=NUMBER, e.g. {example}")
    _parts(key)
    if not sep:
        return Check(op, key)
    try:
        bound = float(value)
    except ValueError:
        raise InputError(f"--{op} {text!r}: {value.strip()!r} is not a number; use KEY=NUMBER, "
                         f"e.g. {example}") from None
    if not math.isfinite(bound):
        raise InputError(f"--{op} {text!r}: the bound must be a finite number")
    return Check(op, key, bound)


@dataclass(frozen=True)
class Tolerance:
    """How far a value may be worse than its baseline: ``relative`` (a fraction) or an absolute amount."""

    amount: float
    relative: bool

    @property
    def text(self) -> str:
        return f"{self.amount * 100:g}%" if self.relative else f"{self.amount:g}"

    def allowance(self, baseline: float) -> float:
        return abs(baseline) * self.amount if self.relative else self.amount


def parse_tolerance(text: str) -> Tolerance:
    """``"5%"`` (relative to the baseline) or ``"0.002"`` (absolute, in the metric's unit)."""
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        amount = float(raw[:-1] if relative else raw)
    except ValueError:
        raise InputError(f"--tolerance {text!r}: use a percentage like 5% or an absolute amount like "
                         "0.002") from None
    if not math.isfinite(amount) or amount < 0:
        raise InputError(f"--tolerance {text!r}: must be a finite amount >= 0")
    return Tolerance(amount / 100 if relative else amount, relative)


def check_significance(alpha: float) -> float:
    if not (0 < alpha < 0.5):
        raise InputError(f"--significance must be in (0, 0.5), e.g. 0.05, got {alpha:g}")
    return alpha


@dataclass
class ItemResult:
    """One value checked: where it is, its value, the limit it met or missed and how the limit came about."""

    path: str
    where: str
    value: float | None
    limit: float | None
    passed: bool
    baseline: float | None = None
    stderr: float | None = None
    z: float | None = None
    p_value: float | None = None

    def describe(self, op: str) -> str:
        """``layer 12 = 0.51 > 0.45`` (or the concrete path when no list item is involved)."""
        at = self.where or self.path
        if self.value is None:
            return f"{at} is null (non-finite or missing)"
        if self.limit is None:
            return f"{at} = {self.value:.6g}, but the baseline's value is null"
        rel = ">" if op == MAX else "<"
        ok = "<=" if op == MAX else ">="
        text = f"{at} = {self.value:.6g} {ok if self.passed else rel} {self.limit:.6g}"
        if self.z is not None:
            text += f" (baseline {self.baseline:.6g}, z = {self.z:.2f}, p = {self.p_value:.3g})"
        elif self.baseline is not None:
            text += f" (baseline {self.baseline:.6g})"
        return text


@dataclass
class CheckResult:
    """The outcome of one :class:`Check` over every value its key names."""

    check: Check
    mode: str  # "bound" | "tolerance" | "significance"
    items: list[ItemResult]
    detail: str = ""

    @property
    def passed(self) -> bool:
        return all(i.passed for i in self.items)

    @property
    def failures(self) -> list[ItemResult]:
        return [i for i in self.items if not i.passed]

    @property
    def worst(self) -> ItemResult:
        """The failing item furthest past its limit, or the one closest to it when all pass."""
        def margin(i: ItemResult) -> float:
            if i.value is None or i.limit is None:
                return math.inf
            return (i.value - i.limit) if self.check.op == MAX else (i.limit - i.value)
        return max(self.items, key=margin)

    @property
    def name(self) -> str:
        """The JUnit test name: the check as written, with how its limit was set."""
        sign = "<=" if self.check.op == MAX else ">="
        if self.mode == "bound":
            return f"{self.check.key} {sign} {self.check.bound:g}"
        return f"{self.check.key} {sign} baseline ({self.detail})"

    def message(self) -> str:
        """One line: every failing item (up to 5) with its value against its limit, or the worst passing one."""
        if self.passed:
            return self.worst.describe(self.check.op)
        fails = self.failures
        head = f"{len(fails)} of {len(self.items)} values fail: " if len(self.items) > 1 else ""
        shown = "; ".join(i.describe(self.check.op) for i in fails[:5])
        return head + shown + (f"; … {len(fails) - 5} more" if len(fails) > 5 else "")

    def short(self) -> str:
        """The worst value against its limit, prefixed by the key (and the failure count) for several."""
        if len(self.items) == 1:
            return self.items[0].describe(self.check.op) if not self.items[0].where else \
                f"{self.check.key}: {self.items[0].describe(self.check.op)}"
        fails = len(self.failures)
        return f"{self.check.key}: {fails} of {len(self.items)} fail, worst {self.worst.describe(self.check.op)}"

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check.text, "name": self.name, "op": self.check.op, "key": self.check.key,
                "mode": self.mode, "detail": self.detail, "passed": self.passed, "message": self.message(),
                "items": [vars(i) for i in self.items]}


def _number(m: Match) -> float | None:
    if m.value is None:
        return None
    return float(m.value)


def _against_bound(check: Check, matches: list[Match]) -> CheckResult:
    bound = float(check.bound)  # type: ignore[arg-type]
    items = []
    for m in matches:
        v = _number(m)
        ok = v is not None and (v <= bound if check.op == MAX else v >= bound)
        items.append(ItemResult(m.path, m.where, v, bound, ok))
    return CheckResult(check, "bound", items)


def stderr_names(key_name: str) -> list[str]:
    """Where a value's standard error may sit beside it: ``K_stderr``, and ``X_stderr`` for ``K = X_mean``."""
    names = [key_name + STDERR_SUFFIX]
    if key_name.endswith("_mean"):
        names.append(key_name[: -len("_mean")] + STDERR_SUFFIX)
    return names


def _stderr_of(m: Match, key_name: str) -> float | None:
    parent = m.parent
    if isinstance(parent, dict):
        for name in stderr_names(key_name):
            se = parent.get(name)
            if isinstance(se, (int, float)) and not isinstance(se, bool) and math.isfinite(se) and se >= 0:
                return float(se)
    return None


def _baseline_value(baseline: dict[str, Any], m: Match, key: str, base_path: Path | str) -> Match:
    found = list(_walk(baseline, m.path.split("."), [], [], None))
    if not found:
        raise InputError(f"{base_path}: the baseline has no {m.path} (for {key}); was it made with other "
                         "options (layers, queries)?")
    b = found[0]
    if b.where != m.where:
        raise InputError(f"{base_path}: {m.path} is {b.where} in the baseline but {m.where} in the report; "
                         "compare reports over the same items")
    if isinstance(b.value, (dict, list, str)):
        raise InputError(f"{base_path}: {m.path} in the baseline is not a number")
    return b


def _against_baseline(check: Check, matches: list[Match], baseline: dict[str, Any], base_path: Path | str,
                      tolerance: Tolerance | None, significance: float | None) -> CheckResult:
    key_name = check.key.rsplit(".", 1)[-1]
    items: list[ItemResult] = []
    modes: set[str] = set()
    for m in matches:
        b = _baseline_value(baseline, m, check.key, base_path)
        v, bv = _number(m), _number(b)
        se, base_se = _stderr_of(m, key_name), _stderr_of(b, key_name)
        sign = 1.0 if check.op == MAX else -1.0
        if significance is not None and se is not None and base_se is not None:
            modes.add("significance")
            spread = math.hypot(se, base_se)
            z_crit = NormalDist().inv_cdf(1 - significance)
            limit = None if bv is None else bv + sign * z_crit * spread
            if v is None or bv is None:
                items.append(ItemResult(m.path, m.where, v, limit, False, bv, spread))
                continue
            if spread == 0:
                z = 0.0 if v == bv else math.copysign(math.inf, sign * (v - bv))
            else:
                z = sign * (v - bv) / spread
            p = 1 - NormalDist().cdf(z) if math.isfinite(z) else (0.0 if z > 0 else 1.0)
            items.append(ItemResult(m.path, m.where, v, limit, p >= significance, bv, spread, z, p))
            continue
        if tolerance is None:
            raise InputError(f"{check.key}: {m.path} has no standard error ({' or '.join(stderr_names(key_name))}) "
                             "in both reports, so --significance cannot test it; add --tolerance for such keys")
        modes.add("tolerance")
        limit = None if bv is None else bv + sign * tolerance.allowance(bv)
        ok = v is not None and limit is not None and (v <= limit if check.op == MAX else v >= limit)
        items.append(ItemResult(m.path, m.where, v, limit, ok, bv))
    details = []
    if "significance" in modes:
        details.append(f"one-tailed z-test at {significance:g}")
    if "tolerance" in modes:
        details.append(f"tolerance {tolerance.text}")  # type: ignore[union-attr]
    mode = "significance" if modes == {"significance"} else "tolerance" if modes == {"tolerance"} else "mixed"
    return CheckResult(check, mode, items, " + ".join(details))


def default_baseline_checks(report: dict[str, Any], baseline: dict[str, Any]) -> list[Check]:
    """The checks run against a baseline when none are named: per kind (compress, eval), else every key with
    a standard error whose better direction its name tells."""
    kind = report[KIND_FIELD]
    chosen: list[Check] = []
    for op, key in DEFAULT_BASELINE_CHECKS.get(kind, ()):
        if list(_walk(report, key.split("."), [], [], None)) and list(_walk(baseline, key.split("."), [], [], None)):
            chosen.append(Check(op, key))
    if chosen:
        return chosen
    for key in leaf_keys(report):
        if not key.endswith(STDERR_SUFFIX) or "*" in key:
            continue
        stem = key[: -len(STDERR_SUFFIX)]
        for base in (stem, stem + "_mean"):
            name = base.rsplit(".", 1)[-1]
            op = MAX if _LOWER_IS_BETTER.search(name) else MIN if _HIGHER_IS_BETTER.search(name) else None
            if op is not None and list(_walk(report, base.split("."), [], [], None)):
                chosen.append(Check(op, base))
                break
    if not chosen:
        raise InputError(f"no default checks for a {kind} report against a baseline; name the keys to compare "
                         "with --max KEY or --min KEY (no =NUMBER)")
    return chosen


@dataclass
class GateResult:
    """Every check's outcome plus what was checked (for the table, JUnit, Markdown and JSON)."""

    report_path: str
    report: dict[str, Any]
    results: list[CheckResult]
    baseline_path: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.report[KIND_FIELD])

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def summary_line(self) -> str:
        """One line: how many checks failed and, for each, its worst value against its limit."""
        n, bad = len(self.results), len(self.failed)
        if not bad:
            return f"all {n} check{'s' if n != 1 else ''} passed"
        return f"{bad} of {n} check{'s' if n != 1 else ''} failed: " + "; ".join(r.short() for r in self.failed)

    def to_dict(self) -> dict[str, Any]:
        model, source = _model_id(self.report)
        return json_safe({**header("check", model=model, model_source=source,
                                   model_architecture=str(self.report.get("model_architecture", ""))),
                          "report": self.report_path, "report_kind": self.kind, "baseline": self.baseline_path,
                          "passed": self.passed, "checks": [r.to_dict() for r in self.results],
                          "notes": self.notes, "seconds": self.seconds})


def gate(report_path: Path | str, maxima: list[str] | None = None, minima: list[str] | None = None, *,
         baseline_path: Path | str | None = None, tolerance: str | None = None,
         significance: float | None = None) -> GateResult:
    """Run every check on the report at ``report_path`` and return the outcome (it never raises GateFailed:
    the caller decides, after writing JUnit and summaries).

    ``maxima``/``minima`` are ``KEY=NUMBER`` or, with ``baseline_path``, ``KEY`` alone. With a baseline and no
    bare keys, :func:`default_baseline_checks` chooses them. A baseline needs ``tolerance`` (``"5%"`` or an
    absolute ``"0.002"``), ``significance`` (one-tailed, for keys with ``*_stderr``), or both.
    """
    started = time.perf_counter()
    report = load_report(report_path)
    checks = [parse_check(MAX, t) for t in maxima or []] + [parse_check(MIN, t) for t in minima or []]
    tol = parse_tolerance(tolerance) if tolerance is not None else None
    alpha = check_significance(significance) if significance is not None else None
    baseline = None
    if baseline_path is None:
        if tol is not None or alpha is not None:
            raise InputError("--tolerance and --significance compare with a baseline: add --baseline BASE.json")
        bare = [c for c in checks if c.bound is None]
        if bare:
            raise InputError(f"{bare[0].text}: no bound; write KEY=NUMBER, or give --baseline BASE.json to "
                             "compare with")
        if not checks:
            raise InputError("nothing to check: give --max KEY=NUMBER, --min KEY=NUMBER or --baseline BASE.json")
    else:
        baseline = load_report(baseline_path, "baseline")
        check_baseline_matches(report, baseline, baseline_path)
        if tol is None and alpha is None:
            raise InputError("--baseline needs --tolerance (e.g. 5%) or --significance (e.g. 0.05)")
        if not any(c.bound is None for c in checks):
            checks += default_baseline_checks(report, baseline)
    results = []
    for c in checks:
        matches = resolve(report, c.key)
        if c.bound is not None:
            results.append(_against_bound(c, matches))
        else:
            results.append(_against_baseline(c, matches, baseline, baseline_path,  # type: ignore[arg-type]
                                             tol, alpha))
    return GateResult(str(report_path), report, results, str(baseline_path) if baseline_path else None,
                      time.perf_counter() - started)


# ------------------------------------------------------------------------------------- JUnit, Markdown


def junit_xml(result: GateResult) -> str:
    """JUnit XML with one testcase per check, in the Ant JUnit layout that GitLab and GitHub reporters read:
    ``testsuites > testsuite`` (name, package, id, tests, failures, errors, skipped, time, timestamp,
    hostname), its ``properties``, one ``testcase`` (name, classname, time) per check with a ``failure``
    (message, type, details as text) when it fails, then ``system-out`` and ``system-err``."""
    classname = f"kvtool.check.{result.kind}"
    n, bad = len(result.results), len(result.failed)
    seconds = f"{result.seconds:.3f}"
    root = ET.Element("testsuites", name="kvtool check", tests=str(n), failures=str(bad), errors="0",
                      time=seconds)
    suite = ET.SubElement(root, "testsuite", name=classname, package="kvtool.check", id="0", tests=str(n),
                          failures=str(bad), errors="0", skipped="0", time=seconds,
                          timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"), hostname=_hostname())
    props = ET.SubElement(suite, "properties")
    model, source = _model_id(result.report)
    for name, value in (("report", result.report_path), ("report_kind", result.kind), ("model", model),
                        ("model_source", source), ("baseline", result.baseline_path or "")):
        ET.SubElement(props, "property", name=name, value=value)
    for r in result.results:
        case = ET.SubElement(suite, "testcase", name=_token(r.name), classname=classname, time="0")
        if not r.passed:
            failure = ET.SubElement(case, "failure", message=_token(r.message()),
                                    type="baseline" if r.check.bound is None else "threshold")
            failure.text = "\n".join(i.describe(r.check.op) for i in r.failures)
    ET.SubElement(suite, "system-out").text = result.summary_line()
    ET.SubElement(suite, "system-err").text = ""
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _hostname() -> str:
    try:
        return socket.gethostname() or "localhost"
    except OSError:
        return "localhost"


def _token(text: str) -> str:
    """xs:token: no line breaks or tabs, single spaces, no leading or trailing space."""
    return " ".join(text.split())


def markdown_summary(result: GateResult) -> str:
    """A Markdown section for ``$GITHUB_STEP_SUMMARY`` (or a merge-request note): a verdict line, a table of
    the checks and every failing value."""
    model, source = _model_id(result.report)
    verdict = "✅ passed" if result.passed else "❌ failed"
    lines = [f"### kvtool check: {verdict} — {result.kind} report `{result.report_path}`", "",
             f"{len(result.results) - len(result.failed)} of {len(result.results)} checks passed; model "
             f"`{model}`" + (f" (`{source}`)" if source else "")
             + (f"; baseline `{result.baseline_path}`" if result.baseline_path else ""), "",
             "| | check | value | limit | values |", "|---|---|---|---|---|"]
    for r in result.results:
        w = r.worst
        value = "null" if w.value is None else f"{w.value:.6g}"
        where = f" ({w.where})" if w.where and len(r.items) > 1 else ""
        limit = "—" if w.limit is None else f"{w.limit:.6g}"
        count = f"{len(r.failures)} of {len(r.items)} fail" if r.failures else f"{len(r.items)} pass"
        lines.append(f"| {'✅' if r.passed else '❌'} | `{_md(r.name)}` | {value}{_md(where)} | {limit} | {count} |")
    for r in result.failed:
        lines += ["", f"**{_md(r.name)}**", ""]
        lines += [f"- {_md(i.describe(r.check.op))}" for i in r.failures[:20]]
        if len(r.failures) > 20:
            lines.append(f"- … {len(r.failures) - 20} more")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")
