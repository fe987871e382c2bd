"""``python -m slimdet ...``: the slimdet command (what torchrun starts in each process)."""

import sys

from slimdet.cli import main

if __name__ == "__main__":
    sys.exit(main())
