"""Concurrent writers: two processes converting one GGUF file into an empty model cache, and two writers of
the same output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _tiny_gguf import write_tiny_gguf

from kvtool.errors import StoreError
from kvtool.store import CacheReader, CacheWriter, StoreHeader, verify

ROOT = Path(__file__).resolve().parents[1]

# Each process imports everything, then waits at a barrier (a file per process) so that both start
# converting within milliseconds of each other, well inside the conversion's duration.
CONVERT = r"""
import json, sys, time
from pathlib import Path
import torch
from kvtool.models import load_model
gguf, barrier, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(barrier / me).touch()
deadline = time.monotonic() + 120
while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.001)
m = load_model(str(gguf))
with torch.inference_mode():
    logits = m.model(input_ids=torch.arange(8).unsqueeze(0)).logits
print(json.dumps({"reused": m.converted_from_cache, "source": m.source, "logits": logits.sum().item()}))
"""


@pytest.mark.model
def test_two_processes_convert_one_gguf(tmp_path: Path) -> None:
    """Both succeed, one converts while the other waits for it and reuses its copy; one whole copy, nothing else."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache, barrier = tmp_path / "model-cache", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "KVTOOL_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(gguf), str(barrier), str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    runs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["reused"] for r in runs) == [False, True], runs  # converted once, not twice
    assert runs[0]["logits"] == runs[1]["logits"] and runs[0]["source"] == runs[1]["source"]
    digest = runs[0]["source"].removeprefix("sha256:")
    from importlib.metadata import version

    from kvtool.models import _from_folder

    folder = f"{digest}-transformers-{version('transformers')}"  # one copy per transformers release
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [folder, f"{folder}.lock"]  # no temporary folder
    copy = _from_folder(cache / "gguf" / folder, None, "copy", trust_remote_code=False)  # a whole, loadable copy
    assert copy.model.config.num_hidden_layers == 2


HEADER = StoreHeader(model="m", model_architecture="A", num_layers=1, num_q_heads=2, num_kv_heads=2, head_dim=4,
                     attn_scaling=0.5)


def _write(w: CacheWriter, value: float) -> None:
    w.add_sequence(np.arange(3), source=f"writer {value}")
    w.write_layer(0, 0, np.full((2, 3, 4), value), np.full((2, 3, 4), value))


def test_two_writers_of_one_output(tmp_path: Path) -> None:
    """Two captures to the same --output, interleaved: the file is always one writer's whole file; without
    --force the second never overwrites the first, with --force it replaces it whole."""
    path = tmp_path / "c.h5"
    first, second = CacheWriter(path, HEADER), CacheWriter(path, HEADER)  # both checked before either wrote
    _write(first, 1.0)
    _write(second, 2.0)
    first.commit()
    with pytest.raises(StoreError, match="another process created this file"):
        second.commit()
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]  # the loser's temporary file is gone
    with CacheReader(path) as r:
        assert r.layer(0).keys.max() == 1.0 and r.info.sequences[0].source == "writer 1.0"
    third = CacheWriter(path, HEADER, force=True)
    _write(third, 3.0)
    third.commit()
    with CacheReader(path) as r:
        assert r.layer(0).keys.max() == 3.0
    assert verify(path)["problems"] == [] and [p.name for p in tmp_path.iterdir()] == ["c.h5"]
