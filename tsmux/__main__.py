"""C{python -m tsmux}: the same as the C{tsmux} console script."""

from ._cli import main

main()
