"""kvtool's version, in a module of its own so the low layers (store, report) can read it without importing
the package's ``__init__`` (which imports them). Keep it equal to ``version`` in pyproject.toml."""

__version__ = "0.1.0"
