"""Grounding datasets: one :class:`Sample` type, a synthetic dataset that needs no download, and loaders for the
exact upstream layouts of RefCOCOg, Ref-L4 and Ref-Adv-s plus their balanced mix (see ``docs`` in each module).

``load_dataset(name, split, data_root=None, **kwargs)`` is the one entry point; ``name`` is one of
:data:`DATASET_NAMES`. Real datasets read ``data_root`` or, when it is None, the ``IVT_DATA`` environment variable.
"""

from __future__ import annotations

import importlib
from typing import Optional

from ivt_env.registries import Registry

from .base import DatasetError, GroundingDataset, ListDataset, Sample
from .records import RecordDataset
from .synthetic import SyntheticDataset
from .synthetic_language import VOCABULARY

# name -> "module:factory"; factories take (split, data_root, **kwargs). Imported lazily so a missing optional
# dependency of one loader (pyarrow) never breaks the others.
DATASETS: Registry = Registry("dataset")
DATASETS.register("synthetic", "ivt_env.datasets.synthetic:SyntheticDataset")
DATASETS.register("syntheticmulti", "ivt_env.datasets.synthetic_multi:SyntheticMultiDataset")
DATASETS.register("refcocog", "ivt_env.datasets.refcocog:RefCOCOg")
DATASETS.register("refadv", "ivt_env.datasets.refadv:RefAdv")
DATASETS.register("refl4", "ivt_env.datasets.refl4:RefL4")
DATASETS.register("mix", "ivt_env.datasets.mix:Mix")

DATASET_NAMES = tuple(DATASETS)


def _key(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    return {"refadvs": "refadv"}.get(key, key)


def dataset_splits(name: str) -> tuple[str, ...]:
    """The split names dataset ``name`` knows, e.g. ``("train", "val", "test", "all")`` for refadv (whose ``all`` is
    its whole single upstream split). Synthetic also takes any name with ``num_samples`` / ``split_sizes``."""
    key = _key(name)
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    module = importlib.import_module(DATASETS.get(key).__module__)
    if key in ("synthetic", "syntheticmulti"):
        return tuple(module.DEFAULT_SPLIT_SIZES)
    if key == "mix":
        return tuple(module.PAPER_PER_DATASET)
    return tuple(module.SPLITS)


def load_dataset(name: str, split: str = "train", data_root: Optional[str] = None, depth_dir: Optional[str] = None,
                 depth_scale: float = 1.0, **kwargs) -> GroundingDataset:
    """Build dataset ``name`` for ``split``. ``synthetic`` ignores ``data_root``; kwargs go to the dataset class.

    ``depth_dir``: a folder of depth maps aligned with the images by file name (``<image stem>.npy`` / ``.png`` /
    ``.tif``, divided by ``depth_scale``); every sample gets ``meta["load_depth"]`` (:mod:`ivt_env.depth`), for the
    env's ``depth_observation`` and the ``depth`` reward. An image without a depth map fails here, named."""
    if depth_dir is not None:
        from ivt_env.depth import attach_depth_folder

        return attach_depth_folder(load_dataset(name, split, data_root, **kwargs), depth_dir, scale=depth_scale)
    key = _key(name)
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    factory = DATASETS.get(key)
    if key in ("synthetic", "syntheticmulti"):
        return factory(split=split, **kwargs)
    return factory(split=split, data_root=data_root, **kwargs)


__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "DatasetError",
    "GroundingDataset",
    "ListDataset",
    "RecordDataset",
    "Sample",
    "SyntheticDataset",
    "VOCABULARY",
    "dataset_splits",
    "load_dataset",
]
