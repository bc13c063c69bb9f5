"""``python -m mmoe``: the same command line as the ``mmoe`` console script."""

import sys

from mmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
