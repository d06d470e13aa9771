"""``python -m labkit`` = the ``labkit`` command."""
from labkit.course.cli import main

raise SystemExit(main())
