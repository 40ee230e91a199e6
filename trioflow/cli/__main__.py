"""``python -m trioflow.cli``: the ``trioflow`` command, like ``python -m trioflow``."""

import sys

from trioflow.cli import main

sys.exit(main())
