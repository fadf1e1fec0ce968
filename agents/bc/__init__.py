"""Behaviour cloning on teacher trajectories (IVT Sec. 3.2): ``python -m agents.bc train``.

- :mod:`agents.bc.trainer`: the loop (batch, loss, step, log, evaluate, checkpoint) and the CLI.
- :mod:`agents.bc.config`: :class:`BCConfig`, every field with its meaning.
- :mod:`agents.bc.setup`: policy (and its number-embedding init), data source, step counts, schedule.
- :mod:`agents.bc.data`: teacher data from a folder or synthesized online.
"""

from agents.bc.config import BCConfig
from agents.bc.setup import bc_scheduler, build_data, build_policy
from agents.bc.trainer import main, train

__all__ = ["BCConfig", "bc_scheduler", "build_data", "build_policy", "main", "train"]
