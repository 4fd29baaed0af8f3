"""The plan file: a codec spec for each layer's keys and values, the model and geometry it was made for.

:class:`Plan` is the data type every runner consumes — ``compress --plan``, ``eval --plan``,
``kvtool.CodecCache(model, plan)`` — through :meth:`Plan.assignment`, the
:class:`~kvtool.codecs.assignment.Assignment` it stands for. The planner that writes plans
(:mod:`kvtool.plan`) sits on top of the measuring machinery; this module sits low, beside
:mod:`kvtool.codecs.assignment`, so the runners never depend on the planner.

JSON form (``kvtool_plan`` = :data:`PLAN_VERSION`): :meth:`Plan.to_json`, :meth:`Plan.from_json`,
:func:`load_plan`, :func:`save_plan`; docs/PLAN.md describes every field.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtool.codecs.assignment import Assignment
from kvtool.codecs.base import ROLES
from kvtool.errors import CodecError, InputError
from kvtool.report import json_safe
from kvtool.util import atomic_write

if TYPE_CHECKING:  # for the annotation only: a plan never reads a cache file
    from kvtool.store import StoreInfo

PLAN_VERSION = 1
PLAN_FIELD = "kvtool_plan"
#: the model geometry a plan records and checks
GEOMETRY = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")


@dataclass
class Plan:
    """A codec spec for each layer's keys and values (``heads[...]`` where heads differ), and where it
    came from. JSON form: :meth:`to_json`; see docs/PLAN.md."""

    model: dict[str, str]
    geometry: dict[str, int]
    candidates: list[str]
    choices: dict[int, dict[str, str]]
    budget_bits: float = 0.0
    objective: str = "attention"
    granularity: str = "layer"  # what `kvtool plan` chooses per: "layer" (its default) or "head"
    source: str = ""
    tokens: int = 0
    predicted: dict[str, Any] = field(default_factory=dict)
    observe: int = 0  # queries the codecs were fitted with; the errors were measured on the rest

    def assignment(self) -> Assignment:
        """The :class:`Assignment` of this plan: the most common spec of each role as the default, the
        other layers as overrides."""
        defaults = {r: Counter(c[r] for c in self.choices.values()).most_common(1)[0][0] for r in ROLES}
        layers = {i: {r: c[r] for r in ROLES if c[r] != defaults[r]} for i, c in self.choices.items()}
        return Assignment(defaults["keys"], defaults["values"], {i: v for i, v in layers.items() if v})

    def check(self, info: StoreInfo, where: str | Path) -> None:
        """Raise InputError unless ``info`` (a cache's metadata) has this plan's model and geometry."""
        self.check_model(info.model, info.model_source, info.model_architecture, where)
        self.check_geometry({g: int(getattr(info, g)) for g in GEOMETRY}, where)

    def check_model(self, model: str, model_source: str, architecture: str, where: str | Path) -> None:
        mine = self.model
        same = (mine.get("model_source") == model_source if mine.get("model_source") and model_source
                else mine.get("model") == model and mine.get("model_architecture") == architecture)
        if not same:
            raise InputError(f"the plan was made for model {mine.get('model')!r} "
                             f"({mine.get('model_source') or mine.get('model_architecture')}), but {where} "
                             f"holds {model!r} ({model_source or architecture})")

    def check_geometry(self, geometry: Mapping[str, int], where: str | Path) -> None:
        wrong = {g: (self.geometry.get(g), geometry.get(g)) for g in GEOMETRY
                 if self.geometry.get(g) != geometry.get(g)}
        if wrong:
            detail = ", ".join(f"{g} {a} vs {b}" for g, (a, b) in wrong.items())
            raise InputError(f"the plan's geometry does not match {where}: {detail} (plan vs file)")

    def to_json(self) -> dict[str, Any]:
        return json_safe({PLAN_FIELD: PLAN_VERSION, "model": self.model, "geometry": self.geometry,
                          "candidates": self.candidates, "budget_bits": self.budget_bits,
                          "objective": self.objective, "granularity": self.granularity,
                          "source": self.source, "tokens": self.tokens, "observe": self.observe,
                          "choices": {str(i): dict(c) for i, c in sorted(self.choices.items())},
                          "predicted": self.predicted})

    @classmethod
    def from_json(cls, data: Any, where: str | Path = "plan") -> Plan:
        """Validate and load a plan's JSON form; InputError names what is wrong."""
        if not isinstance(data, dict) or PLAN_FIELD not in data:
            raise InputError(f"{where}: not a kvtool plan file (no {PLAN_FIELD!r} field)")
        if data[PLAN_FIELD] != PLAN_VERSION:
            raise InputError(f"{where}: plan version {data[PLAN_FIELD]!r} is not supported; this kvtool "
                             f"reads version {PLAN_VERSION}")
        try:
            geometry = {g: int(data["geometry"][g]) for g in GEOMETRY}
            model = {k: str(data["model"].get(k, "")) for k in ("model", "model_source", "model_architecture")}
            choices = {int(i): {r: str(c[r]) for r in ROLES} for i, c in data["choices"].items()}
            plan = cls(model, geometry, [str(c) for c in data.get("candidates", [])], choices,
                       float(data.get("budget_bits", 0.0)), str(data.get("objective", "")),
                       str(data.get("granularity", "")), str(data.get("source", "")),
                       int(data.get("tokens", 0)), dict(data.get("predicted", {})), int(data.get("observe", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{where}: malformed kvtool plan ({type(exc).__name__}: {exc})") from None
        if sorted(choices) != list(range(geometry["num_layers"])):
            raise InputError(f"{where}: the plan must choose for layers 0..{geometry['num_layers'] - 1}, "
                             f"it names {sorted(choices)}")
        try:
            plan.assignment().validate(geometry["head_dim"], geometry["num_layers"])
        except CodecError as exc:
            raise InputError(f"{where}: {exc}") from None
        return plan


def load_plan(path: Path | str) -> Plan:
    """Read and validate a plan file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a kvtool plan file ({exc})") from None
    return Plan.from_json(data, path)


def save_plan(plan: Plan, path: Path | str, *, force: bool = False) -> Path:
    """Write ``plan`` as JSON, atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} exists; use --force to overwrite it")
    text = json.dumps(plan.to_json(), indent=2, allow_nan=False) + "\n"
    # temp file + rename (util.atomic_write): a full disk or an interruption leaves nothing partial
    atomic_write(path, lambda tmp: tmp.write_text(text), "the plan")
    return path
