"""Open an HTML page in Debian's headless Chromium and report what the browser saw.

Chromium prints every console message of the page to stderr (``--enable-logging=stderr``) without its
level, so a first script, added to a copy of the page, logs ``console.error`` calls, uncaught errors and
unhandled promise rejections with a marker; uncaught errors also show as "Uncaught ..." lines.
``--dump-dom`` gives the DOM after the scripts ran (plotly's rendered ``<svg class="main-svg">`` elements).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MARK = "KVTOOL-CONSOLE-ERROR"
HOOK = (f"<script>(function(){{var e=console.error.bind(console);"
        f"console.error=function(){{console.log('{MARK} '+Array.from(arguments).join(' '));e.apply(null,arguments)}};"
        f"window.addEventListener('error',function(ev){{console.log('{MARK} '+ev.message)}});"
        f"window.addEventListener('unhandledrejection',function(ev){{console.log('{MARK} '+ev.reason)}});"
        f"}})();</script>")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Rendered:
    dom: str
    console: list[str]  # every console line
    errors: list[str]  # console errors and uncaught exceptions


def render(page: Path, work: Path, screenshot: Path | None = None, size: str = "1280,2000",
           budget_ms: int = 8000) -> Rendered:
    """Load ``page`` (a copy with the error hook, in ``work``) in headless Chromium."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    text = page.read_text(encoding="utf-8")
    hooked = work / f"hooked-{page.name}"
    hooked.write_text(re.sub(r"<head>", "<head>" + HOOK, text, count=1), encoding="utf-8")
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", f"--window-size={size}",
            f"--user-data-dir={work / 'chromium-profile'}"]
    url = hooked.resolve().as_uri()
    run = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120,
                       check=True)
    errors = [line for line in console if MARK in line or "Uncaught" in line]
    return Rendered(dom=run.stdout, console=console, errors=errors)
