"""A write that runs out of space (here: past RLIMIT_FSIZE, which fails like a full disk with EFBIG) gives one
line, exit 2, and leaves no temporary file: HDF5 caches, JSON reports and plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _real_cache import rewrite

ROOT = Path(__file__).resolve().parents[1]

# Runs in a child process: the limit must not touch pytest's own files. SIGXFSZ is ignored so that a write
# past the limit fails with EFBIG instead of killing the process; each case runs in-process through the CLI.
SCRIPT = r"""
import json, resource, signal, sys
from pathlib import Path
from typer.testing import CliRunner
from kvtool.cli import app

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
out, results = Path(sys.argv[1]), []
for name, limit, args in json.loads(sys.argv[2]):
    d = out / name
    d.mkdir()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        r = CliRunner().invoke(app, [a.replace("{d}", str(d)) for a in args])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    bug = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    results.append({"name": name, "code": r.exit_code, "stderr": r.stderr, "bug": repr(bug) if bug else None,
                    "left": sorted(str(p.relative_to(d)) for p in d.rglob("*"))})
print(json.dumps(results))
"""


def test_writes_past_a_file_size_limit(tmp_path: Path) -> None:
    src = str(rewrite(tmp_path / "in.h5", layers=8))  # 8 real layers: 1.8 MiB
    cases = [
        # the cache fails in the middle (layer ~4 of 8), the PNG on its first bytes
        ("cache", 1 << 20, ["compress", src, "--method", "fp16", "--output", "{d}/z.h5"]),
        ("plots", 2048, ["analyze", src, "--layers", "0", "--plots", "{d}/plots"]),
        # the plots (< 95 KB each) fit, the JSON (~160 KB) written after them does not
        ("after-plots", 120 << 10, ["analyze", src, "--layers", "0-2", "--plots", "{d}/plots", "--json",
                                    "{d}/a.json"]),
    ]
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = {r["name"]: r for r in json.loads(proc.stdout)}
    for name, r in results.items():
        lines = [x for x in r["stderr"].splitlines() if x.strip()]
        assert r["bug"] is None and r["code"] == 2 and len(lines) == 1, (name, r)
        assert "file too large: the file-size limit was reached" in lines[0], (name, lines)
    assert results["cache"]["left"] == [] and "z.h5: cannot write" in results["cache"]["stderr"]
    assert results["plots"]["left"] == ["plots"] and "cannot write a plot" in results["plots"]["stderr"]
    # the plots were finished and kept, the report was not, and the line says what is on disk
    after = results["after-plots"]
    assert [p for p in after["left"] if not p.endswith(".png")] == ["plots"] and len(after["left"]) == 6
    assert "a.json: cannot write JSON" in after["stderr"] and "(already written: " in after["stderr"]
    assert "ranks.png" in after["stderr"]


def test_reservations_cover_what_hdf5_writes(tmp_path: Path, monkeypatch) -> None:
    """The space reserved ahead of each write must cover HDF5's whole file (data, checksums, metadata), or
    a full disk could still fail inside HDF5: on a real cache and on compressed files with many small arrays."""
    from kvtool import store
    from kvtool.codecs import parse_spec
    from kvtool.compress import compress

    seen: list[tuple[str, int, int]] = []
    commit = store.CacheWriter.commit

    def measured(self):
        reserved = self._estimate + store.RESERVE_HEADROOM
        path = commit(self)
        seen.append((path.name, path.stat().st_size, reserved))
        return path

    monkeypatch.setattr(store.CacheWriter, "commit", measured)
    src = rewrite(tmp_path / "cache.h5", layers=3)
    for spec in ("polarquant", "snapkv:keep=0.5+turboquant:bits=3"):
        codec = parse_spec(spec)
        compress(src, codec, codec, output=tmp_path / f"{spec[:5]}.h5")
    assert len(seen) == 3
    for name, size, reserved in seen:
        assert size <= reserved, (name, size, reserved)
