"""``python -m qprep``: the same command line as the ``qprep`` console script."""

from qprep.cli import main

raise SystemExit(main())
