"""A tiny in-memory dataset following the ``GroundingDataset`` protocol, for env tests that need no loader."""

from __future__ import annotations

import numpy as np

from ivt_env.datasets.base import Sample


class FakeDataset:
    """``sizes`` is a list of (height, width); sample i has a GT box in the middle half of its image.

    Images are deterministic (seeded by index) so two envs built from two instances see equal pixels.
    """

    def __init__(self, sizes=((48, 64), (40, 30), (64, 64)), name="fake", split="train"):
        self.name, self.split = name, split
        self._samples = []
        for i, (h, w) in enumerate(sizes):
            gt = (w / 4, h / 4, 3 * w / 4, 3 * h / 4)

            def load(h=h, w=w, i=i):
                return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)

            self._samples.append(
                Sample(f"fake-{i}", f"the object number {i}", gt, w, h, "fake", load, {"i": i})
            )

    def __len__(self):
        return len(self._samples)

    def __getitem__(self, index):
        return self._samples[index]

    @property
    def sample_ids(self):
        return [s.sample_id for s in self._samples]
