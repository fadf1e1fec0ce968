"""GRPO on iterative-visual-thinking trajectories (IVT Sec. 3.3): ``python -m agents.grpo train``.

- :mod:`agents.grpo.trainer`: the loop (collect, advantages, update, log, evaluate, checkpoint) and the CLI.
- :mod:`agents.grpo.config`: :class:`GRPOConfig`, every field with its meaning.
- :mod:`agents.grpo.setup`: policy, optimizer, prompt sampling and grouping (what the loop calls).
- :mod:`agents.grpo.advantages`: group-relative advantage estimators (a registry: ``@register_advantage``).
- :mod:`agents.grpo.losses`: IVT Eq. 2 with loss aggregations and KL estimators (registries).
- :mod:`agents.grpo.update`: one policy update over micro-batches.
"""

from agents.grpo.config import GRPOConfig
from agents.grpo.trainer import main, train

__all__ = ["GRPOConfig", "main", "train"]
