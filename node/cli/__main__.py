"""``python -m node.cli``: the same command line as the ``harmonode`` console script."""

from node.cli import main

main()
