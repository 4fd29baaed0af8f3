"""Small helpers shared by several commands."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvtool.errors import InputError, raise_if_interrupted


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


# ------------------------------------------------------------------------------- writing output files
# Every file kvtool finishes goes through :func:`publish`, which notes it, so that a command interrupted
# later can say truthfully what is already on disk (``kvtool.cli._app.run_guarded``).

_WRITTEN: list[Path] = []


def written_outputs() -> list[Path]:
    """Files completed since the last :func:`forget_outputs` (in the order they were finished)."""
    return list(_WRITTEN)


def note_output(path: Path) -> None:
    """Note ``path`` as finished output without writing it here (a folder whose parts are written atomically
    one by one, such as a grid's results): an interruption then names it as kept."""
    if path not in _WRITTEN:
        _WRITTEN.append(path)


def forget_outputs() -> None:
    _WRITTEN.clear()


def os_error_reason(exc: BaseException) -> str:
    """A short reason for a failed write, naming a full disk or a file-size limit plainly.

    HDF5 reports the operating system's error inside its message ("errno = 28, ..."), Python in ``errno``.
    """
    code = getattr(exc, "errno", None)
    if code is None:
        m = re.search(r"errno = (\d+)", str(exc))
        code = int(m.group(1)) if m else None
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "no space left on the device"
    if code == errno.EFBIG:
        return "file too large: the file-size limit was reached"
    if code:
        return os.strerror(code)
    text = " ".join(str(exc).split())
    return text[:160] or type(exc).__name__


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new hidden empty file in ``path``'s directory (same file system, so a rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    return Path(tmp)


def publish(tmp: Path, path: Path, *, replace: bool = True) -> None:
    """Move the finished temporary file ``tmp`` to ``path`` in one step and note it as written.

    ``replace=False`` never overwrites: a file that appeared at ``path`` since the command started (another
    process writing the same output) raises FileExistsError instead of being clobbered. ``tmp`` is gone
    afterwards whatever happens.
    """
    raise_if_interrupted()  # a signal whose exception was swallowed must not let the file be published
    umask = os.umask(0)  # mkstemp creates 0600; give the file the permissions a plain open() would
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and fails if path exists, unlike rename
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if path.exists():
                    raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
                os.replace(tmp, path)
        _WRITTEN.append(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(path: Path | str, write: Callable[[Path], None], what: str) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary file beside it, then rename it into place.

    A failure or an interruption leaves no temporary file; an OSError (a full disk, a file-size limit,
    no permission) becomes one :class:`InputError` line naming ``what``.
    """
    p = Path(path)
    tmp: Path | None = None
    try:
        tmp = temp_beside(p)
        write(tmp)
        publish(tmp, p)
    except OSError as exc:
        raise InputError(f"{p}: cannot write {what} ({os_error_reason(exc)})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return p


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so the file is
    either absent/old or complete. Creates missing parent folders; InputError naming the path on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "the file")
