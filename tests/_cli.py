"""CLI test helpers shared by the command test files: run kvtool in-process, check one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from kvtool.cli import app

runner = CliRunner()


def run(*args: object):
    """Invoke ``kvtool ARGS...`` through typer's CliRunner (stdout and stderr kept apart)."""
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:
    """Assert a user error: exit ``code``, exactly one non-blank stderr line, no traceback; return the line."""
    assert result.exit_code == code, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def assert_one_line_error(result, fragment: str, code: int = 2) -> None:
    """:func:`one_line_error` whose line contains ``fragment``."""
    line = one_line_error(result, code)
    assert fragment in line, line
