"""``python -m labkit.labs.ablations``: Lab 03's ablation sweep from a terminal (see :mod:`.command`)."""
import sys

from labkit.labs.ablations.command import main

if __name__ == "__main__":
    sys.exit(main())
