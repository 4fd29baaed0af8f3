"""Long contexts: eval's time and peak memory against context, before and after sliced scoring, and the codec
table at 8k beside 2k on the bundled model.

* **Memory and time**: ``kvtool eval --context L --max-tokens L --method turboquant:bits=3`` (one chunk) at each
  L, run as a subprocess; its peak RSS from ``wait4`` (the child's own ``ru_maxrss``) and its wall time. *Before*
  is the code of ``--before`` (default: the commit this work started from, unpacked with ``git archive`` and put
  first on ``PYTHONPATH``), *after* this checkout, then this checkout again with ``--base`` (the exact base saved
  by the *after* run). Each row also checks that before and after score the same tokens with the same figures.
* **Codec table**: every spec of ``SPECS`` in one eval (one shared exact pass) over the same 8,192 tokens, once as
  one chunk of 8,192 and once as four chunks of 2,048; codecs ranked by mean KLD in each.

The text: samples/gpl-3.0.txt is 7,658 tokens for SmolLM2, under 8k, so gpl-3.0.txt followed by apache-2.0.txt
(9,882 tokens, the first 8,192 used).

* **A model with a 32k context** (``--part long-model``, results in their own files
  ``benchmarks/results/longctx.<model>.md`` + ``.json``): ``kvtool capture --queries last:128`` and ``kvtool eval``
  with ``LONG_SPECS`` on one shared exact pass, each at L = 8,192 … 32,768 tokens of samples/licences-long.txt
  (35,100 tokens for Gemma 3), a fresh process each: peak RSS, wall time, file size, Δppl, KLD, top-1.

Run: ``.venv/bin/python benchmarks/bench_longctx.py [--part before|after|table|long-model|render|all]``.
Each part but long-model stores its rows in benchmarks/results/longctx.json and renders
benchmarks/results/longctx.md from what is there. The CPU may be shared: timings are wall-clock, ratios are within
this run's rows only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvtool.codecs.planfile import Plan, save_plan

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEFORE = "0bb2243"  # the commit sliced scoring started from
LENGTHS = (1024, 2048, 4096, 8192)
MEMORY_SPEC = "turboquant:bits=3"
SPECS = ("turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true", "turboquant:bits=3",
         "turboquant:bits=4", "kivi:bits=2", "kivi:bits=4", "snapkv:keep=0.5", "snapkv:keep=0.25",
         "expected:keep=0.5", "expected:keep=0.25")
TABLE_TOKENS = 8192
TABLE_CONTEXTS = (8192, 2048)
LONG_MODEL = "gemma3-270m"
LONG_TEXT = ROOT / "samples" / "licences-long.txt"
LONG_LENGTHS = (8192, 16384, 32768)
LONG_SPECS = ("turboquant:bits=3,center=true,sink=4,norm_bits=8,unbiased=true", "expected:keep=0.5")
#: keys and values with different codecs, beside LONG_SPECS in the same eval: eval's --keys/--values would apply to
#: every --method, so the pair goes in as a uniform plan file (--plan), which eval checks against the geometry only
LONG_PAIR = ("kvquant:bits=4,outliers=0", "turboquant:bits=1.75,center=true,sink=4,norm_bits=8,unbiased=true")
#: (architecture, num_layers, num_q_heads, num_kv_heads, head_dim) of the models the pair's plan is written for
LONG_GEOMETRY = {"gemma3-270m": ("Gemma3ForCausalLM", 18, 4, 1, 256)}


def text_file(folder: Path) -> Path:
    """gpl-3.0.txt then apache-2.0.txt, one file."""
    path = folder / "gpl-3.0+apache-2.0.txt"
    parts = [(ROOT / "samples" / name).read_text(encoding="utf-8") for name in ("gpl-3.0.txt", "apache-2.0.txt")]
    path.write_text("\n\n".join(parts), encoding="utf-8")
    return path


def run_eval(args: list[str], pythonpath: Path | None = None, command: str = "eval") -> dict:
    """Run ``python -m kvtool eval ARGS``; its report plus wall seconds and the child's peak RSS (bytes)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "kvtool", command, *args,
               *(["--json", str(out)] if command == "eval" else [])]
        log = Path(d) / "stderr.txt"
        t0 = time.perf_counter()
        with open(log, "wb") as err_file:  # a file, not a pipe: a full pipe would block the child
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err_file, cwd=d)
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        err = log.read_text(errors="replace")
        if status != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({status}): {err[-2000:]}")
        report = json.loads(out.read_text()) if command == "eval" else {}
    return {"report": report, "wall_s": seconds, "peak_rss": usage.ru_maxrss * 1024}


def old_tree(commit: str, folder: Path) -> Path:
    dest = folder / "before"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", commit, "kvtool"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def load() -> dict:
    path = RESULTS / "longctx.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(data: dict) -> None:
    (RESULTS / "longctx.json").write_text(json.dumps(data, indent=1))


def memory_args(text: Path, length: int) -> list[str]:
    return ["--text", str(text), "--max-tokens", str(length), "--context", str(length), "--method", MEMORY_SPEC]


def keep(row: dict) -> dict:
    r = row["report"]
    return {"wall_s": row["wall_s"], "peak_rss": row["peak_rss"], "tokens_scored": r["tokens_scored"],
            "ppl_exact": r["ppl_exact"], "kld_mean": r["kld_mean"], "top1_agreement": r["top1_agreement"],
            "delta_ppl_pct": r["delta_ppl_pct"]}


def part_before(data: dict, text: Path, tmp: Path, commit: str, lengths: list[int]) -> None:
    src = old_tree(commit, tmp)
    rows = data.setdefault("before", {})
    for length in lengths:
        rows[str(length)] = keep(run_eval(memory_args(text, length), pythonpath=src))
        data["before_commit"] = commit
        save(data)
        print("before", length, rows[str(length)], flush=True)


def part_after(text: Path, tmp: Path, lengths: list[int], with_base: list[int]) -> None:
    for length in lengths:
        base = tmp / f"base{length}.h5"
        row = keep(run_eval([*memory_args(text, length), "--save-base", str(base)]))
        row["base_bytes"] = base.stat().st_size
        data = load()  # other parts may run at the same time: merge into what is on disk
        data.setdefault("after", {})[str(length)] = row
        save(data)
        print("after", length, row, flush=True)
        if length in with_base:
            row = keep(run_eval([*memory_args(text, length), "--base", str(base)]))
            data = load()
            data.setdefault("after_base", {})[str(length)] = row
            save(data)
            print("after --base", length, row, flush=True)


def part_table(text: Path, contexts: list[int]) -> None:
    for context in contexts:
        args = ["--text", str(text), "--max-tokens", str(TABLE_TOKENS), "--context", str(context)]
        for spec in SPECS:
            args += ["--method", spec]
        row = run_eval(args)
        r = row["report"]
        data = load()
        data.setdefault("table", {})[str(context)] = {
                                "wall_s": row["wall_s"], "peak_rss": row["peak_rss"], "chunks": r["chunks"],
                                "tokens_scored": r["tokens_scored"], "ppl_exact": r["ppl_exact"],
                                "methods": [{k: m.get(k) for k in (
                                    "label", "bits_per_element", "delta_ppl_pct", "delta_ppl_pct_stderr",
                                    "kld_mean", "kld_stderr", "kld_stderr_chunks", "kld_p99",
                                    "top1_agreement")} for m in r["methods"]]}
        save(data)
        print("table", context, row["wall_s"], flush=True)


PLAN_BITS = 3.0
PLAN_TOKENS = 4096  # tokens of samples/licences-long.txt captured for the plan: GPL-2, no file of the table's text


def part_plan_row(text: Path, tmp: Path, contexts: list[int]) -> None:
    """A plan at PLAN_BITS from a capture of another text, evaluated alone on the table's tokens at each context."""
    capture = tmp / "plan-capture.h5"
    run_eval(["--text", str(LONG_TEXT), "--max-tokens", str(PLAN_TOKENS), "--output", str(capture), "--force"],
             command="capture")
    plan = tmp / f"plan{PLAN_BITS:g}.json"
    row = run_eval([str(capture), "--budget-bits", str(PLAN_BITS), "--prescreen", "4", "--budget-tokens", "1024",
                    "--no-verify", "--output", str(plan), "--force"], command="plan")
    print("plan", row["wall_s"], flush=True)
    for context in contexts:
        row = run_eval(["--text", str(text), "--max-tokens", str(TABLE_TOKENS), "--context", str(context),
                        "--plan", str(plan)])
        r = row["report"]
        m = r["methods"][0]
        data = load()
        data.setdefault("table_plan", {})[str(context)] = {
            "wall_s": row["wall_s"], "peak_rss": row["peak_rss"], "ppl_exact": r["ppl_exact"],
            "tokens_scored": r["tokens_scored"], "plan": json.loads(plan.read_text()),
            "method": {k: m.get(k) for k in ("label", "bits_per_element", "delta_ppl_pct", "delta_ppl_pct_stderr",
                                             "kld_mean", "kld_stderr", "kld_stderr_chunks", "kld_p99",
                                             "top1_agreement")}}
        data["table_plan"][str(context)]["method"]["label"] = f"plan at {PLAN_BITS:g} bits"
        save(data)
        print("plan row", context, row["wall_s"], flush=True)


def part_capture(text: Path, tmp: Path, lengths: list[int]) -> None:
    for length in lengths:
        out = tmp / f"capture{length}.h5"
        row = run_eval(["--text", str(text), "--max-tokens", str(length), "--queries", "last:128", "--output",
                        str(out), "--force"], command="capture")
        data = load()
        data.setdefault("capture", {})[str(length)] = {"wall_s": row["wall_s"], "peak_rss": row["peak_rss"],
                                                       "file_bytes": out.stat().st_size}
        save(data)
        out.unlink()
        print("capture", length, row["wall_s"], row["peak_rss"], flush=True)


def long_path(model: str, ext: str) -> Path:
    return RESULTS / f"longctx.{model}.{ext}"


def long_load(model: str) -> dict:
    path = long_path(model, "json")
    return json.loads(path.read_text()) if path.exists() else {}


def long_store(model: str, kind: str, length: int, row: dict, previous: str | None = None) -> None:
    """Merge one row into the model's results (re-read first: several parts may run one after another).
    ``previous``: keep the row this one replaces under ``<kind>-before``, labelled with that text (a commit)."""
    data = long_load(model)
    if previous is not None and str(length) in data.get(kind, {}):
        data.setdefault(f"{kind}-before", {})[str(length)] = {**data[kind][str(length)], "code": previous}
    data.setdefault(kind, {})[str(length)] = row
    data["model"] = model
    long_path(model, "json").write_text(json.dumps(data, indent=1))
    long_path(model, "md").write_text(render_long(data))


def pair_plan(model: str, tmp: Path) -> Path:
    """A plan file giving every layer LONG_PAIR: keys and values with different codecs as one more method."""
    architecture, layers, q_heads, kv_heads, head_dim = LONG_GEOMETRY[model]
    plan = Plan(model={"model": model, "model_architecture": architecture},
                geometry={"num_layers": layers, "num_q_heads": q_heads, "num_kv_heads": kv_heads, "head_dim": head_dim},
                candidates=[], choices={i: {"keys": LONG_PAIR[0], "values": LONG_PAIR[1]} for i in range(layers)},
                source="benchmarks/bench_longctx.py: the same pair in every layer")
    return save_plan(plan, tmp / "pair.json", force=True)


def part_long_model(model: str, tmp: Path, what: list[str], lengths: list[int], specs: list[str],
                    pair: bool = True, previous: str | None = None) -> None:
    """Capture and/or eval ``model`` over the first L tokens of samples/licences-long.txt, a fresh process each;
    eval with ``specs`` and, if ``pair``, LONG_PAIR."""
    for length in lengths:
        if "capture" in what:
            out = tmp / f"capture{length}.h5"
            row = run_eval(["--model", model, "--text", str(LONG_TEXT), "--max-tokens", str(length), "--queries",
                            "last:128", "--output", str(out), "--force"], command="capture")
            long_store(model, "capture", length, {"wall_s": row["wall_s"], "peak_rss": row["peak_rss"],
                                                  "file_bytes": out.stat().st_size})
            out.unlink()
            print("capture", model, length, row["wall_s"], row["peak_rss"], flush=True)
        if "eval" in what:
            args = ["--model", model, "--text", str(LONG_TEXT), "--max-tokens", str(length), "--context", str(length)]
            for spec in specs:
                args += ["--method", spec]
            if pair and model in LONG_GEOMETRY:
                args += ["--plan", str(pair_plan(model, tmp))]
            row = run_eval(args)
            r = row["report"]
            for m in r["methods"]:
                if m["label"].startswith("plan "):
                    m["label"] = f"K {LONG_PAIR[0]} | V {LONG_PAIR[1]}"
            # the pair alone (no specs) is a series of its own: the same work at every L, for memory against L
            long_store(model, "eval" if specs else "eval-pair", length, {
                "wall_s": row["wall_s"], "peak_rss": row["peak_rss"], "tokens_scored": r["tokens_scored"],
                "ppl_exact": r["ppl_exact"], "scoring": r.get("scoring"),
                "methods": [{k: m.get(k) for k in ("label", "bits_per_element", "delta_ppl_pct",
                                                   "delta_ppl_pct_stderr", "kld_mean", "kld_stderr",
                                                   "top1_agreement")} for m in r["methods"]]}, previous)
            print("eval", model, length, row["wall_s"], row["peak_rss"], flush=True)


def render_long(data: dict) -> str:
    model = data.get("model", LONG_MODEL)
    lines = [f"# Long contexts on {model}: capture and eval up to 32k tokens", "",
             f"Written by `benchmarks/bench_longctx.py --part long-model --model {model}` (float32 on CPU). Text: the "
             "first L tokens of samples/licences-long.txt (35,100 tokens for Gemma 3's tokenizer). Each row is a "
             "fresh process; peak RSS is its `ru_maxrss`. Wall times are on 2 CPU cores shared with other jobs: "
             "compare them only within a table.", ""]
    lines += capture_table(data.get("capture", {}), "`kvtool capture --max-tokens L --queries last:128` "
                           "(float16 storage).")
    for kind, title, what in (
            ("eval", "eval: one chunk of L tokens, every method",
             "with every method on one shared exact pass"),
            ("eval-pair", "eval: one chunk of L tokens, the K/V pair alone",
             f"with only keys `{LONG_PAIR[0]}`, values `{LONG_PAIR[1]}` (as a uniform `--plan`), the same work "
             "at every L: the series for memory and time against L")):
        evals = data.get(kind, {})
        if not evals:
            continue
        lines += [f"## {title}", "",
                  f"`kvtool eval --context L --max-tokens L` {what}, prefill mode (L/2 prompt tokens coded, "
                  "L/2 − 1 scored). Δppl and KLD ± stderr per token.", "",
                  "| L | peak RSS | wall | ppl exact | method | bits | Δppl % | KLD | top-1 % |",
                  "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for length in sorted(evals, key=int):
            e = evals[length]
            for i, m in enumerate(e["methods"]):
                head = ([f"{int(length):,}", _mb(e["peak_rss"]), f"{e['wall_s'] / 60:.1f} min",
                         f"{e['ppl_exact']:.3f}"] if i == 0 else ["", "", "", ""])
                lines.append("| " + " | ".join([
                    *head, "`" + m["label"].replace("|", "\\|") + "`", f"{m['bits_per_element']:.2f}",
                    f"{m['delta_ppl_pct']:+.2f}±{m['delta_ppl_pct_stderr']:.2f}",
                    f"{m['kld_mean']:.4f}±{m['kld_stderr']:.4f}", f"{100 * m['top1_agreement']:.1f}"]) + " |")
        lines.append("")
        lines += before_lines(evals, data.get(f"{kind}-before", {}))
    return "\n".join(lines) + "\n"


def before_lines(evals: dict, before: dict) -> list[str]:
    """For each L rerun with ``--previous``: the replaced row's peak RSS beside the new one, and whether every
    method's figures (Δppl, KLD, top-1) stayed the same (relative 1e-4)."""
    lines = []
    for length in sorted(before, key=int):
        b, a = before[length], evals.get(length)
        if a is None:
            continue
        same = len(a["methods"]) == len(b["methods"]) and all(
            x["label"] == y["label"] and all(abs(x[k] - y[k]) <= 1e-6 + 1e-4 * abs(y[k])
                                             for k in ("delta_ppl_pct", "kld_mean", "top1_agreement"))
            for x, y in zip(a["methods"], b["methods"], strict=False))
        lines.append(f"- L = {int(length):,}: peak RSS {_mb(b['peak_rss'])} before ({b['code']}), {_mb(a['peak_rss'])} "
                     f"now ({a['peak_rss'] / b['peak_rss']:.2f}×); every method's Δppl, KLD and top-1 "
                     + ("the same (relative 1e-4)." if same else "NOT the same: " + "; ".join(
                         f"`{x['label']}` KLD {y['kld_mean']:.6g} → {x['kld_mean']:.6g}"
                         for x, y in zip(a["methods"], b["methods"], strict=False))))
    others = [f"{int(length):,}" for length in sorted(evals, key=int) if before and length not in before]
    if others:
        lines.append(f"- L = {', '.join(others)}: not compared with an earlier run; as measured by the code of the "
                     "commit that wrote the row.")
    return lines + ([""] if lines else [])


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def render(data: dict) -> str:
    lines = ["# Long contexts: eval memory and time, and the codec table at 8k", "",
             "Written by `benchmarks/bench_longctx.py` on the bundled SmolLM2-135M (float32, CPU, 49,152-token "
             "vocabulary). Text: samples/gpl-3.0.txt followed by samples/apache-2.0.txt (9,882 tokens; gpl-3.0 "
             "alone is 7,658, under 8k). Wall times are on 2 CPU cores shared with other jobs (load average 15-26 "
             "during these runs): *before* and *after* ran at different times under different load, so their times "
             "are not comparable; *after* and *--base* ran back to back. Peak RSS does not depend on the load.", ""]
    before, after, based = data.get("before", {}), data.get("after", {}), data.get("after_base", {})
    if before or after:
        lines += ["## eval: peak RSS and wall time against context", "",
                  f"`kvtool eval --context L --max-tokens L --method {MEMORY_SPEC}` (one chunk: L/2 prompt tokens, "
                  f"L/2 − 1 scored), each a fresh process; peak RSS is the process's `ru_maxrss`. *Before*: commit "
                  f"{data.get('before_commit', BEFORE)} (full logits); *after*: sliced scoring; *--base*: after, "
                  "reusing the exact base the after run saved.", "",
                  "| L | peak RSS before | after | after / before | --base | time before | after | --base | "
                  "base file | same figures |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for length in LENGTHS:
            b, a, g = before.get(str(length)), after.get(str(length)), based.get(str(length))
            if not (b or a):
                continue
            same = "—"
            if b and a:
                same = ("yes" if b["tokens_scored"] == a["tokens_scored"]
                        and abs(b["ppl_exact"] - a["ppl_exact"]) <= 1e-6 * b["ppl_exact"]
                        and abs(b["kld_mean"] - a["kld_mean"]) <= 1e-6 + 1e-4 * b["kld_mean"]
                        else f"no (ppl {b['ppl_exact']:.6f}/{a['ppl_exact']:.6f}, KLD {b['kld_mean']:.6g}/"
                             f"{a['kld_mean']:.6g})")
                if g and abs(g["kld_mean"] - a["kld_mean"]) > 1e-6 + 1e-4 * a["kld_mean"]:
                    same += f"; --base KLD {g['kld_mean']:.6g}"
            lines.append("| " + " | ".join([
                f"{length:,}", _mb(b["peak_rss"]) if b else "—", _mb(a["peak_rss"]) if a else "—",
                f"{a['peak_rss'] / b['peak_rss']:.2f}" if a and b else "—", _mb(g["peak_rss"]) if g else "—",
                f"{b['wall_s']:.0f} s" if b else "—", f"{a['wall_s']:.0f} s" if a else "—",
                f"{g['wall_s']:.0f} s" if g else "—", _mb(a["base_bytes"]) if a and "base_bytes" in a else "—",
                same]) + " |")
        lines.append("")
    tables = data.get("table", {})
    if tables:
        lines += render_table(tables, data.get("table_plan"))
    else:
        lines += ["## Codec table: 8k beside 2k", "",
                  "Not measured yet: on the shared CPU one 8k pass took 5-15 min, so the nine specs at 8k and at 2k "
                  "(about 20 passes each) did not fit. Run `benchmarks/bench_longctx.py --part table`.", ""]
    lines += capture_table(data.get("capture", {}), "`kvtool capture --max-tokens L --queries last:128` "
                           "(float16 storage), a fresh process each.")
    return "\n".join(lines) + "\n"


def capture_table(captured: dict, what: str) -> list[str]:
    """Peak RSS, its growth per 1k tokens, wall time and file size of each capture length (nothing if none)."""
    if not captured:
        return []
    lines = ["## capture: peak RSS against tokens", "", what, "",
             "| L | peak RSS | per 1k tokens above the smallest L | wall | file |", "|---:|---:|---:|---:|---:|"]
    first = min(captured, key=int)
    for length in sorted(captured, key=int):
        c = captured[length]
        slope = ((c["peak_rss"] - captured[first]["peak_rss"]) / ((int(length) - int(first)) / 1024)
                 if length != first else None)
        lines.append(f"| {int(length):,} | {_mb(c['peak_rss'])} | {_mb(slope) if slope is not None else '—'} | "
                     f"{c['wall_s']:.0f} s | {_mb(c['file_bytes'])} |")
    return lines + [""]


def render_table(tables: dict, planned: dict | None = None) -> list[str]:
    """The codec table; ``planned``: the plan row's runs by context (``part_plan_row``), ranked with the rest."""
    planned = planned or {}
    lines = ["## Codec table: 8k beside 2k", "",
             f"The same first {TABLE_TOKENS:,} tokens, all specs in one eval (one shared exact pass), prefill mode: "
             "one chunk of 8,192 (4,096-token prompt coded, 4,095 scored) and four chunks of 2,048 (1,024 coded, "
             "1,023 scored each). Rank: by mean KLD (1 = closest to exact). KLD ± stderr per token; in "
             "brackets, the stderr from the spread of the chunk means (2k only, 4 chunks).", "",
             "| spec | bits 8k / 2k | Δppl % 8k | KLD 8k | top-1 % 8k | rank 8k | Δppl % 2k | KLD 2k | top-1 % 2k | "
             "rank 2k |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    methods = {ctx: t["methods"] + ([planned[ctx]["method"]] if ctx in planned else []) for ctx, t in tables.items()}
    ranks = {}
    for ctx, ms in methods.items():
        order = sorted(range(len(ms)), key=lambda i: ms[i]["kld_mean"])
        ranks[ctx] = {i: r + 1 for r, i in enumerate(order)}
    specs = max(methods.values(), key=len)
    for i, m in enumerate(specs):
        bits = sorted({f"{x[i]['bits_per_element']:.2f}" for x in methods.values() if len(x) > i})
        cells = [f"`{m['label']}`" if i < len(max(tables.values(), key=lambda t: len(t["methods"]))["methods"])
                 else m["label"], " / ".join(bits)]
        for ctx in ("8192", "2048"):
            if ctx not in methods or len(methods[ctx]) <= i:
                cells += ["—"] * 4
                continue
            x = methods[ctx][i]
            kld = f"{x['kld_mean']:.4f}±{x['kld_stderr']:.4f}"
            if x.get("kld_stderr_chunks") is not None:
                kld += f" [{x['kld_stderr_chunks']:.4f}]"
            cells += [f"{x['delta_ppl_pct']:+.2f}±{x['delta_ppl_pct_stderr']:.2f}", kld,
                      f"{100 * x['top1_agreement']:.1f}", str(ranks[ctx][i])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for ctx, t in tables.items():
        lines.append(f"- context {int(ctx):,}: {t['chunks']} chunk(s), {t['tokens_scored']:,} tokens scored, ppl "
                     f"exact {t['ppl_exact']:.3f}; {t['wall_s'] / 60:.1f} min for the whole table, peak RSS "
                     f"{_mb(t['peak_rss'])}.")
    for ctx, row in planned.items():
        same = ctx in tables and abs(row["ppl_exact"] - tables[ctx]["ppl_exact"]) <= 1e-6 * row["ppl_exact"]
        lines.append(f"- plan row at context {int(ctx):,}: its own eval (the plan alone), ppl exact "
                     f"{row['ppl_exact']:.4f}" + (" — the table's, so the same tokens were scored" if same else
                                                  " — NOT the table's") + f"; {row['wall_s'] / 60:.1f} min.")
    if planned:
        row = next(iter(planned.values()))
        lines.append("- the plan: `kvtool plan CAPTURE --budget-bits "
                     f"{PLAN_BITS:g} --prescreen 4 --budget-tokens 1024` "
                     f"(the budget held at the 2k table's 1,024-token prompt) from a capture (`--queries last:128`) "
                     f"of the first {PLAN_TOKENS:,} tokens of samples/licences-long.txt (GNU GPL-2: another text than "
                     "the table's GPL-3 and Apache-2.0, though the GPLs share much wording); bits: at 8k / 2k. "
                     "Its layers' codecs: " + plan_summary(row["plan"]) + ".")
    if "8192" in methods and "2048" in methods:
        n = min(len(methods["8192"]), len(methods["2048"]))
        a = [ranks["8192"][i] for i in range(n)]
        b = [ranks["2048"][i] for i in range(n)]
        rho = 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / (n * (n * n - 1))
        moved = [f"`{specs[i]['label']}` {b[i]}→{a[i]}" for i in range(n) if a[i] != b[i]]
        lines += ["", f"**Ranking 8k vs 2k** ({n} rows): Spearman ρ = {rho:.2f}; "
                  + ("identical." if not moved else "rank 2k→8k changed for " + ", ".join(moved) + ".")]
    lines.append("")
    return lines


def plan_summary(plan: dict) -> str:
    """'keys SPEC ×n, ...; values SPEC ×n, ...' from a plan file's JSON."""
    parts = []
    for role in ("keys", "values"):
        counts: dict[str, int] = {}
        for choice in plan["choices"].values():
            counts[choice[role]] = counts.get(choice[role], 0) + 1
        ranked = sorted(counts.items(), key=lambda x: -x[1])
        parts.append(f"{role} " + ", ".join(f"`{spec}` ×{n}" for spec, n in ranked))
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("before", "after", "table", "plan-row", "capture", "long-model",
                                                 "render", "all"),
                        default="all")
    parser.add_argument("--before", default=BEFORE, help="the commit whose eval is 'before'")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="contexts of before/after")
    parser.add_argument("--with-base", default="8192", help="contexts at which after is rerun with --base")
    parser.add_argument("--contexts", default=",".join(map(str, TABLE_CONTEXTS)), help="contexts of the table")
    parser.add_argument("--model", default=LONG_MODEL, help="long-model: the model (a 32k context)")
    parser.add_argument("--what", default="capture,eval", help="long-model: capture, eval or both")
    parser.add_argument("--long-lengths", default=",".join(map(str, LONG_LENGTHS)), help="long-model: the L")
    parser.add_argument("--specs", default=";".join(LONG_SPECS), help="long-model: eval's methods, ';'-separated")
    parser.add_argument("--no-pair", action="store_true", help="long-model: eval without LONG_PAIR")
    parser.add_argument("--previous", default=None,
                        help="long-model: keep the eval rows this run replaces, labelled with this text (the code "
                             "they came from), and show their peak RSS and figures beside the new ones")
    args = parser.parse_args()
    if args.part == "long-model":
        with tempfile.TemporaryDirectory() as d:
            part_long_model(args.model, Path(d), args.what.split(","),
                            [int(x) for x in args.long_lengths.split(",")], [x for x in args.specs.split(";") if x],
                            pair=not args.no_pair, previous=args.previous)
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        text = text_file(tmp)
        if args.part in ("before", "all"):
            part_before(load(), text, tmp, args.before, lengths)
        if args.part in ("after", "all"):
            part_after(text, tmp, lengths, [int(x) for x in args.with_base.split(",") if x])
        if args.part in ("table", "all"):
            part_table(text, [int(x) for x in args.contexts.split(",")])
        if args.part in ("plan-row", "all"):
            part_plan_row(text, tmp, [int(x) for x in args.contexts.split(",")])
        if args.part in ("capture", "all"):
            part_capture(text, tmp, lengths)
    (RESULTS / "longctx.md").write_text(render(load()))


if __name__ == "__main__":
    main()
