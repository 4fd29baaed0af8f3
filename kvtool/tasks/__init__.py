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

from kvtool.errors import InputError
from kvtool.tasks.core import Haystack, Prompt, Task, TaskSample, build_prompts, parse_depths, parse_lengths
from kvtool.tasks.fact import Fact
from kvtool.tasks.multikey import MultiKey
from kvtool.tasks.passkey import Passkey
from kvtool.tasks.vartrack import VarTrack

#: Task kinds by name (classes, not instances).
TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Passkey, Fact, MultiKey, VarTrack)}


def parse_task(spec: str | Task) -> Task:
    """A task from ``NAME`` or ``NAME:key=value,...`` (integer parameters); InputError naming the choices."""
    if isinstance(spec, Task):
        spec.validate()
        return spec
    name, _, rest = spec.strip().partition(":")
    cls = TASKS.get(name)
    if cls is None:
        raise InputError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    fields = list(getattr(cls, "__dataclass_fields__", {}))
    kwargs: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in fields:
            raise InputError(f"task {name}: unknown parameter {part!r}; parameters: {', '.join(fields) or 'none'}")
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise InputError(f"task {name}: {key} must be a whole number, got {value!r}") from None
    task = cls(**kwargs)
    task.validate()
    return task


def __getattr__(name: str) -> Any:
    if name == "run_tasks":  # torch and transformers: only when asked for
        from kvtool.tasks.run import run_tasks

        return run_tasks
    raise AttributeError(f"module 'kvtool.tasks' has no attribute {name!r}")


__all__ = ["TASKS", "Haystack", "Prompt", "Task", "TaskSample", "build_prompts", "parse_depths", "parse_lengths",
           "parse_task", "run_tasks"]
