"""RULER-style retrieval tasks with a codec in the cache (``kvtool eval --task NAME``).

One module per task kind (``passkey``, ``fact``, ``multikey``, ``vartrack``), the prompt generator they share
(:mod:`kvtool.tasks.core`), scoring (:mod:`kvtool.tasks.scoring`), the runner (:mod:`kvtool.tasks.run`,
imports torch) and the heatmap (:mod:`kvtool.tasks.plot`, imports matplotlib)::

    from kvtool.models import load_model
    from kvtool.tasks import run_tasks
    loaded = load_model("default")
    report = run_tasks(loaded, "passkey", "samples/gpl-3.0.txt", ["turboquant:bits=3", "streaming:keep=0.25"],
                       lengths=[1024, 2048], depths=[0, 0.5, 1], samples=2, seed=0)
    report["methods"][0]["accuracy"], report["exact"]["accuracy"]

A task spec is ``NAME`` or ``NAME:key=value,...`` (``multikey:keys=8``); docs/TASKS.md lists the kinds.
"""

from __future__ import annotations

from typing import Any

from kvtool.tasks.core import Haystack, Prompt, Task, TaskSample, build_prompts, parse_depths, parse_lengths
from kvtool.tasks.kinds import TASKS, parse_task


def __getattr__(name: str) -> Any:
    if name == "run_tasks":  # torch and transformers: only when asked for
        from kvtool.tasks.run import run_tasks

        return run_tasks
    raise AttributeError(f"module 'kvtool.tasks' has no attribute {name!r}")


__all__ = ["TASKS", "Haystack", "Prompt", "Task", "TaskSample", "build_prompts", "parse_depths", "parse_lengths",
           "parse_task", "run_tasks"]
