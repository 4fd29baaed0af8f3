"""Property: however a real cache is damaged (bytes flipped in HDF5's metadata or in data chunks, the file cut
short, attributes of the wrong type), `inspect --verify`, `compress` and `analyze` either exit 2 with one line
or run and report exactly what the undamaged file gives. Never a traceback, never silently different numbers.

A few seconds in `make test` (derandomized, 10 examples). A longer, random run::

    KVTOOL_FUZZ_EXAMPLES=500 .venv/bin/pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from _cli import run
from _real_cache import rewrite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("KVTOOL_FUZZ_EXAMPLES", "0"))
COMMANDS = {
    "inspect": ["inspect", "{f}", "--verify", "--json"],
    "inspect-table": ["inspect", "{f}"],
    "compress": ["compress", "{f}", "--method", "kivi:bits=4", "--json", "-"],
    "analyze": ["analyze", "{f}", "--layers", "0-1", "--json", "-"],
}
# What a correct run must reproduce: the figures, not the file name, timing or free-text fields.
COMPARED = {"inspect": ("layers",), "compress": ("layers", "total"), "analyze": ("layers", "summary")}

ATTRIBUTES = ["/:kvtool_schema", "/:kind", "/:num_layers", "/:num_q_heads", "/:num_kv_heads", "/:head_dim",
              "/:dtype", "/:attn_scaling", "/:model", "/sequences/0:source", "/sequences/0:text_sha256",
              "/sequences/0:num_tokens", "/sequences/0/layers/1:layer_type", "/sequences/0/layers/1:key_start",
              "/sequences/0/layers/1:sliding_window", "/sequences/0/layers/2/keys:kvtool_scalar"]
WRONG = [b"\xff\xfe", "x", "", 1.5, -1, 0, 2**62, float("nan"), float("inf"), True, [1, 2], [[0.5]]]


class Original(tuple):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example: keep it short
        return f"Original({self[0].name})"


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, dict, list[tuple[int, int]], np.ndarray]:
    """A real 3-layer cache (the SmolLM2 sample's first layers), the reports it gives, its data chunks
    (offset, size) and the offsets of every byte outside them (HDF5's metadata)."""
    path = rewrite(tmp_path_factory.mktemp("fuzz") / "cache.h5", layers=3)
    reports = {name: _figures(name, _run(name, path)) for name in COMMANDS}
    assert all(code == 0 for code, _ in reports.values()), reports
    chunks = []
    with h5py.File(path) as f:
        f.visititems(lambda _n, o: chunks.extend(
            (o.id.get_chunk_info(i).byte_offset, o.id.get_chunk_info(i).size) for i in range(o.id.get_num_chunks()))
            if isinstance(o, h5py.Dataset) else None)
    metadata = np.ones(path.stat().st_size, bool)
    for start, size in chunks:
        metadata[start:start + size] = False
    return Original((path, reports, chunks, np.flatnonzero(metadata)))


def _run(name: str, path: Path) -> tuple[int, object]:
    r = run(*[a.replace("{f}", str(path)) for a in COMMANDS[name]])
    bug = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    assert bug is None, f"{name}: traceback {bug!r}"
    assert "Traceback" not in r.output
    if r.exit_code != 0:
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1, (name, r.exit_code, r.stderr)
        return r.exit_code, lines[0]
    if name not in COMPARED:
        return 0, None
    return 0, json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{name}: {c} in JSON"))


def _figures(name: str, result: tuple[int, object]) -> tuple[int, object]:
    code, data = result
    if code or name not in COMPARED:
        return result
    return code, {k: data[k] for k in COMPARED[name]}  # type: ignore[index]


damage = st.one_of(
    st.tuples(st.just("flip-metadata"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("flip-data"), st.floats(0, 1), st.integers(1, 255), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("attribute"), st.sampled_from(ATTRIBUTES), st.sampled_from(WRONG)),
)


def _damage(path: Path, chunks: list[tuple[int, int]], metadata: np.ndarray, how: tuple) -> None:
    data = bytearray(path.read_bytes())
    kind = how[0]
    if kind == "flip-metadata":  # a byte outside every data chunk: superblock, object headers, indices, heaps
        at = int(metadata[int(how[1] * (len(metadata) - 1))])
        if at < len(data):  # (an earlier step may have cut the file short)
            data[at] ^= how[2]
    elif kind == "flip-data":
        start, size = chunks[int(how[1] * (len(chunks) - 1))]
        at = start + int(how[1] * 7919) % size
        for k in range(at, min(at + how[3], start + size, len(data))):
            data[k] ^= how[2]
    elif kind == "truncate":
        del data[int(how[1] * (len(data) - 1)):]
    if kind != "attribute":
        path.write_bytes(bytes(data))
        return
    where, name = how[1].split(":")
    with h5py.File(path, "a") as f:  # attribute edits run first, on a file still whole
        f[where].attrs[name] = np.asarray(how[2]) if isinstance(how[2], list) else how[2]


@settings(max_examples=EXAMPLES or 10, deadline=None, derandomize=not EXAMPLES, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(how=st.lists(damage, min_size=1, max_size=3))
def test_damaged_cache_never_gives_a_traceback(original, how: list[tuple]) -> None:
    path, reports, chunks, metadata = original
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "damaged.h5"
        shutil.copyfile(path, bad)
        for step in sorted(how, key=lambda step: step[0] != "attribute"):
            _damage(bad, chunks, metadata, step)
        for name in COMMANDS:
            code, data = _figures(name, _run(name, bad))
            if code == 0:  # a correct run: the damage did not touch what this command reads
                assert data == reports[name][1], f"{name}: exit 0 with different figures after {how}"
