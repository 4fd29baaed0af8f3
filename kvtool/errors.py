"""Errors meant for users.

Every failure caused by bad input raises a subclass of :class:`KvtoolError`; the CLI turns it into one
red line on stderr and exit code 2. Anything else reaching the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations


class KvtoolError(Exception):
    """Base class of all user-facing errors. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 2


class InputError(KvtoolError):
    """A bad argument, option value or input file (text, path, range)."""


class ModelError(KvtoolError):
    """A model spec that cannot be resolved or loaded."""


class StoreError(KvtoolError):
    """A file that is not a valid kvtool HDF5 store (missing, corrupt, wrong schema, bad shapes)."""


class CodecError(KvtoolError):
    """An unknown codec, an unknown parameter, or parameter values the codec cannot honour."""


class NonFiniteError(KvtoolError):
    """Keys, values or queries holding NaN or infinity: a damaged file, or a model (or float16 cast) that
    overflowed during capture."""


class GateFailed(KvtoolError):
    """A regression gate failed (``kvtool check``)."""

    exit_code = 1


class Interrupted(BaseException):
    """A termination signal (SIGTERM, SIGHUP) turned into an exception in the main thread, so that the
    cleanup that runs for Ctrl-C (temporary files removed) runs for it too. A BaseException, like
    KeyboardInterrupt, so ``except Exception`` blocks do not swallow it."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


# A signal's exception can be raised where Python only prints it and goes on: inside a ``__del__``, a weakref
# callback or a garbage-collection pass. The handler therefore also notes the signal here, and the places
# that must not go on after one (publishing an output file, a command's end) check the note.
_PENDING: list[int] = []


def note_signal(signum: int) -> None:
    """Record that ``signum`` arrived (called by the CLI's signal handler before it raises)."""
    _PENDING.append(signum)


def forget_signals() -> None:
    _PENDING.clear()


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again when a signal arrived but its exception was swallowed on the way."""
    if _PENDING:
        raise Interrupted(_PENDING[0])

