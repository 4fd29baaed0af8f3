"""Capture benchmark: `capture` (forward + recording + HDF5 write) vs a plain forward, and model load times.

Both sides run in the same process on the same tokens, interleaved, REPEATS rounds after a warm-up;
the table gives the median and the minimum wall time of each side (the minimum is the least disturbed
by other processes on a shared machine) and the ratio of process CPU time. The plain
forward is the model's own call with its default attention and cache (``use_cache=True``) and, like
capture, only the last position's logits. Model load: a fresh process loading the bundled GGUF with
an empty conversion cache (first run) and again with the converted copy present (second run).

Run: ``.venv/bin/python benchmarks/bench_capture.py`` (writes benchmarks/results/capture.md).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 5
LENGTHS = (512, 2048)

LOAD_SNIPPET = """
import time
t = time.perf_counter()
import transformers, torch
from kvtool.models import load_model
t_import = time.perf_counter() - t
t = time.perf_counter()
m = load_model("default")
print(t_import, time.perf_counter() - t, m.converted_from_cache)
"""


def load_times() -> list[tuple[float, float]]:
    """(imports, load) seconds of a first and a second load of the bundled model, each in a fresh process."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "KVTOOL_CACHE_DIR": cache}
        out = []
        for expect_cached in ("False", "True"):
            res = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True, text=True,
                                 check=True)
            t_import, t_load, cached = res.stdout.split()
            if cached != expect_cached:
                raise SystemExit(f"load benchmark: expected converted_from_cache={expect_cached}, got {cached}")
            out.append((float(t_import), float(t_load)))
    return out


def capture_vs_forward(n_tokens: int, loaded, text) -> dict[str, tuple[float, float]]:
    """{"median"|"min"|"cpu": (plain, capture)} seconds."""
    import torch

    from kvtool.capture import capture, tokenize

    ids, _ = tokenize(loaded, text, n_tokens)
    input_ids = torch.as_tensor(ids).unsqueeze(0)
    plain, cap, cpu_plain, cpu_cap = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(REPEATS + 1):  # the first round warms up both paths
            t, c = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                loaded.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            t_plain, c_plain = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            capture(loaded, [text], Path(tmp) / "c.h5", max_tokens=n_tokens, queries="last:128", force=True)
            t_cap, c_cap = time.perf_counter() - t, time.process_time() - c
            if r:
                plain.append(t_plain)
                cap.append(t_cap)
                cpu_plain.append(c_plain)
                cpu_cap.append(c_cap)
    return {"median": (statistics.median(plain), statistics.median(cap)), "min": (min(plain), min(cap)),
            "cpu": (statistics.median(cpu_plain), statistics.median(cpu_cap))}


def main() -> None:
    import torch

    from kvtool.capture import read_text
    from kvtool.models import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    (imp1, first), (imp2, second) = load_times()
    loaded = load_model("default")
    text = read_text(ROOT / "samples" / "gpl-3.0.txt")
    rows = []
    for n in LENGTHS:
        m = capture_vs_forward(n, loaded, text)
        (pm, cm), (pn, cn), (pc, cc) = m["median"], m["min"], m["cpu"]
        rows.append(f"| {n} | {pm:.3f} | {cm:.3f} | **{cm / pm:.2f}×** | {pn:.3f} | {cn:.3f} | {cn / pn:.2f}× "
                    f"| {cc / pc:.2f}× |")
    lines = [
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"SmolLM2-135M-Instruct (bundled GGUF, float32 compute), queries last:128, float16 storage; "
        f"{REPEATS} interleaved rounds after a warm-up; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| tokens | plain forward, median (s) | capture incl. write, median (s) | ratio (median) "
        "| plain, min (s) | capture, min (s) | ratio (min) | ratio (CPU time) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "| model load, fresh process | `load_model` (s) | imports of torch+transformers before it (s) |",
        "|---|---:|---:|",
        f"| first run (GGUF de-quantised, converted copy saved) | {first:.2f} | {imp1:.2f} |",
        f"| second run (converted safetensors copy) | {second:.2f} | {imp2:.2f} |",
    ]
    report = "\n".join(lines)
    print(report)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "capture.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
