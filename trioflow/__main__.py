"""``python -m trioflow``: the ``trioflow`` command."""

import sys

from trioflow.cli import main

sys.exit(main())
