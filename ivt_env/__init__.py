"""IVT environments: referring-expression grounding with visual self-correction as Gymnasium envs.

Importing the package registers the env ids below. ``gym.make("ivt_env:IVT-Mix-v0")`` works without a prior
import (Gymnasium imports the module named before the colon).

=====================  ===========  =============================================================
id                     dataset      note
=====================  ===========  =============================================================
``IVT-Synthetic-v0``   synthetic    procedural scenes, no download
``IVT-RefCOCOg-v0``    refcocog     umd splits (refer pickle + instances.json, or parquet)
``IVT-RefAdv-v0``      refadv       Ref-Adv-s
``IVT-RefL4-v0``       refl4        Ref-L4 (val/test)
``IVT-Mix-v0``         mix          the paper's balanced 1:1:1 benchmark
=====================  ===========  =============================================================

Adaptive refinement: ``IVT-Synthetic-Adaptive-v0`` is ``IVT-Synthetic-v0`` with ``allow_stop=True`` (a step
whose text holds ``<stop>`` ends the episode; T = ``max_refine_steps`` stays the budget). Any id takes
``allow_stop``, ``stop_marker``, ``step_cost`` and ``reset(options={"start_box": [x1, y1, x2, y2]})``. Every id
keeps the previous box for a refinement step that ends with ``keep_marker`` (default ``Keep it.``) and has no box.

Multi-object grounding (SIFThinker's extension of the loop; :data:`MULTI_ENV_DATASETS`):
``IVT-SyntheticMulti-v0`` (dataset ``synthetic_multi``): expressions naming one to three objects, a step answers a
list of boxes, scored with HIoU (``ivt_env.boxes.hiou``); reward ``hiou`` by default; depth maps on request
(``depth_observation=True``, reward ``depth``).

Keyword arguments (``gym.make(id, split=..., max_refine_steps=..., reward_fn=..., data_root=..., ...)``) are those
of :class:`ivt_env.env.GroundingRefineEnv`. :func:`make_env` is the thunk builder every command of the project uses.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from ivt_env.boxes import ParsedBox, format_box, giou, hiou, iou, parse_box, to_norm, to_pixels
from ivt_env.env import GroundingRefineEnv
from ivt_env.rendering import Overlay, OverlayStyle, draw_box
from ivt_env.rewards import REWARDS, get_reward, ivt_reward, register_reward
from ivt_env.spaces import FreeText, ImageSpace

ENV_DATASETS = {
    "IVT-Synthetic-v0": "synthetic",
    "IVT-RefCOCOg-v0": "refcocog",
    "IVT-RefAdv-v0": "refadv",
    "IVT-RefL4-v0": "refl4",
    "IVT-Mix-v0": "mix",
    "IVT-Synthetic-Adaptive-v0": "synthetic",
}

MULTI_ENV_DATASETS = {
    "IVT-SyntheticMulti-v0": "synthetic_multi",
}
ENV_DEFAULTS = {"IVT-SyntheticMulti-v0": {"reward_fn": "hiou"}, "IVT-Synthetic-Adaptive-v0": {"allow_stop": True}}  # gym.make keyword arguments override them

from ivt_env.make import load_env_dataset, make_env  # noqa: E402  (after ENV_DATASETS, which it reads)

for _env_id, _dataset in ENV_DATASETS.items():
    if _env_id not in registry:
        register(
            id=_env_id,
            entry_point="ivt_env.env:GroundingRefineEnv",
            kwargs={"dataset": _dataset, "split": "train", "max_refine_steps": 2, **ENV_DEFAULTS.get(_env_id, {})},
        )
for _env_id, _dataset in MULTI_ENV_DATASETS.items():
    if _env_id not in registry:
        register(
            id=_env_id,
            entry_point="ivt_env.env:GroundingRefineEnv",
            kwargs={"dataset": _dataset, "split": "train", "max_refine_steps": 2, **ENV_DEFAULTS[_env_id]},
        )

__all__ = [
    "ENV_DATASETS",
    "MULTI_ENV_DATASETS",
    "FreeText",
    "GroundingRefineEnv",
    "ImageSpace",
    "Overlay",
    "OverlayStyle",
    "ParsedBox",
    "REWARDS",
    "draw_box",
    "format_box",
    "get_reward",
    "giou",
    "hiou",
    "iou",
    "ivt_reward",
    "load_env_dataset",
    "make_env",
    "parse_box",
    "register_reward",
    "to_norm",
    "to_pixels",
]
