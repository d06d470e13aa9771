"""``python -m labkit`` = the ``labkit`` command."""
from labkit.cli import main

raise SystemExit(main())
