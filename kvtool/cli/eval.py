"""`kvtool eval`: a codec inside the model's cache — Δperplexity, KL divergence, top-1 agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvtool.cli._app import (
    DeviceMapOption,
    DeviceOption,
    MaxMemoryOption,
    ModelDtypeOption,
    ModelOption,
    OffloadFolderOption,
    TrustRemoteCodeOption,
    app,
    assignments_from_options,
    console,
    err_console,
    human_bytes,
    print_table,
    run_guarded,
    write_json,
)


@app.command("eval")
def eval_command(
    text: Annotated[Path | None, typer.Option("--text", "-t", help="UTF-8 text to score; with --task, the "
                                              "haystack the prompts are drawn from.")] = None,
    method: Annotated[list[str] | None, typer.Option("--method", help="Codec spec for keys and values; repeat "
                                                     "to compare several methods on one shared exact pass.")]
    = None,
    keys: Annotated[str | None, typer.Option("--keys", help="Codec spec for keys (overrides --method's; "
                                             "'none' keeps them exact).")] = None,
    values: Annotated[str | None, typer.Option("--values", help="Codec spec for values (overrides "
                                               "--method's).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="prefill: code the first half of each chunk once, "
                                      "append the rest precise; streaming: code tokens as they arrive.")]
    = "prefill",
    context: Annotated[int, typer.Option("--context", "-c", help="Chunk length C: the first C/2 tokens are "
                                         "the prompt, the next C/2 - 1 are scored.")] = 512,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", help="Use only the first N tokens "
                                                   "of the text.")] = None,
    model: ModelOption = "default",
    model_dtype: ModelDtypeOption = "auto",
    device: DeviceOption = None,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_folder: OffloadFolderOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the JSON report to this file "
                                                   "('-' for stdout, no table).")] = None,
    plan: Annotated[list[Path] | None, typer.Option("--plan", help="A plan file from `kvtool plan` (a codec "
                                                    "per layer, head and role), scored like a method; "
                                                    "repeatable, and may be combined with --method.")]
    = None,
    task: Annotated[str | None, typer.Option("--task", help="Run a retrieval task instead of scoring the text: "
                                             "passkey, fact, multikey or vartrack (NAME:key=value,... for "
                                             "parameters, e.g. multikey:keys=8); --text is the haystack. "
                                             "See docs/TASKS.md.")] = None,
    lengths: Annotated[str, typer.Option("--lengths", help="With --task: prompt lengths in tokens, comma-"
                                         "separated (k = 1024).")] = "1k,2k,4k",
    depths: Annotated[str, typer.Option("--depths", help="With --task: where the asked needle sits, fractions "
                                        "of the haystack (0 = first, 1 = last).")] = "0,0.25,0.5,0.75,1",
    samples: Annotated[int, typer.Option("--samples", help="With --task: prompts per (length, depth) cell.")]
    = 1,
    seed: Annotated[int, typer.Option("--seed", help="With --task: seed of the prompts (same seed, same "
                                      "prompts and answers).")] = 0,
    template: Annotated[str, typer.Option("--template", help="With --task: auto (the model's chat template when "
                                          "it has one), chat, or plain text.")] = "auto",
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="With --task: most tokens "
                                                       "generated per answer (default: the longest answer's "
                                                       "tokens + 4).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="With --task: write the depth x length accuracy "
                                              "heatmap (one panel per method) to this PNG/SVG/PDF.")] = None,
    save_base: Annotated[Path | None, typer.Option("--save-base", help="Also write the exact pass's result "
                                                   "(the final hidden states at the scored positions, "
                                                   "lossless) to this file, for later runs' --base.")] = None,
    base: Annotated[Path | None, typer.Option("--base", help="Reuse an exact base from --save-base instead of "
                                              "running the exact pass over the scored tokens; refused unless "
                                              "model, text tokens, --context and --mode match.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="A folder that keeps every finished chunk; "
                                                "run the same command again with it to continue an "
                                                "interrupted run (same report as an uninterrupted one).")]
    = None,
) -> None:
    """Score a text with the exact cache and with each codec inside the model's cache.

    llama.cpp's perplexity/KL-divergence protocol: non-overlapping chunks of --context tokens; the first half
    of each is the prompt, the second half is scored teacher-forced. Reports ppl exact and compressed,
    Δppl and ln(ppl ratio) ± stderr, KLD (mean ± stderr, median, p90, p99, max), top-1 agreement, RMS Δp and
    the bits the codecs really store.

    With --task: RULER-style retrieval prompts built from --text, the whole prompt coded as in prefill mode,
    the answer generated greedily; accuracy per (length, depth) with Wilson 95 % intervals, for the exact
    cache and each method, and each method's agreement with exact (docs/TASKS.md).
    """
    if task is not None:
        from kvtool.cli._tasks import task_command

        task_command(task=task, text=text, methods=method, keys=keys, values=values, plans=plan, mode=mode,
                     lengths=lengths, depths=depths, samples=samples, seed=seed, template=template,
                     max_new_tokens=max_new_tokens, plot=plot, json_path=json_path, model=model,
                     load_options={"dtype": model_dtype, "device": device, "device_map": device_map,
                                   "max_memory": max_memory, "offload_folder": offload_folder,
                                   "trust_remote_code": trust_remote_code})
        return

    def work() -> None:
        from kvtool.cache import MODES
        from kvtool.capture import read_text
        from kvtool.errors import InputError
        from kvtool.evaluate import check_context, tokenize_text

        if mode not in MODES:
            raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        if text is None:
            raise InputError("give --text (the text to score), or --task NAME with --text as its haystack")
        if plot is not None:
            raise InputError("--plot draws a task heatmap; use it with --task")
        from kvtool.codecs.planfile import load_plan

        plans = [load_plan(p) for p in plan or []]  # a bad plan file fails before the model loads
        assignments, labels = (assignments_from_options(method, keys, values) if method or keys or values
                               or not plans else ([], []))
        for path, p in zip(plan or [], plans, strict=True):
            assignments.append(p)
            labels.append(f"plan {path.name} ({p.budget_bits:g} bits)")
        if mode == "streaming":  # a selector that cannot stream fails before the model loads
            for a in assignments:
                a = a.assignment() if hasattr(a, "assignment") else a  # a plan
                for layer in {0, *a.layers}:
                    for role in ("keys", "values"):
                        a.codec(layer, role).streaming_form()
        if base is not None and save_base is not None:
            raise InputError("give --base or --save-base, not both")
        if base is not None:
            from kvtool.store import BaseReader

            BaseReader(base).close()  # a missing or foreign base fails before the model loads
        source = read_text(text)  # bad text fails before the slow model load
        quiet = json_path is not None and str(json_path) == "-"
        report = _run(assignments, labels, source, check_context, tokenize_text, quiet)
        write_json(report, json_path)
        if not quiet:
            _render(report)

    def _run(assignments: list[Any], labels: list[str], source: Any, check_context: Any, tokenize_text: Any,
             quiet: bool) -> Any:
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from kvtool.evaluate import evaluate
        from kvtool.models import load_model

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} passes"), TimeElapsedColumn(),
                      TextColumn("ETA"), TimeRemainingColumn(),
                      console=err_console, transient=True, disable=quiet) as bar:
            task = bar.add_task(f"loading model {model}", total=None)
            loaded = load_model(model, dtype=model_dtype, device=device, trust_remote_code=trust_remote_code,
                                device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
            tokens = tokenize_text(loaded, text, max_tokens)
            check_context(loaded, tokens, context)
            per_chunk = 1 + len(assignments)
            bar.update(task, description="scoring (exact + one pass per method per chunk)", completed=0)

            def progress(done: int, total: int) -> None:
                chunks = total // per_chunk
                bar.update(task, completed=done, total=total,
                           description=f"chunk {min(done // per_chunk + 1, chunks)}/{chunks} (exact + one pass "
                                       "per method)")

            return evaluate(loaded, tokens, assignments, mode=mode, context=context, source=source.source,
                            labels=labels, progress=progress, base=base, save_base=save_base, resume=resume)

    run_guarded(work)


def _render(r: dict[str, Any]) -> None:
    from rich import box

    console.print(f"{r['text']}: {r['chunks']} chunk(s) of {r['context']} tokens, {r['mode']} mode, "
                  f"{r['tokens_scored']} tokens scored; ppl exact {r['ppl_exact']:.4f}")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for col in ("#", "bits", "Δppl %", "KLD", "KLD p99", "top-1 %", "RMS Δp %"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, m in enumerate(r["methods"], 1):
        table.add_row(
            str(i), f"{m['bits_per_element']:.3f}",
            f"{m['delta_ppl_pct']:+.3f}±{m['delta_ppl_pct_stderr']:.3f}",
            f"{m['kld_mean']:.5f}±{m['kld_stderr']:.5f}", f"{m['kld_p99']:.4f}",
            f"{100 * m['top1_agreement']:.2f}±{100 * m['top1_agreement_stderr']:.2f}",
            f"{100 * m['rms_dp']:.3f}")
    print_table(table)
    for i, m in enumerate(r["methods"], 1):
        console.print(f"{i}: {escape(m['label'])} — ppl {m['ppl_compressed']:.4f}, ln ratio "
                      f"{m['ln_ppl_ratio']:+.5f}±{m['ln_ppl_ratio_stderr']:.5f}, cache "
                      f"{human_bytes(m['cache_bytes_exact'])} → {human_bytes(m['cache_bytes_compressed'])} "
                      f"per chunk", highlight=False)
    counted = ("what the codecs store for each chunk's prompt (coded arrays and shared state); the scored "
               "continuation is appended precise and not counted" if r["mode"] == "prefill" else
               "everything the cache holds after each chunk (coded blocks, shared state, and the 16-bit window "
               "of tokens not yet coded)")
    console.print(f"bits: stored bits per element of keys and values: {counted}; {r['seconds']:.1f} s",
                  highlight=False)
    for i, m in enumerate(r["methods"], 1):
        for note in m.get("warnings", []):
            err_console.print(f"[yellow]warning:[/] method {i}: {escape(note)}", markup=True)
