"""``python -m agents.bc train``: behaviour cloning (see :mod:`agents.bc.trainer`)."""

import sys

from agents.bc.trainer import main

if __name__ == "__main__":
    sys.exit(main())
