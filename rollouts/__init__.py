"""What moves trajectories: the policy contract, the group collector, trajectory dataclasses, storage, replay.

Names are imported lazily, so ``import rollouts.types`` does not pull in gymnasium or PIL.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Policy": "rollouts.policy",
    "PolicyOutput": "rollouts.policy",
    "SamplingParams": "rollouts.policy",
    "Step": "rollouts.types",
    "Trajectory": "rollouts.types",
    "Collector": "rollouts.collector",
    "collect_groups": "rollouts.collector",
    "save_trajectories": "rollouts.storage",
    "load_trajectories": "rollouts.storage",
    "TrajectoryFileError": "rollouts.storage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rollouts' has no attribute {name!r}")
