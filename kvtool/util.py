"""Small helpers shared by several commands."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from kvtool.errors import InputError


def _index(text: str, spec: str, num_layers: int) -> int:
    try:
        i = int(text)
    except ValueError:
        raise InputError(f"--layers {spec!r}: {text.strip()!r} is not a layer index "
                         f"(use e.g. '0-5,29')") from None
    if not 0 <= i < num_layers:
        raise InputError(f"--layers {spec!r}: layer {i} out of range: the file holds 0..{num_layers - 1}")
    return i


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Layer indices from a spec such as ``"0-5,29"`` (ranges inclusive), sorted, without repeats.

    ``"all"`` or an empty spec selects every layer. Raises InputError naming the valid range.
    """
    text = spec.strip()
    if text in ("", "all"):
        return list(range(num_layers))
    chosen: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        if not part.strip():
            raise InputError(f"--layers {spec!r}: empty item (use e.g. '0-5,29')")
        a = _index(lo, spec, num_layers)
        b = _index(hi, spec, num_layers) if sep else a
        if b < a:
            raise InputError(f"--layers {spec!r}: range {a}-{b} runs backwards")
        chosen.update(range(a, b + 1))
    return sorted(chosen)


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so the file is
    either absent/old or complete. Creates missing parent folders; InputError naming the path on failure."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path
