"""``python -m mipp.cli``: the ``mipp`` command."""
import sys

from mipp.cli import main

if __name__ == "__main__":
    sys.exit(main())
