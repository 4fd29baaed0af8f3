"""Integrity benchmark: what checksums cost on a real cache, and capture vs a plain forward with them on.

Write: one real cache (SmolLM2-135M over the first 2,048 tokens of samples/gpl-3.0.txt, 30 layers, queries
last:128, float16: 56 MB of arrays) written from memory by today's CacheWriter (Fletcher-32 on every
dataset, HDF5 1.10 format, disk space reserved before each write, finite values checked) and by a baseline
writer doing none of that (the writer before issue 12: same chunks, no filter, HDF5's earliest format).
Read: every layer of each file through CacheReader.layer (checksums verified where the file has them,
finite values checked in both), and ``store.verify`` (what ``inspect --verify`` does) on the checksummed
file. Both sides run interleaved, ROUNDS rounds after a warm-up; the table gives median and minimum.
Capture: at 512 and 2,048 tokens, the model's own forward, capture as it is, and capture through the
baseline writer, interleaved in the same run (as benchmarks/bench_capture.py measures capture vs forward).

Run: ``.venv/bin/python benchmarks/bench_integrity.py`` (writes benchmarks/results/integrity.md).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 7
TOKENS = 2048


def _plain_writer():
    """CacheWriter as it was before checksums, for the baseline."""
    from kvtool import store

    class PlainWriter(store.CacheWriter):
        def _reserve(self, nbytes: int, objects: int = 1) -> None:
            pass

        def _create(self, g, name, data, chunks=None) -> None:
            x = np.asarray(data)
            g.create_dataset(name, data=x, chunks=chunks if x.size else None)

        def _put(self, g, name, x) -> None:
            x = np.asarray(x)
            self._create(g, name, x.astype(self._np_dtype, copy=False), chunks=(1, max(1, x.shape[1]), x.shape[2]))

    return PlainWriter


def write(path: Path, header, tokens, layers, plain: bool) -> float:
    from kvtool import store

    cls = _plain_writer() if plain else store.CacheWriter
    saved = store.LIBVER
    store.LIBVER = None if plain else saved  # h5py's default bounds: the earliest format
    try:
        t = time.perf_counter()
        with cls(path, header, force=True) as w:
            j = w.add_sequence(tokens, source="gpl-3.0.txt", text="")
            for i, (k, v, q, qpos) in enumerate(layers):
                w.write_layer(j, i, k, v, queries=q, query_positions=qpos)
        return time.perf_counter() - t
    finally:
        store.LIBVER = saved


def read(path: Path) -> float:
    from kvtool.store import CacheReader

    t = time.perf_counter()
    with CacheReader(path) as r:
        for i in range(r.info.num_layers):
            r.layer(i)
    return time.perf_counter() - t


def capture_sides(n_tokens: int, loaded, text, rounds: int) -> dict[str, list[float]]:
    """Wall seconds per round of the plain forward, capture, and capture through the baseline writer."""
    import torch

    from kvtool import capture as cap
    from kvtool import store

    ids, _ = cap.tokenize(loaded, text, n_tokens)
    input_ids = torch.as_tensor(ids).unsqueeze(0)
    plain = _plain_writer()
    out: dict[str, list[float]] = {"forward": [], "capture": [], "capture_plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds + 1):  # round 0 warms up every side
            t = time.perf_counter()
            with torch.inference_mode():
                loaded.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            sample = {"forward": time.perf_counter() - t}
            t = time.perf_counter()
            cap.capture(loaded, [text], Path(tmp) / "c.h5", max_tokens=n_tokens, queries="last:128", force=True)
            sample["capture"] = time.perf_counter() - t
            saved_writer, saved_libver = cap.CacheWriter, store.LIBVER
            cap.CacheWriter, store.LIBVER = plain, None
            try:
                t = time.perf_counter()
                cap.capture(loaded, [text], Path(tmp) / "p.h5", max_tokens=n_tokens, queries="last:128", force=True)
                sample["capture_plain"] = time.perf_counter() - t
            finally:
                cap.CacheWriter, store.LIBVER = saved_writer, saved_libver
            if r:
                for k, v in sample.items():
                    out[k].append(v)
    return out


def main() -> None:
    import torch

    from kvtool.capture import capture, read_text
    from kvtool.models import load_model
    from kvtool.store import CacheReader, StoreHeader, verify

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    loaded = load_model("default")
    text = read_text(ROOT / "samples" / "gpl-3.0.txt")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        capture(loaded, [text], d / "src.h5", max_tokens=TOKENS, queries="last:128")
        with CacheReader(d / "src.h5") as r:
            info = r.info
            tokens = r.tokens(0)
            layers = []
            for i in range(info.num_layers):
                g = r.layer_group(i)
                layers.append((g["keys"][()], g["values"][()], g["queries"][()], g["query_positions"][()]))
        header = StoreHeader(model=info.model, model_architecture=info.model_architecture,
                             num_layers=info.num_layers, num_q_heads=info.num_q_heads,
                             num_kv_heads=info.num_kv_heads, head_dim=info.head_dim, attn_scaling=info.attn_scaling)
        nbytes = sum(a.nbytes for layer in layers for a in layer)
        times: dict[str, list[float]] = {k: [] for k in ("write", "write_plain", "read", "read_plain", "verify")}
        for r_ in range(ROUNDS + 1):  # round 0 warms up both sides
            sample = {"write_plain": write(d / "plain.h5", header, tokens, layers, plain=True),
                      "write": write(d / "sum.h5", header, tokens, layers, plain=False),
                      "read_plain": read(d / "plain.h5"), "read": read(d / "sum.h5")}
            t = time.perf_counter()
            verify(d / "sum.h5")
            sample["verify"] = time.perf_counter() - t
            if r_:
                for k, v in sample.items():
                    times[k].append(v)
        sizes = {"plain": (d / "plain.h5").stat().st_size, "sum": (d / "sum.h5").stat().st_size}
        arrays = [np.asarray(a, np.float32) for layer in layers for a in layer[:3]]
        t = time.perf_counter()
        for a in arrays:
            np.isfinite(a).all()
        finite = time.perf_counter() - t
    rows = []
    for n in (512, 2048):
        m = capture_sides(n, loaded, text, ROUNDS)
        med = {k: statistics.median(v) for k, v in m.items()}
        low = {k: min(v) for k, v in m.items()}
        rows.append(f"| {n} | {med['forward']:.3f} | {med['capture_plain']:.3f} | {med['capture']:.3f} "
                    f"| {med['capture_plain'] / med['forward']:.2f}× | **{med['capture'] / med['forward']:.2f}×** "
                    f"| {low['capture'] / low['forward']:.2f}× "
                    f"| **{med['capture'] / med['capture_plain']:.3f}×** |")

    def cell(k: str) -> str:
        return f"{statistics.median(times[k]) * 1e3:.0f} / {min(times[k]) * 1e3:.0f}"

    def ratio(a: str, b: str) -> str:
        return f"{statistics.median(times[a]) / statistics.median(times[b]):.2f}×"

    mb = nbytes / 1e6
    lines = [
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end); SmolLM2-135M-Instruct, "
        f"{TOKENS} tokens of gpl-3.0.txt, queries last:128, float16: {mb:.1f} MB of keys, values and queries "
        f"in 30 layers; {ROUNDS} interleaved rounds after a warm-up.",
        "",
        "| operation | before (no checksums), median / min ms | now, median / min ms | now ÷ before (median) |",
        "|---|---:|---:|---:|",
        f"| write the file (CacheWriter, from memory) | {cell('write_plain')} | {cell('write')} "
        f"| {ratio('write', 'write_plain')} |",
        f"| read every layer (CacheReader.layer, finite checks in both) | {cell('read_plain')} | {cell('read')} "
        f"| {ratio('read', 'read_plain')} |",
        f"| `inspect --verify` (store.verify: every chunk) | — | {cell('verify')} | — |",
        "",
        f"File size: {sizes['plain']:,} bytes before, {sizes['sum']:,} now (4 bytes of checksum per chunk; "
        f"the 1.10 format's metadata is smaller). The finite check alone (np.isfinite over every layer's "
        f"keys, values and queries as float32) took {finite * 1e3:.0f} ms.",
        "",
        "Capture (forward + recording + write) vs the model's plain forward, all three interleaved in the same "
        "run; \"before\" writes through the baseline writer, \"now\" through today's (checksums, reservation, "
        "the writer's finite check). Capture's own NaN/overflow check (one min/max pass per tensor) runs in both, "
        "so its cost shows in \"before ÷ forward\", not in \"now ÷ before\".",
        "",
        "| tokens | plain forward, median (s) | capture before, median (s) | capture now, median (s) "
        "| before ÷ forward | now ÷ forward (median) | now ÷ forward (min) | now ÷ before (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    report = "\n".join(lines)
    print(report)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "integrity.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
