"""Grounding datasets: one :class:`Sample` type, a synthetic dataset that needs no download, and loaders for the
exact upstream layouts of RefCOCOg, Ref-L4 and Ref-Adv-s plus their balanced mix (see ``docs`` in each module).

``load_dataset(name, split, data_root=None, **kwargs)`` is the one entry point; ``name`` is one of
:data:`DATASET_NAMES`. Real datasets read ``data_root`` or, when it is None, the ``IVT_DATA`` environment variable.
"""

from __future__ import annotations

import importlib
from typing import Optional

from .base import DatasetError, GroundingDataset, ListDataset, Sample
from .records import RecordDataset
from .synthetic import SyntheticDataset
from .synthetic_language import VOCABULARY

# name -> "module:factory"; factories take (split, data_root, **kwargs). Imported lazily so a missing optional
# dependency of one loader (pyarrow) never breaks the others.
_REGISTRY = {
    "synthetic": "ivt_env.datasets.synthetic:SyntheticDataset",
    "refcocog": "ivt_env.datasets.refcocog:RefCOCOg",
    "refadv": "ivt_env.datasets.refadv:RefAdv",
    "refl4": "ivt_env.datasets.refl4:RefL4",
    "mix": "ivt_env.datasets.mix:Mix",
}

DATASET_NAMES = tuple(_REGISTRY)


def _key(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    return {"refadvs": "refadv"}.get(key, key)


def dataset_splits(name: str) -> tuple[str, ...]:
    """The split names dataset ``name`` knows, e.g. ``("train", "val", "test", "all")`` for refadv (whose ``all`` is
    its whole single upstream split). Synthetic also takes any name with ``num_samples`` / ``split_sizes``."""
    key = _key(name)
    if key not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(_REGISTRY)}")
    module = importlib.import_module(_REGISTRY[key].split(":")[0])
    if key == "synthetic":
        return tuple(module.DEFAULT_SPLIT_SIZES)
    if key == "mix":
        return tuple(module.PAPER_PER_DATASET)
    return tuple(module.SPLITS)


def load_dataset(name: str, split: str = "train", data_root: Optional[str] = None, **kwargs) -> GroundingDataset:
    """Build dataset ``name`` for ``split``. ``synthetic`` ignores ``data_root``; kwargs go to the dataset class."""
    key = _key(name)
    if key not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(_REGISTRY)}")
    mod_name, attr = _REGISTRY[key].split(":")
    factory = getattr(importlib.import_module(mod_name), attr)
    if key == "synthetic":
        return factory(split=split, **kwargs)
    return factory(split=split, data_root=data_root, **kwargs)


__all__ = [
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
