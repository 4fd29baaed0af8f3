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


class GateFailed(KvtoolError):
    """A regression gate failed (``kvtool check``)."""

    exit_code = 1
