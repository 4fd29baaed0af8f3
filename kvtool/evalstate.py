"""An eval's progress on disk, one finished chunk at a time, so an interrupted run continues (``--resume``).

The folder holds ``run.json`` (what the run is: model, tokens, context, mode, methods — a later run must
match it) and one ``chunk-<c>.npz`` per finished chunk with the figures of :class:`ChunkResult` and, when
the run also saves an exact base, the chunk's exact side (what the model's head reads at the scored
positions). Every file is written to a temporary file and renamed, so a chunk file is complete or absent:
an interruption at any moment loses at most the chunk in progress. The report of a resumed run is built
from the same per-token figures as an uninterrupted one, so it is the same report (timings aside).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.errors import InputError
from kvtool.metrics import NEXT_TOKEN_FIELDS
from kvtool.util import atomic_write, write_text_atomic

RUN_FILE = "run.json"
STATE_VERSION = 1


@dataclass
class ChunkResult:
    """One chunk's figures, per run (method or baseline, in order): per-token statistics
    (:data:`kvtool.metrics.NEXT_TOKEN_FIELDS`, each ``(scored,)``), ``sizes`` ``(runs, 2 roles, [stored
    bytes, elements])``, ``exact_bytes`` ``(runs,)``, ``seconds`` ``(runs,)``; and the exact pass's seconds."""

    stats: list[dict[str, np.ndarray]]
    sizes: np.ndarray
    exact_bytes: np.ndarray
    seconds: np.ndarray
    seconds_exact: float
    #: per run, the codecs' warnings with their layer counts (saved with the chunk, restored on resume)
    warnings: list[dict[str, int]] = field(default_factory=list)


class EvalState:
    """The ``--resume`` folder of one run, described by ``identity`` (JSON-serialisable)."""

    def __init__(self, folder: str | Path, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"--resume {self.folder}: is a file; give a folder (created if missing)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--resume {self.folder}: cannot create the folder ({exc.strerror or exc})") from None
        wanted = {"kvtool_eval_state": STATE_VERSION, **identity}
        wanted = json.loads(json.dumps(wanted))  # tuples → lists, as they come back from the file
        run = self.folder / RUN_FILE
        if run.exists():
            try:
                found = json.loads(run.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(f"--resume {self.folder}: {RUN_FILE} is unreadable ({exc}); "
                                 "give an empty folder") from None
            differs = [k for k in wanted if found.get(k) != wanted[k]]
            if differs:
                raise InputError(f"--resume {self.folder}: it holds a run with other {', '.join(differs)}; "
                                 "repeat that run's options, or give an empty folder")
        else:
            write_text_atomic(run, json.dumps(wanted, indent=1))

    def _path(self, c: int) -> Path:
        return self.folder / f"chunk-{c:06d}.npz"

    def load(self, c: int) -> tuple[ChunkResult, np.ndarray | None] | None:
        """Chunk ``c``'s result and exact side (None if not saved), or None if the chunk is not done."""
        path = self._path(c)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                runs = int(z["sizes"].shape[0])
                stats = [{f: z[f"stats.{m}.{f}"] for f in NEXT_TOKEN_FIELDS} for m in range(runs)]
                result = ChunkResult(stats, z["sizes"], z["exact_bytes"], z["seconds"], float(z["seconds_exact"]))
                if "warnings" in z.files:
                    result.warnings = [{str(k): int(v) for k, v in w.items()}
                                       for w in json.loads(str(z["warnings"]))]
                exact = z["exact"] if "exact" in z.files else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"--resume {self.folder}: {path.name} is unreadable ({exc}); delete it to "
                             "score that chunk again") from None
        return result, exact

    def save(self, c: int, result: ChunkResult, exact: np.ndarray | None) -> None:
        arrays = {f"stats.{m}.{f}": s[f] for m, s in enumerate(result.stats) for f in NEXT_TOKEN_FIELDS}
        arrays.update(sizes=result.sizes, exact_bytes=result.exact_bytes, seconds=result.seconds,
                      seconds_exact=np.float64(result.seconds_exact), warnings=np.str_(json.dumps(result.warnings)))
        if exact is not None:
            arrays["exact"] = exact

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(self._path(c), write, f"chunk {c} of the resumable run")
