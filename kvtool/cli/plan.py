"""`kvtool plan`: a codec per layer, KV head and role under an average stored-bits budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kvtool.cli._app import (
    CacheModelOption,
    DeviceMapOption,
    DeviceOption,
    MaxMemoryOption,
    ModelDtypeOption,
    OffloadFolderOption,
    TrustRemoteCodeOption,
    app,
    console,
    print_table,
    run_guarded,
    write_json,
)
from kvtool.cli.sweep import EvalContextOption, EvalTokensOption, eval_setup, step_progress


@app.command()
def plan(
    path: Annotated[Path, typer.Argument(help="A kvtool cache file with captured queries.")],
    specs: Annotated[list[str] | None, typer.Argument(help="More candidate specs or presets (as "
                                                      "--candidates).", show_default=False)] = None,
    budget_bits: Annotated[float, typer.Option("--budget-bits", help="Average stored bits per element of "
                                               "keys and values (arrays + shared state), at most 16.")] = 3.0,
    candidates: Annotated[list[str] | None, typer.Option(
        "--candidates", "-c", help="Candidate codec specs or preset names (default, quant, all, plan); repeat "
        "the option or list them after it. Default: the 'plan' preset.")] = None,
    objective: Annotated[str, typer.Option("--objective", help="attention (Σ per-layer squared "
                                           "attention-output error) or kld (weighted by each layer's "
                                           "measured KL sensitivity; needs --eval-text).")] = "attention",
    eval_text: Annotated[Path | None, typer.Option("--eval-text", help="Text to score in the model: each "
                                                   "layer's KL sensitivity (--objective kld), and the plan vs "
                                                   "the best uniform spec (kvtool eval, prefill).")] = None,
    eval_tokens: EvalTokensOption = 1024,
    eval_context: EvalContextOption = 512,
    model: CacheModelOption = None,
    model_dtype: ModelDtypeOption = "auto",
    device: DeviceOption = None,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_folder: OffloadFolderOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    granularity: Annotated[str, typer.Option("--granularity", help="layer (a codec per layer and role) or head "
                                             "(per layer, KV head and role: a smaller attention error, but "
                                             "measured worse in the model; docs/PLAN.md).")] = "layer",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the plan file (JSON) here; "
                                                "`compress --plan` and `eval --plan` take it.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report to this file "
                                                   "('-' for stdout, no table).")] = None,
    sequence: Annotated[int, typer.Option("--sequence", help="Sequence to measure.")] = 0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compress with the plan and with the "
                                         "best uniform spec and print the measured figures.")] = True,
    prescreen: Annotated[int, typer.Option("--prescreen", help="Measure every candidate on this many evenly "
                                           "spaced layers first and keep only those on the keys or values "
                                           "Pareto frontier there (0: measure all everywhere).")] = 4,
    budget_tokens: Annotated[int | None, typer.Option(
        "--budget-tokens", help="The prompt length (tokens) the budget must hold at: fixed costs (fp16 sinks, "
        "per-channel scales) weigh more in a shorter cache. Default: half the capture, the prompt `kvtool "
        "eval --context T` codes when T is the capture's length.", show_default=False)] = None,
    role_weights: Annotated[str, typer.Option(
        "--role-weights", help="How the attention objective weighs keys' errors against values': measure (what "
        "a unit of each costs in the model: KL with every layer's keys, then every layer's values, coded; two "
        "coded passes over --eval-text, else over the capture's own first --eval-tokens tokens, with --model or "
        "the capture's model) or equal (no model).")] = "measure",
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the plan file.")] = False,
) -> None:
    """Choose a codec for every layer's keys and values (and KV head) minimizing the error under a budget
    of average stored bits (a multiple-choice knapsack, exact DP); compare with the best uniform spec."""

    def work() -> None:
        from kvtool.errors import InputError
        from kvtool.plan import DEFAULT_CANDIDATES
        from kvtool.plan import plan as run
        from kvtool.sweep import EvalText

        if prescreen < 0:
            raise InputError(f"--prescreen must be >= 0, got {prescreen}")
        items = [*(candidates or []), *(specs or [])] or [DEFAULT_CANDIDATES]
        quiet = json_path is not None and str(json_path) == "-"
        setup = eval_setup(eval_text, eval_tokens, eval_context, model, dtype=model_dtype, device=device,
                           device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                           trust_remote_code=trust_remote_code)
        model_setup = EvalText(None, model, eval_tokens, eval_context, dtype=model_dtype, device=device,
                               device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                               trust_remote_code=trust_remote_code)
        with step_progress("measuring (layer × candidate)", quiet) as progress:
            report = run(path, budget_bits, items, objective=objective, granularity=granularity,
                         sequence=sequence, output=output, force=force, verify=verify, prescreen=prescreen,
                         budget_tokens=budget_tokens, eval_text=setup, roles=role_weights,
                         model_setup=model_setup, progress=progress)
        write_json(report, json_path)
        if not quiet:
            render_plan(report)

    run_guarded(work)


def _labels(choices: dict[str, dict[str, str]]) -> dict[str, str]:
    """A short label (#1, #2, ...) for every spec the plan uses, in order of first use."""
    from kvtool.codecs.compose.heads import head_specs

    labels: dict[str, str] = {}
    for layer in choices.values():
        for spec in layer.values():
            for part in head_specs(spec):
                labels.setdefault(part, f"#{len(labels) + 1}")
    return labels


def _cell(spec: str, labels: dict[str, str]) -> str:
    from kvtool.codecs.compose.heads import head_specs

    return " ".join(labels[p] for p in head_specs(spec))


def render_plan(r: dict[str, Any]) -> None:
    from rich import box
    from rich.markup import escape

    p, pred, best = r["plan"], r["predicted"], r["best_uniform"]
    verify = r.get("verify", {})
    console.print(f"plan for {r['source']}: budget {p['budget_bits']:g} stored bits/element = "
                  f"{r['budget_bytes']:,} bytes; objective {p['objective']}, per {p['granularity']}; "
                  f"{r['solver']} over {r['groups']} groups (unit {r['dp_unit_bytes']} B"
                  f"{', exact' if r['dp_exact'] else ', costs rounded up'})")
    labels = _labels(p["choices"])
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  caption="keys/values: the spec of each KV head (one label: every head); out err: "
                  "attention-output error ‖ô−o‖/‖o‖")
    for col in ("layer", "keys", "values", "K bits", "V bits", "out err pred", "meas"):
        table.add_column(col, justify="right" if col not in ("keys", "values") else "left",
                         overflow="fold")
    measured = {row["layer"]: row for row in verify.get("plan", {}).get("layers", [])}
    for row in pred["layers"]:
        choice = p["choices"][str(row["layer"])]
        meas = measured.get(row["layer"])
        table.add_row(str(row["layer"]), _cell(choice["keys"], labels), _cell(choice["values"], labels),
                      f"{row['keys_bits']:.2f}", f"{row['values_bits']:.2f}",
                      f"{row['attention_output_rel_error']:.4f}",
                      f"{meas['attention_output_rel_error']:.4f}" if meas else "—")
    print_table(table)
    for spec, label in labels.items():
        console.print(f"  {label} {escape(spec)}")
    summary = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                    title="attention-output error ‖ô−o‖/‖o‖, mean over layers")
    for col in ("", "stored bits", "stored bytes", "predicted", "measured"):
        summary.add_column(col, justify="left" if not col else "right", overflow="fold")

    def line(label: str, predicted: dict[str, Any], measured_: dict[str, Any] | None) -> None:
        summary.add_row(label, f"{predicted['stored_bits']:.4f}", f"{predicted['stored_bytes']:,}",
                        f"{predicted['attention_output_rel_error']:.4f}",
                        f"{measured_['attention_output_rel_error']:.4f}" if measured_ else "—")

    line("plan", pred, verify.get("plan"))
    if best is not None:
        line("best uniform", best, verify.get("best_uniform"))
    at = r.get("plan_at_uniform_bits")
    if at is not None:
        line("plan at the uniform's bits", at, None)
    console.print(summary)
    if "stored_bits_at_budget_tokens" in pred:
        console.print(f"the budget holds at a {pred['budget_tokens']:,}-token prompt (--budget-tokens): the plan "
                      f"stores {pred['stored_bits_at_budget_tokens']:.4f} bits/element there, "
                      f"{pred['stored_bits']:.4f} at the capture's {r['plan']['tokens']:,} tokens")
    roles = r.get("role_weights")
    if roles and "weights" in roles:
        console.print(f"keys' errors weigh {roles['keys_over_values']:.2f}× values' (measured in the model on "
                      f"{escape(roles['eval']['text'])}: KLD {roles['kld']['keys']:.5f} with every layer's keys "
                      f"coded, {roles['kld']['values']:.5f} with every layer's values; --role-weights)")
    elif roles:
        console.print(f"[yellow]warning:[/] {escape(roles['warning'])}")
    if "eval" in verify:
        e = verify["eval"]
        kld = p["objective"] == "kld" or "weights" in (roles or {})  # the objective estimates the KLD
        inmodel = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                        title=f"in the model: {e['text']}, {e['chunks']} chunk(s) of {e['context']} tokens")
        for col in ("", "KLD predicted" if kld else "", "KLD measured", "Δppl %", "top-1 %"):
            inmodel.add_column(col, justify="left" if not col else "right")
        for label, key, pred_ in (("plan", "plan", pred), ("best uniform", "best_uniform", best)):
            if key in verify and "eval" in verify[key]:
                m = verify[key]["eval"]
                inmodel.add_row(label, f"{pred_['objective']:.5f}" if kld else "",
                                f"{m['kld_mean']:.5f}±{m['kld_stderr']:.5f}",
                                f"{m['delta_ppl_pct']:+.3f}", f"{100 * m['top1_agreement']:.2f}")
        console.print(inmodel)
        if "eval" in verify.get("best_uniform", {}) and verify["best_uniform"]["eval"]["kld_mean"] > 0:
            gain = 1 - verify["plan"]["eval"]["kld_mean"] / verify["best_uniform"]["eval"]["kld_mean"]
            console.print(f"measured KLD {abs(gain):.1%} {'below' if gain >= 0 else 'above'} the best uniform "
                          "spec's")
        if "warning" in verify:
            console.print(f"[yellow]warning:[/] {escape(verify['warning'])}")
    if best is not None:
        console.print(f"best uniform: the candidate with the least predicted error that fits the budget, "
                      f"{escape(best['spec'])} for every layer and both roles")
    else:
        console.print("no single candidate fits the budget for every layer")
    if "plan" in verify:
        v = verify["plan"]
        ok = v["stored_bytes"] <= r["budget_bytes"]
        console.print(("within the budget" if ok else "[red]OVER the budget[/]")
                      + f": compressing with the plan stored {v['stored_bytes']:,} bytes "
                      f"({v['stored_bits']:.4f} bits/element)")
        if best is not None and "best_uniform" in verify:
            u = verify["best_uniform"]["attention_output_rel_error"]
            gain = 1 - v["attention_output_rel_error"] / u if u else 0.0
            console.print(f"measured attention-output error {abs(gain):.1%} "
                          f"{'below' if gain >= 0 else 'above'} the best uniform spec's")
    dropped = r.get("prescreen", {}).get("dropped")
    if dropped:
        console.print(f"prescreen on layers {r['prescreen']['layers']} dropped {len(dropped)} candidate(s) off "
                      f"the keys/values frontier: {escape(', '.join(dropped))}")
    if r.get("output"):
        console.print(f"wrote {r['output']}")
    console.print(f"{r['seconds']:.1f} s (measuring {r['measure_seconds']:.1f} s)")
