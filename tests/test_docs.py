"""The docs against the code, where that is cheap to check: every module in ARCHITECTURE.md's table, code
fences closed, presets and defaults that the docs and ``--help`` quote, the model options every
model-loading command shares."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import typer

import kvtool
from kvtool.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
PACKAGE = Path(kvtool.__file__).parent


def _command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _option(command: Any, flag: str) -> Any:
    for param in command.params:
        if param.param_type_name == "option" and flag in param.opts:
            return param
    raise AssertionError(f"{command.name} has no {flag}")


def unclosed_fence(text: str) -> int | None:
    """The line (1-based) of a code fence that never closes, else None. A closing fence is backticks alone
    on their line (CommonMark): ```` ``` text```` after the backticks does not close."""
    opened = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if opened is None:
            if stripped.startswith("```"):
                opened = n
        elif re.fullmatch(r"`{3,}", stripped):
            opened = None
    return opened


def test_the_fence_check_sees_a_fence_with_text_after_it() -> None:
    assert unclosed_fence("```python\nx = 1\n``` and then prose\n") == 1
    assert unclosed_fence("```python\nx = 1\n```\nprose\n") is None


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_code_fences_close(path: Path) -> None:
    assert unclosed_fence(path.read_text(encoding="utf-8")) is None, f"{path.name}: a code fence never closes"


def test_every_module_has_a_row_in_architecture_md() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text[text.index("## Modules"):]
    modules = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in table]
    assert not missing, f"docs/ARCHITECTURE.md's module table has no row for {missing}"


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 140, f"README.md has {len(lines)} lines; the manual belongs in docs/USAGE.md"


def test_presets_are_named_in_help() -> None:
    from kvtool.codecs.presets import PRESETS

    for command, flag in (("sweep", "--methods"), ("plan", "--candidates")):
        text = _option(_command(command), flag).help or ""
        missing = [p for p in PRESETS if p not in text]
        assert not missing, f"{command} {flag} --help does not name the presets {missing}"


def test_plan_granularity_default_is_the_same_everywhere() -> None:
    from kvtool.codecs.planfile import Plan
    from kvtool.plan import measure, plan

    cli = _option(_command("plan"), "--granularity").default
    library = {inspect.signature(f).parameters["granularity"].default for f in (plan, measure)}
    assert library == {cli} and Plan.__dataclass_fields__["granularity"].default == cli
    doc = (ROOT / "docs" / "PLAN.md").read_text(encoding="utf-8")
    assert f"per {cli} is the default" in doc or f"per {cli} by default" in doc


def test_eval_context_default_is_the_one_usage_md_quotes() -> None:
    from kvtool.evaluate import DEFAULT_CONTEXT

    assert _option(_command("eval"), "--context").default == DEFAULT_CONTEXT
    usage = (ROOT / "docs" / "USAGE.md").read_text(encoding="utf-8")
    assert f"`--context` C tokens (default {DEFAULT_CONTEXT})" in usage


MODEL_OPTIONS = ("--model", "--model-dtype", "--device", "--device-map", "--max-memory", "--offload-folder",
                 "--trust-remote-code")


def test_every_command_that_loads_a_model_takes_the_same_model_options() -> None:
    reference = _command("eval")
    for name in ("capture", "sweep", "plan"):
        command = _command(name)
        for flag in MODEL_OPTIONS[1:]:
            mine, theirs = _option(command, flag), _option(reference, flag)
            assert (mine.help, mine.default) == (theirs.help, theirs.default), f"{name} {flag}"
        assert "hub id" in (_option(command, "--model").help or "")
    budget = _command("budget")
    assert _option(budget, "--trust-remote-code").help == _option(reference, "--trust-remote-code").help
    assert "hub id" in (_option(budget, "--model").help or "")


def test_eval_says_what_its_bits_count(tmp_path: Path) -> None:
    """The bits line names what is not counted (the precise continuation), never 'every stored byte'."""
    source = (PACKAGE / "cli" / "eval.py").read_text(encoding="utf-8")
    assert "every stored byte counted" not in source and "not counted" in source
