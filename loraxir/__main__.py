"""``python -m loraxir``: the command line (see :mod:`loraxir.cli`)."""

from loraxir.cli import main

raise SystemExit(main())
