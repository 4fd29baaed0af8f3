"""`kvtool lm-eval`: lm-evaluation-harness tasks with a kvtool codec inside the model's cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvtool.cli._app import app, console, print_table, run_guarded, write_json


@app.command("lm-eval")
def lm_eval_command(
    tasks: Annotated[str, typer.Option("--tasks", help="lm-eval task names, comma-separated (e.g. "
                                       "hellaswag,arc_easy, or tasks of --include-path).")],
    method: Annotated[str | None, typer.Option("--method", help="Codec spec for keys and values inside the "
                                               "cache ('none' = exact, the hf backend's numbers).")] = None,
    keys: Annotated[str | None, typer.Option("--keys", help="Codec spec for keys (overrides --method's).")] = None,
    values: Annotated[str | None, typer.Option("--values", help="Codec spec for values (overrides --method's).")]
    = None,
    plan: Annotated[Path | None, typer.Option("--plan", help="A plan file from `kvtool plan` instead of "
                                              "--method.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="'default' (bundled SmolLM2-135M GGUF), a .gguf "
                                       "file, a Hugging Face model folder, or a hub id.")] = "default",
    include_path: Annotated[Path | None, typer.Option("--include-path", help="A folder of extra lm-eval task "
                                                      "YAMLs (lm-eval's --include_path).")] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples per prompt "
                                                    "(the task's default when omitted).")] = None,
    limit: Annotated[float | None, typer.Option("--limit", help="Only the first N documents per task (or a "
                                                "fraction below 1), for a quick look.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu (default), cuda or auto.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="lm-eval's random seeds (few-shot sampling).")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report (lm-eval's results and "
                                                   "configs, a kvtool header) to this file ('-' for stdout).")]
    = None,
) -> None:
    """Run lm-evaluation-harness tasks with the codec in the cache (needs the extra kvtool\\[lmeval]).

    Loglikelihood requests: the context is prefilled and coded before the continuation is scored; generate_until:
    prefill, code, generate greedily. docs/TASKS.md describes the protocol; from Python, `import kvtool.lmeval`
    registers the backend as lm-eval model "kvtool".
    """

    def work() -> None:
        from kvtool.errors import InputError

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        if not names:
            raise InputError("--tasks: give at least one lm-eval task name")
        if plan is not None and (method or keys or values):
            raise InputError("give --plan or --method/--keys/--values, not both")
        if include_path is not None and not include_path.is_dir():
            raise InputError(f"--include-path {include_path}: no such folder")
        if limit is not None and limit <= 0:
            raise InputError(f"--limit must be > 0, got {limit:g}")
        try:
            from kvtool import lmeval
        except ImportError as exc:
            raise InputError(f"kvtool lm-eval needs lm-evaluation-harness: pip install 'kvtool[lmeval]' "
                             f"({exc})") from None
        from kvtool.report import header

        results = lmeval.simple_evaluate(model, method, keys, values, None if plan is None else str(plan),
                                         tasks=names, include_path=None if include_path is None else str(include_path),
                                         num_fewshot=num_fewshot, limit=limit, device=device, seed=seed)
        report = header("lmeval", model=model, method=method, keys=keys, values=values,
                        plan=None if plan is None else str(plan), tasks=names, **results)
        write_json(report, json_path)
        if json_path is None or str(json_path) != "-":
            _render(report)

    run_guarded(work)


def _render(r: dict[str, Any]) -> None:
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    for col in ("task", "metric", "value", "stderr"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metrics in r.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name, _, filt = key.partition(",")
            se = metrics.get(f"{name}_stderr,{filt}")
            table.add_row(task, name, f"{value:.4f}", f"{se:.4f}" if isinstance(se, (int, float)) else "-")
    print_table(table)
    spec = r.get("method") or "none"
    console.print(f"model {r['model']}, method {escape(spec)} (codec inside the cache, context coded before scoring)",
                  highlight=False)
