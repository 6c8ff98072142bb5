"""``python -m recoveryd``: the same as the ``recoveryd`` command."""

import sys

from recoveryd.cli import main

sys.exit(main())
