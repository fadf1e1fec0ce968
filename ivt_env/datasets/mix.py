"""The IVT paper's balanced benchmark: a 1:1:1 mix of RefCOCOg, Ref-Adv-s and Ref-L4 (IVT Sec. 4.1: about 800 train /
170 val / 172 test per dataset; 2,400 / 510 / 505 in total in the paper).

For each source dataset and split, the records of that split (see each loader for how its splits map upstream) are
shuffled by ``np.random.default_rng([seed, crc32(source), crc32(split)])`` and the first ``per_dataset[split]``
records that pass the checks are kept (a bad record is replaced by the next one in the shuffled order, so the mix stays
balanced). Only those records' images are opened. Samples are interleaved round-robin (refcocog, refadv, refl4,
refcocog, ...), so any prefix is balanced too. Sample ids keep their source prefix (``refcocog-...``).

RefCOCOg contributes one sample per object with its first expression by default (``dataset_kwargs={"refcocog":
{"sentences": "first"}}``), so the 800 samples are 800 different objects.
"""

from __future__ import annotations

import importlib
import logging
import zlib
from collections import Counter
from typing import Optional, Sequence, Union

import numpy as np

from .base import MAX_EXPRESSION_CHARS, DatasetError, ListDataset
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .records import BadRecords, build_samples

log = logging.getLogger(__name__)

PAPER_PER_DATASET = {"train": 800, "val": 170, "test": 172}
SOURCES = ("refcocog", "refadv", "refl4")
DEFAULT_DATASET_KWARGS = {"refcocog": {"sentences": "first"}}


def _reader(name: str):
    if name not in SOURCES:
        raise DatasetError(f"mix: unknown source {name!r}; sources are {SOURCES}")
    return importlib.import_module(f"ivt_env.datasets.{name}").read_records


class Mix(ListDataset):
    """Balanced mix (see module doc). ``per_dataset``: an int, or a dict split -> count (default the paper's).

    Attributes: ``per_source`` (source -> number of samples), ``shortfall`` (source -> how many were missing),
    ``bad_counts`` (``"source: reason"`` -> dropped records met while drawing), ``fixed_counts``.
    """

    def __init__(
        self,
        split: str = "train",
        data_root: Optional[str] = None,
        *,
        sources: Sequence[str] = SOURCES,
        per_dataset: Union[int, dict, None] = None,
        seed: int = 0,
        on_bad_sample: str = "skip",
        check_images: Union[bool, str] = True,
        dataset_kwargs: Optional[dict] = None,
        max_expression_chars: int = MAX_EXPRESSION_CHARS,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if per_dataset is None:
            per_dataset = PAPER_PER_DATASET
        if isinstance(per_dataset, dict):
            if split not in per_dataset:
                raise DatasetError(f"mix: no count for split {split!r} in per_dataset={per_dataset}")
            k = int(per_dataset[split])
        else:
            k = int(per_dataset)
        kwargs = {s: dict(DEFAULT_DATASET_KWARGS.get(s, {})) for s in sources}
        for s, kw in (dataset_kwargs or {}).items():
            kwargs.setdefault(s, {}).update(kw)
        bad = BadRecords()
        fixed: Counter = Counter()
        per_source: dict[str, list] = {}
        self.shortfall: dict[str, int] = {}
        for src in sources:
            records, ann_counts, where = _reader(src)(split, data_root, **kwargs.get(src, {}))
            ann_bad = BadRecords()
            ann_bad.merge(ann_counts)
            if ann_bad and on_bad_sample == "raise":
                raise DatasetError(f"mix/{split}: bad records in the {src} annotations: {ann_bad.summary()} ({where}); "
                                   "pass on_bad_sample='skip' to drop them")
            rng = np.random.default_rng([int(seed), zlib.crc32(src.encode()), zlib.crc32(split.encode())])
            order = rng.permutation(len(records))
            src_bad = BadRecords()
            src_fixed: Counter = Counter()
            samples = build_samples(
                (records[i] for i in order),
                source=src,
                on_bad_sample=on_bad_sample,
                check_images=check_images,
                want=k,
                bad_counts=src_bad,
                fixed_counts=src_fixed,
                max_expression_chars=max_expression_chars,
                max_image_pixels=max_image_pixels,
            )
            for s in samples:
                if not s.sample_id.startswith(f"{src}-"):
                    s.sample_id = f"{src}-{s.sample_id}"
            bad.merge(ann_bad, prefix=f"{src}: ")
            bad.merge(src_bad, prefix=f"{src}: ")
            for reason, n in src_fixed.items():
                fixed[f"{src}: {reason}"] += n
            if len(samples) < k:
                self.shortfall[src] = k - len(samples)
                log.warning("mix/%s: %s has only %d usable samples of %d wanted (%s)", split, src, len(samples), k, where)
            per_source[src] = samples
        mixed = [per_source[s][i] for i in range(max(map(len, per_source.values()), default=0))
                 for s in sources if i < len(per_source[s])]
        super().__init__(mixed, name="mix", split=split, bad_counts=bad)
        self.per_source = {s: len(v) for s, v in per_source.items()}
        self.fixed_counts = dict(fixed)
        self.bad_examples = {k: list(v) for k, v in bad.examples.items()}
        self.seed = seed
        if bad:
            log.warning("mix/%s: skipped %d bad records while drawing %s", split, sum(bad.values()), bad.summary())
