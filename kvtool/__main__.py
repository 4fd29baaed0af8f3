"""``python -m kvtool``: the same as the ``kvtool`` console script."""

from kvtool.cli import main

main()
