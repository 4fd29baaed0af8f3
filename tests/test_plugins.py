"""Codec plugins through the ``kvtool.codecs`` entry-point group: the example package is found, listed
with its origin and usable; a broken plugin costs one warning line and nothing else.

No network and no pip: each test lays out what an installed package leaves in site-packages — the package
and a ``*.dist-info`` folder with ``METADATA`` and ``entry_points.txt`` — in a temporary folder on
``PYTHONPATH`` and runs kvtool in a fresh interpreter (entry points are read once, on import).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from _synth_cache import HEAD_DIM, KV_HEADS, gaussian, write_cache

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "kvtool-codec-example"


def _dist(site: Path, name: str, version: str, entry_points: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[kvtool.codecs]\n{entry_points}\n")


def _site(tmp_path: Path, broken: bool) -> Path:
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE / "kvtool_codec_example", site / "kvtool_codec_example")
    _dist(site, "kvtool-codec-example", "0.1.0", "ternary = kvtool_codec_example:Ternary")
    if broken:
        _dist(site, "kvtool-broken", "0.0.1", "broken = kvtool_codec_missing:Nope")
    return site


SCRIPT = """
import json, sys
import kvtool.codecs  # entry points load here: a broken plugin's warning goes to stderr
from typer.testing import CliRunner
from kvtool.cli import app
runner = CliRunner()
out = [list(map(lambda r: (r.exit_code, r.stdout, r.stderr), [runner.invoke(app, args)]))[0]
       for args in json.loads(sys.argv[1])]
print(json.dumps(out))
"""


def _kvtool(site: Path, *commands: list[object]) -> tuple[list[tuple[int, str, str]], str]:
    """Run kvtool commands in one fresh interpreter with ``site`` on the path: ([(exit, stdout, stderr)], the
    interpreter's own stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    args = json.dumps([[str(a) for a in c] for c in commands])
    r = subprocess.run([sys.executable, "-c", SCRIPT, args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_example_plugin_is_listed_with_its_origin_and_compresses(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cache = write_cache(tmp_path / "c.h5", 2, 64, lambda i: (gaussian(rng, KV_HEADS, 64, HEAD_DIM),
                                                            gaussian(rng, KV_HEADS, 64, HEAD_DIM), None))
    site = _site(tmp_path, broken=True)
    (codecs, compress, decompress), stderr = _kvtool(
        site, ["codecs", "--json"], ["compress", cache, "--method", "ternary", "-o", tmp_path / "t.h5", "--json", "-"],
        ["decompress", tmp_path / "t.h5", "-o", tmp_path / "back.h5"])
    warnings = [line for line in stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, stderr
    assert "codec plugin 'broken' (kvtool-broken 0.0.1) was not loaded" in warnings[0]
    assert "ModuleNotFoundError" in warnings[0]

    assert codecs[0] == 0, codecs
    rows = {row["name"]: row for row in json.loads(codecs[1])}
    assert rows["ternary"]["origin"] == "plugin kvtool-codec-example 0.1.0"
    assert rows["ternary"]["parameters"] == {"threshold": {"type": "float", "default": "1"}}
    assert rows["lowrank"]["origin"] == "kvtool" and "broken" not in rows

    assert compress[0] == 0, compress
    report = json.loads(compress[1])
    assert report["keys_spec"] == "ternary:threshold=1"
    assert report["total"]["bits_per_element"] == 2 + 16 / HEAD_DIM
    assert 0.05 < report["total"]["keys"]["rel_mse"] < 0.5  # ternary codes of Gaussian data: coarse, not noise
    assert decompress[0] == 0, decompress
