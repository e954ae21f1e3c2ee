"""``python -m zipvl``: the ``zipvl`` console script."""

from zipvl.cli import main

raise SystemExit(main())
