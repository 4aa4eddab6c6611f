"""``python -m coordinator.cli``: the same as the ``ember`` command."""

from coordinator.cli import main

main()
