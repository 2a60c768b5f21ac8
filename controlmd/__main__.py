"""``python -m controlmd ARGS`` is the ``controlmd`` command."""

import sys

from controlmd.cli import main

sys.exit(main())
