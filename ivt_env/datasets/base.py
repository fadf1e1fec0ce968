"""The one sample type every dataset yields, and the dataset protocol the env consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

#: Longest referring expression a sample may have (the env's observation space bound; ``max_expression_chars``).
MAX_EXPRESSION_CHARS = 4096


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


class ListDataset:
    """An in-memory dataset over a list of :class:`Sample` (tests, benchmarks, and the base of the real loaders).

    ``bad_counts`` maps a reason (e.g. ``"empty box"``) to how many upstream records were dropped for it.
    """

    def __init__(self, samples: Sequence[Sample], name: str = "list", split: str = "test", bad_counts=None):
        self.name = name
        self.split = split
        self._samples = list(samples)
        self._ids = [s.sample_id for s in self._samples]
        self._index = {sid: i for i, sid in enumerate(self._ids)}
        if len(self._index) != len(self._ids):
            seen: set[str] = set()
            dup = next(s for s in self._ids if s in seen or seen.add(s))
            raise DatasetError(f"{name}/{split}: duplicate sample id {dup!r}")
        self.bad_counts: dict[str, int] = dict(bad_counts or {})

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:
        return self._samples[index]

    def __iter__(self):
        return iter(self._samples)

    @property
    def sample_ids(self) -> Sequence[str]:
        return self._ids

    def index_of(self, sample_id: str) -> int:
        try:
            return self._index[sample_id]
        except KeyError:
            raise KeyError(f"{self.name}/{self.split} has no sample id {sample_id!r}") from None

    @property
    def max_image_size(self) -> tuple[int, int]:
        """``(max height, max width)`` over the samples (the env sizes its image space with it); (1, 1) if empty."""
        if not self._samples:
            return (1, 1)
        return (max(s.height for s in self._samples), max(s.width for s in self._samples))

    @property
    def num_bad(self) -> int:
        return sum(self.bad_counts.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, bad={self.num_bad})"
