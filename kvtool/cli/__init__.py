"""The kvtool command line: one module per command, each parsing options, calling one library function and
rendering the result. :data:`app` is the Typer application (the ``kvtool`` console script).

Adding a command: write ``kvtool/cli/<command>.py`` whose functions register on ``kvtool.cli._app.app``, and
add the module name to ``_COMMANDS`` below (the order is the order of ``kvtool --help``).
"""

from __future__ import annotations

import importlib

from kvtool.cli._app import app, console, err_console, human_bytes, layer_progress, run_guarded, write_json

_COMMANDS = ["capture", "inspect", "compress", "analyze", "eval", "lmeval", "sweep", "plan", "check", "budget",
             "grid", "report"]

for _name in _COMMANDS:
    importlib.import_module(f"{__name__}.{_name}")


def main() -> None:  # pragma: no cover - console script entry
    app()


__all__ = ["app", "console", "err_console", "human_bytes", "layer_progress", "main", "run_guarded", "write_json"]
