"""``python -m agents.reproduce [--from-shipped] [--out DIR] [--limit N] [--seed S]``."""

import sys

from agents.reproduce.run import main

if __name__ == "__main__":
    sys.exit(main())
