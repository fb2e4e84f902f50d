"""``python -m sparseconv``: see :mod:`sparseconv.cli`."""

import sys

from .cli import main

sys.exit(main(prog="python -m sparseconv"))
