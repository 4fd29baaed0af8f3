"""Task kinds by name and the ``NAME:key=value`` parser (:func:`parse_task`)."""

from __future__ import annotations

from kvtool.errors import InputError
from kvtool.tasks.core import Task
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
