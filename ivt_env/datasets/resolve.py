"""How the env turns its ``dataset`` argument into a dataset object and bounds its image space."""

from __future__ import annotations

from typing import Optional, Sequence

from ivt_env.datasets.base import GroundingDataset


def resolve_dataset(dataset, split, data_root, dataset_kwargs) -> GroundingDataset:
    """A loaded dataset for a name (``ivt_env.datasets.load_dataset``), or ``dataset`` itself once checked."""
    if isinstance(dataset, str):
        from ivt_env.datasets import load_dataset  # late: the env module must import without the loaders

        return load_dataset(dataset, split, data_root=data_root, **dict(dataset_kwargs or {}))
    if dataset_kwargs:
        raise ValueError("dataset_kwargs only apply when dataset is a name")
    for attr in ("__len__", "__getitem__", "sample_ids"):
        if not hasattr(dataset, attr):
            raise TypeError(
                f"dataset must be a name or a GroundingDataset (missing {attr}), got {type(dataset).__name__}"
            )
    return dataset


def image_bound(dataset: GroundingDataset, given: Optional[Sequence[int]]) -> tuple[int, int]:
    """(max_height, max_width) of the image space: given, declared by the dataset, or read from its samples.

    Order: the ``max_image_size`` argument; a ``max_image_size`` attribute ``(H, W)`` on the dataset (every built-in
    dataset declares one); else every sample's ``height``/``width`` (pass ``max_image_size`` for a lazy custom
    dataset whose samples are costly to build).
    """
    bound = given if given is not None else getattr(dataset, "max_image_size", None)
    if bound is None:
        heights, widths = zip(*((s.height, s.width) for s in (dataset[i] for i in range(len(dataset)))))
        bound = (max(heights), max(widths))
    h, w = (int(v) for v in bound)
    if h < 1 or w < 1:
        raise ValueError(f"max_image_size must be two positive ints (height, width), got {bound!r}")
    return h, w
