"""`kvtool sweep` and `kvtool plan` on real caches: the frontier, sweep speed, and plans against uniform specs.

Three parts, each writing its own result file (``--parts`` picks some):

* ``frontier`` — ``sweep`` of the ``default`` preset over every layer of the GPL-3 capture, scored in the
  model too (``--eval-text`` = the same text, first 1,024 tokens, chunks of 512): the table and
  ``benchmarks/results/sweep_frontier.png`` → ``benchmarks/results/sweep.md``.
* ``speed`` — one ``sweep`` of N specs against N separate ``compress`` runs (library calls in this process,
  so model-free imports are paid once by both) on the same layers, interleaved over ``--rounds`` rounds; the
  ratio of medians → appended to ``sweep.md``.
* ``plans`` — for each capture (GPL-3 and Apache-2.0, 2,048 tokens, last 128 queries):
  every uniform spec of a broad set (the ``quant`` and ``plan`` presets plus fractional TurboQuant) is
  measured by ``sweep`` (compress's figures) and scored in the model on held-out tokens (GPL-3 tokens
  2048–6143, one chunk of 4,096: a 2,048-token prompt like the captures, which neither capture holds); the
  plan is measured once (``plan`` preset, ``--prescreen 4``, per head), the layers' KL sensitivities are
  measured on the capture's own text, and at 2.5 / 3.0 / 3.25 / 4.0 stored bits the plans (attention and kld
  objectives) are solved at the budget and at exactly the bytes of the best uniform spec that fits it,
  compressed (measured attention-output error and bytes) and scored in the model on the held-out tokens
  (KLD, Δppl; one exact pass shared by every method) → ``benchmarks/results/plan.md``.

Intermediate results are kept in ``--work`` (default ``out/bench_plan``), so a part can be re-rendered or
resumed. Run (captures ``out/gpl2048.h5`` and ``out/apache2048.h5`` first when missing; the plans part takes
about an hour of CPU time on 2 cores)::

    .venv/bin/python benchmarks/bench_plan.py [--parts frontier speed plans] [--gpl CACHE] [--apache CACHE]
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import ensure_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGETS = (2.5, 3.0, 3.25, 4.0)
#: plans scored in the model at each budget (the KLD table's columns); every plan is compressed
IN_MODEL = ("kld@uniform-kld", "attention@uniform-kld", "kld@budget", "attention@budget")
SPEED_FAMILIES = ("turboquant", "kivi", "uniform", "polarquant", "qjl", "fp8")
SAMPLES = {"gpl-3.0": ROOT / "samples" / "gpl-3.0.txt", "apache-2.0": ROOT / "samples" / "apache-2.0.txt"}
#: uniform baselines beyond the presets: TurboQuant's fractional widths (§4.3), plain and centred
FRACTIONAL = [f"turboquant:bits={b}{extra}" for b in (1.5, 2.5, 2.75, 3.5) for extra in ("", ",center=true,sink=1")]
#: held-out scoring: GPL-3 tokens 2048..6143 (after the part the GPL capture holds) as one chunk of 4,096 —
#: its prompt is 2,048 tokens, the captures' length, so every codec stores for as many tokens as it was
#: planned for (KIVI's 128-token fp16 window or a sink weigh differently on a shorter prompt); 2,047 scored
HELD_OUT = (2048, 6144)
EVAL_CONTEXT = 4096
SENS_TOKENS, SENS_CONTEXT = 1024, 512  # sensitivities: the capture's own text, 2 chunks of 512


def _json(path: Path, make: Any) -> Any:
    """Load ``path`` if it exists, else compute ``make()`` and keep it there."""
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value, indent=1))
    return value


def _pickle(path: Path, make: Any) -> Any:
    if path.exists():
        return pickle.loads(path.read_bytes())
    value = make()
    path.write_bytes(pickle.dumps(value))
    return value


# ------------------------------------------------------------------------------------------- frontier


def part_frontier(cache: Path, work: Path) -> list[str]:
    from kvtool.sweep import EvalText, plot_frontier, sweep

    report = _json(work / "sweep_default.json", lambda: sweep(
        cache, ["default"], eval_text=EvalText(SAMPLES["gpl-3.0"], max_tokens=1024, context=512)))
    plot_frontier(report, RESULTS / "sweep_frontier.png")
    lines = [f"`kvtool sweep` of the `default` preset ({len(report['results'])} specs) over all 30 layers of the "
             f"GPL-3 capture (2,048 tokens, last 128 queries), {report['seconds']:.0f} s on the shared machine; "
             f"in the model on the same text ({report['eval']['chunks']} chunks of {report['eval']['context']} "
             "tokens, prefill). ★: on the Pareto frontier of stored bits against the attention-output error / "
             "against KLD. Selectors at `keep=0.5` are scored on the held-out half of the queries "
             f"(`observe` = {report['query_split']['observe']}, as compress's default for them).", "",
             "![frontier](sweep_frontier.png)", "",
             "*eval bits* are what each codec stored in the model's cache on the eval's 256-token prompts (the KLD "
             "frontier's axis): a codebook or basis fitted on a prompt is amortised over it, so `pq`/`vq` at 8 "
             "bits — exact there, with more centroids than tokens — pay for it in bits.", "",
             "| spec | stored bits | attention-output error | ★ | eval bits | KLD | ★ | Δppl % |",
             "|---|---:|---:|:-:|---:|---:|:-:|---:|"]
    for r in report["results"]:
        e = r["eval"]
        lines.append(f"| `{r['spec']}` | {r['stored_bits']:.3f} | {r['error']:.4f} | {'★' if r['frontier'] else ''} "
                     f"| {e['bits_per_element']:.3f} | {e['kld_mean']:.5f} | {'★' if r['frontier_kld'] else ''} "
                     f"| {e['delta_ppl_pct']:+.2f} |")
    return lines


# ------------------------------------------------------------------------------------------- speed


def part_speed(cache: Path, rounds: int, layers: list[int], n_specs: int) -> list[str]:
    from kvtool.codecs import parse_pair
    from kvtool.codecs.presets import preset
    from kvtool.compress import compress
    from kvtool.sweep import sweep

    # quantizers of the default preset: a learned codebook's k-means (pq, vq) or an age band's costs the same
    # in both and would only dilute what sharing saves
    specs = [s for s in preset("default") if s.startswith(SPEED_FAMILIES)][:n_specs]
    t_sweep, t_compress = [], []

    def run_sweep() -> None:
        started = time.perf_counter()
        sweep(cache, specs, layers=layers)
        t_sweep.append(time.perf_counter() - started)

    def run_compress() -> None:
        started = time.perf_counter()
        for spec in specs:
            compress(cache, *parse_pair(spec), layers=layers)
        t_compress.append(time.perf_counter() - started)

    run_sweep(), run_compress()  # warm-up (imports, first reads), not counted
    t_sweep.clear(), t_compress.clear()
    for r in range(rounds):  # the order alternates, so neither side always runs on a warmer machine
        for side in ((run_sweep, run_compress) if r % 2 == 0 else (run_compress, run_sweep)):
            side()
    ms, mc = statistics.median(t_sweep), statistics.median(t_compress)
    return ["", "### Sweep time against separate compress runs", "",
            f"{len(specs)} specs ({', '.join(f'`{s}`' for s in specs)}) on layers {layers[0]}–{layers[-1]} of the "
            f"GPL-3 capture; a warm-up, then {rounds} interleaved rounds in alternating order, library calls in "
            "one process (so imports are paid "
            "once by both), on the shared 2-core machine.", "",
            "| | median s | all rounds s |", "|---|---:|---|",
            f"| one `sweep` of {len(specs)} specs | {ms:.1f} | {', '.join(f'{t:.1f}' for t in t_sweep)} |",
            f"| {len(specs)} × `compress` | {mc:.1f} | {', '.join(f'{t:.1f}' for t in t_compress)} |", "",
            f"**One sweep takes {ms / mc:.2f}× the time of {len(specs)} separate compress runs.** "
            "It saves each layer's read and its exact attention (the logits, softmax, top-k and outputs of "
            "the queries), which every compress run repeats; each codec's own fit/encode/decode and its "
            "compressed attention still cost the same, so the gain is bounded by the reference's share."]


# ------------------------------------------------------------------------------------------- plans


def _uniform_set() -> list[str]:
    from kvtool.codecs.presets import expand

    return expand(["quant", "plan", *FRACTIONAL])


def _uniform_sweep(cache: Path, info_cache: Path) -> dict[str, Any]:
    """``sweep`` of the uniform set, only the specs that fit the largest budget kept (no other can be the best
    uniform spec at any budget). Rows of an earlier run's ``uniform_sweep.json`` (every spec of the set, the
    same capture: a sweep is deterministic) are reused; the specs it lacks are swept now."""
    from kvtool.sweep import sweep

    specs = _uniform_set()
    earlier = info_cache / "uniform_sweep.json"
    rows = {r["spec"]: r for r in json.loads(earlier.read_text())["results"]} if earlier.exists() else {}
    # another capture of the same model and length already swept: stored bits depend on the geometry and the
    # token count only, so the specs that cannot fit any budget are known without coding them again
    known = {}
    for other in info_cache.parent.glob("*/uniform_sweep_bits.json"):
        known.update(json.loads(other.read_text()))
    missing = [s for s in specs if s not in rows and known.get(s, 0.0) <= max(BUDGETS)]
    report = sweep(cache, missing) if missing else {"results": []}
    rows.update({r["spec"]: r for r in report["results"]})
    (info_cache / "uniform_sweep_bits.json").write_text(json.dumps({s: r["stored_bits"] for s, r in rows.items()}))
    kept = sorted((rows[s] for s in specs if s in rows and rows[s]["stored_bits"] <= max(BUDGETS)),
                  key=lambda r: r["stored_bits"])
    return {"results": kept, "swept_now": missing, "specs": len(specs)}


def _plan_text(name: str, cache: Path, work: Path) -> dict[str, Any]:
    """Every figure of one capture: uniform specs, plans at each budget, measured and scored."""
    from kvtool.codecs.assignment import Assignment
    from kvtool.compress import compress
    from kvtool.evaluate import evaluate, tokenize_text
    from kvtool.plan import make_plan, measure, reference_choices, sensitivities, sensitivity_table
    from kvtool.sweep import EvalText, load_eval

    info_cache = work / f"{name}"
    info_cache.mkdir(exist_ok=True)
    uniform = _json(info_cache / "uniform.json", lambda: _uniform_sweep(cache, info_cache))
    # "v2": the plan preset with TurboQuant's current variant (center=true,sink=4,norm_bits=8,unbiased=true)
    m = _pickle(info_cache / "measure_v2.pkl", lambda: measure(cache, ["plan"], granularity="head", prescreen=4))
    own = EvalText(SAMPLES[name], max_tokens=SENS_TOKENS, context=SENS_CONTEXT)
    lm_own, tok_own = load_eval(m.info, own)
    tok_held = tokenize_text(lm_own, SAMPLES["gpl-3.0"])[HELD_OUT[0]:HELD_OUT[1]]

    def model_tokens(setup: str) -> tuple[Any, Any]:
        return (lm_own, tok_held) if setup == "held" else (lm_own, tok_own)

    def uniform_eval() -> dict[str, Any]:
        lm, tok = model_tokens("held")
        specs = [r["spec"] for r in uniform["results"]]
        return evaluate(lm, tok, [Assignment.of(s, s) for s in specs], context=EVAL_CONTEXT, labels=specs)

    u_eval = _json(info_cache / "uniform_eval.json", uniform_eval)
    u_kld = {row["label"]: row for row in u_eval["methods"]}

    def sens() -> dict[str, Any]:
        lm, tok = model_tokens("own")
        return sensitivities(m, lm, tok, own, reference_choices(m, 3.0))

    s = _json(info_cache / "sensitivity_v3.json", sens)  # v3: per layer and role
    weights = sensitivity_table(s["sensitivity"])
    def plan_rows(mm: Any, tag: str) -> list[dict[str, Any]]:
        rows = []
        for budget in BUDGETS:
            fitting = [r for r in uniform["results"] if r["stored_bits"] <= budget]
            best_att = min(fitting, key=lambda r: r["error"])
            best_kld = min(fitting, key=lambda r: u_kld[r["spec"]]["kld_mean"])
            plans = {}
            for objective, sens_w in (("attention", None), ("kld", weights)):
                plans[f"{objective}@budget"] = make_plan(mm, budget, objective=objective, sensitivity=sens_w)
                for label, u in (("att", best_att), ("kld", best_kld)):
                    # the plan held to the uniform spec's own stored bits (its bytes, rounded down)
                    plans[f"{objective}@uniform-{label}"] = make_plan(mm, u["stored_bits"], objective=objective,
                                                                      sensitivity=sens_w)

            def measured(plans: dict = plans) -> dict[str, Any]:
                out = {k: compress(cache, plan=p)["total"] for k, (p, _) in plans.items()}
                lm, tok = model_tokens("held")
                scored_plans = [k for k in plans if k in IN_MODEL]  # the ones the KLD table shows
                scored = evaluate(lm, tok, [plans[k][0] for k in scored_plans], context=EVAL_CONTEXT,
                                  labels=scored_plans)
                return {"compress": out, "eval": {row["label"]: row for row in scored["methods"]}}

            meas = _json(info_cache / f"plans{tag}_{budget:g}.json", measured)
            rows.append({"budget": budget, "best_att": best_att, "best_kld": best_kld, "u_kld": u_kld,
                         "plans": {k: acc["predicted"] for k, (_, acc) in plans.items()}, "measured": meas})
        return rows

    m_layer = _pickle(info_cache / "measure_layer.pkl",
                      lambda: measure(cache, ["plan"], granularity="layer", prescreen=4))
    return {"name": name, "rows": {"head": plan_rows(m, ""), "layer": plan_rows(m_layer, "_layer")},
            "sensitivity": s, "measure_seconds": {"head": m.seconds, "layer": m_layer.seconds},
            "dropped": m.dropped, "candidates": m.candidates, "uniform_specs": len(uniform["results"])}


def _pm(row: dict[str, Any]) -> str:
    return f"{row['kld_mean']:.4f}±{row['kld_stderr']:.4f}"


def _gain(plan: float, base: float) -> str:
    return f"{100 * (1 - plan / base):+.0f} %" if base > 0 else "—"


def part_plans(caches: dict[str, Path], work: Path) -> list[str]:
    lines = ["For each capture (2,048 tokens, last 128 queries) `kvtool plan` measured the `plan` preset "
             "(`--prescreen 4`) once per KV head and once per layer; every uniform spec of a broad set "
             "(`quant` + `plan` presets + fractional TurboQuant, same spec for keys and values in every layer) "
             "was measured by `sweep` "
             "(compress's figures); those at ≤ 4 stored bits (no other can be the best at a budget) were also "
             "scored in the model. In-model figures (`kvtool eval`, prefill) are on GPL-3 tokens 2048–6143 as one "
             "chunk of 4,096: a 2,048-token prompt (the captures' length, so each codec stores for as many tokens "
             "as it was planned for) and 2,047 scored tokens that neither capture holds (for the Apache plan a "
             "different text altogether). The KL sensitivities of `--objective kld` come from the capture's own "
             "text (its first 1,024 tokens, 2 chunks of 512). "
             "Bits are stored bits per element, arrays and shared state. `plan@u` is the plan held to exactly "
             "the bytes of the uniform spec it is compared with (equal stored bits); `plan@b` uses the whole "
             "budget. Gains are `1 − plan / uniform`.", ""]
    for name, cache in caches.items():
        d = _plan_text(name, cache, work)
        sens = d["sensitivity"]
        secs = d["measure_seconds"]
        lines += [f"### Plans made on the {name} capture", "",
                  f"Measuring {len(d['candidates'])} kept candidates (prescreen dropped {len(d['dropped'])}: "
                  f"{', '.join(d['dropped'])}) took {secs['head']:.0f} s per KV head, {secs['layer']:.0f} s per "
                  f"layer; sensitivities with `{sens['reference']}`: {sens['eval']['seconds']:.0f} s.", ""]
        for gran, title in (("head", "per KV head (`--granularity head`)"),
                            ("layer", "per layer (`--granularity layer`)")):
            rows = d["rows"][gran]
            lines += [f"**KLD, plans {title}** (best uniform chosen by its measured KLD on the held-out text):", "",
                      "| budget | best uniform | bits | KLD | plan@u, kld: KLD | gain | plan@u, attention: KLD | gain "
                      "| plan@b, kld: bits | KLD | gain | plan@b, attention: KLD | gain | Δppl % uniform → "
                      "plan@b kld / attention |",
                      "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for row in rows:
                u, ev = row["best_kld"], row["measured"]["eval"]
                uk = row["u_kld"][u["spec"]]
                pk, pa, pb = ev["kld@uniform-kld"], ev["attention@uniform-kld"], ev["kld@budget"]
                pab = ev.get("attention@budget")  # not scored in runs before it was added
                bits_b = row["measured"]["compress"]["kld@budget"]["bits_per_element_with_state"]
                ab = (f"{_pm(pab)} | {_gain(pab['kld_mean'], uk['kld_mean'])}" if pab else "— | —")
                lines.append(
                    f"| {row['budget']:g} | `{u['spec']}` | {u['stored_bits']:.3f} | {_pm(uk)} | {_pm(pk)} | "
                    f"{_gain(pk['kld_mean'], uk['kld_mean'])} | {_pm(pa)} | {_gain(pa['kld_mean'], uk['kld_mean'])} "
                    f"| {bits_b:.3f} | {_pm(pb)} | {_gain(pb['kld_mean'], uk['kld_mean'])} | {ab} | "
                    f"{uk['delta_ppl_pct']:+.2f} → {pb['delta_ppl_pct']:+.2f} / "
                    f"{format(pab['delta_ppl_pct'], '+.2f') if pab else '—'} |")
            lines += ["",
                      f"**Attention-output error, plans {title}**, on the capture (best uniform chosen by its measured "
                      "error; measured by `compress`):", "",
                      "| budget | best uniform | bits | error | plan@u att: bits | error | gain | plan@b att: bits | "
                      "error | gain | predicted |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for row in rows:
                u, c = row["best_att"], row["measured"]["compress"]
                pu, pb = c["attention@uniform-att"], c["attention@budget"]
                lines.append(
                    f"| {row['budget']:g} | `{u['spec']}` | {u['stored_bits']:.3f} | {u['error']:.4f} | "
                    f"{pu['bits_per_element_with_state']:.3f} | {pu['attention_output_rel_error']:.4f} | "
                    f"{_gain(pu['attention_output_rel_error'], u['error'])} | "
                    f"{pb['bits_per_element_with_state']:.3f} | {pb['attention_output_rel_error']:.4f} | "
                    f"{_gain(pb['attention_output_rel_error'], u['error'])} | "
                    f"{row['plans']['attention@budget']['attention_output_rel_error']:.4f} |")
            lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["frontier", "speed", "plans"],
                        choices=["frontier", "speed", "plans"])
    parser.add_argument("--gpl", type=Path, default=ROOT / "out" / "gpl2048.h5")
    parser.add_argument("--apache", type=Path, default=ROOT / "out" / "apache2048.h5")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench_plan")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speed-layers", type=int, default=6, help="layers 0..N-1 for the speed part")
    parser.add_argument("--speed-specs", type=int, default=8)
    parser.add_argument("--texts", nargs="+", default=["gpl-3.0", "apache-2.0"], choices=["gpl-3.0", "apache-2.0"],
                        help="captures the plans part makes plans on")
    args = parser.parse_args()
    ensure_cache(args.gpl, "gpl-3.0")
    ensure_cache(args.apache, "apache-2.0")
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "frontier" in args.parts or "speed" in args.parts:
        lines = part_frontier(args.gpl, args.work) if "frontier" in args.parts else []
        if "speed" in args.parts:
            lines += part_speed(args.gpl, args.rounds, list(range(args.speed_layers)), args.speed_specs)
        (RESULTS / "sweep.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {RESULTS / 'sweep.md'}")
    if "plans" in args.parts:
        caches = {"gpl-3.0": args.gpl, "apache-2.0": args.apache}
        lines = part_plans({t: caches[t] for t in args.texts}, args.work)
        (RESULTS / "plan.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {RESULTS / 'plan.md'}")


if __name__ == "__main__":
    main()
