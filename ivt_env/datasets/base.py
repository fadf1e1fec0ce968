"""The one sample type every dataset yields, and the dataset protocol the env consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np


@dataclass
class Sample:
    """One referring-expression grounding example.

    ``load_image`` returns the ORIGINAL image as ``uint8`` RGB ``(H, W, 3)`` at native resolution (lazy, so a
    dataset of thousands of samples holds no pixels until used). ``gt_box`` is ``xyxy`` float pixels.
    """

    sample_id: str
    expression: str
    gt_box: tuple[float, float, float, float]
    width: int
    height: int
    source: str
    load_image: Callable[[], np.ndarray] = field(repr=False, compare=False)
    meta: dict = field(default_factory=dict, compare=False)

    def image(self) -> np.ndarray:
        return self.load_image()


class GroundingDataset(Protocol):
    """What the env needs from a dataset: a name, a length and indexed samples (``sample_ids`` for lookup)."""

    name: str
    split: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    @property
    def sample_ids(self) -> Sequence[str]: ...


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message names the file, the expected layout and its origin."""
