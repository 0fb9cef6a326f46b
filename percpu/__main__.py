"""``python -m percpu``: see :mod:`percpu._cli` (``python -m percpu --help``)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
