"""``python -m agents.synthesis``: teacher trajectories for behaviour cloning (see :mod:`agents.synthesis.cli`)."""

import sys

from agents.synthesis.cli import main

if __name__ == "__main__":
    sys.exit(main())
