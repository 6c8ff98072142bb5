"""``python -m recoveryd``: the same as the ``recoveryd`` command."""

import sys

from recoveryd.cli import main

if __name__ == "__main__":
    sys.exit(main())
