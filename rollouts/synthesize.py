"""The old name of the synthesis command: ``python -m rollouts.synthesize`` runs ``python -m agents.synthesis``.

Synthesis drives policies and teachers, so it lives above them in :mod:`agents.synthesis`; ``rollouts`` imports
nothing from ``agents``, hence the command is forwarded by name at run time rather than imported here.
"""

from __future__ import annotations

import runpy
import sys

if __name__ == "__main__":
    print("note: `python -m rollouts.synthesize` is now `python -m agents.synthesis`", file=sys.stderr)
    runpy.run_module("agents.synthesis", run_name="__main__", alter_sys=True)
