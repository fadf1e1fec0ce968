"""``python -m agents.grpo train`` (also under ``torchrun --nproc_per_node K -m agents.grpo train``)."""

import sys

from agents.grpo.trainer import main

if __name__ == "__main__":
    sys.exit(main())
