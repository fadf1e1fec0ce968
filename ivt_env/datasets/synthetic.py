"""Procedural grounding scenes that need no download: 2-4 flat shapes on a plain background, one referring
expression per scene that picks out exactly one shape (language in :mod:`.synthetic_language`).

Sample ``i`` of split ``s`` is built from ``(seed, crc32(s), i)`` alone, so any index costs the same (about 0.2 ms
for the layout and expression on one core; the image, about 0.3 ms, is drawn only when ``load_image`` is called) and
each split draws from its own random stream.
Defaults follow what DESIGN.md measured as learnable by a tiny VLM on CPU: 128x128 RGB, 4 colours x 3 kinds x 2
sizes, non-overlapping shapes, the first distractor sharing the target's kind or colour.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from .base import DatasetError, Sample
from .synthetic_language import (
    COLOURS,
    EXPRESSION_TYPES,
    KINDS,
    SIZES,
    VOCABULARY,
    SceneObject,
    generate_expression,
)

__all__ = ["SyntheticConfig", "SyntheticDataset", "make_scene", "render_scene", "VOCABULARY", "DEFAULT_SPLIT_SIZES"]

DEFAULT_SPLIT_SIZES = {"train": 20000, "val": 200, "test": 200}
SCENE_MEMO = 256  # scenes a dataset keeps (SyntheticDataset.scene): more than one BC batch looks up


@dataclass
class SyntheticConfig:
    """Scene parameters (all lengths relative to the shorter image side unless named ``_px``)."""

    image_size: tuple[int, int] = (128, 128)
    """(width, height) in pixels."""
    min_objects: int = 2
    """Fewest shapes per scene."""
    max_objects: int = 4
    """Most shapes per scene."""
    size_fraction: dict = field(default_factory=lambda: {"small": 0.13, "large": 0.24})
    """Shape diameter per size class as a fraction of the shorter side (classes must not overlap after jitter)."""
    size_jitter: float = 0.08
    """Relative +- jitter of each diameter."""
    gap_px: int = 3
    """Minimum gap between two shapes' boxes (non-overlap)."""
    border_px: int = 2
    """Minimum distance of a shape to the image border."""
    same_category_prob: float = 0.85
    """Probability that the first distractor shares the target's kind or colour (more distractors: 0.4 each)."""
    margin: float = 0.04
    """Spatial-language margin as a fraction of the shorter side (see synthetic_language)."""
    background: tuple[int, int, int] = (36, 36, 40)
    """Background RGB."""
    type_weights: dict = field(
        default_factory=lambda: {"attribute": 0.35, "superlative": 0.25, "comparative": 0.15, "relation": 0.25}
    )
    """Preferred mix of expression types (a type with no unambiguous expression falls back to the others)."""

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if min(self.image_size) < 32:
            raise ValueError(f"image_size {self.image_size} too small (min side 32 px)")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        lo = self.size_fraction["small"] * (1 + self.size_jitter)
        hi = self.size_fraction["large"] * (1 - self.size_jitter)
        if lo >= hi:
            raise ValueError("size classes overlap after jitter: 'the larger ...' would be ambiguous")
        unknown = set(self.type_weights) - set(EXPRESSION_TYPES)
        if unknown:
            raise ValueError(f"unknown expression types {sorted(unknown)}; expected {EXPRESSION_TYPES}")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, d: int, fill) -> None:
    x1, y1 = x0 + d - 1, y0 + d - 1  # PIL boxes are inclusive of the last pixel
    if kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2.0, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown kind {kind!r}")


def _tight_box(kind: str, x0: int, y0: int, d: int) -> tuple[float, float, float, float]:
    """Pixel-edge box of the pixels the shape actually covers (drawn on a d x d mask)."""
    mask = Image.new("L", (d, d), 0)
    _draw_shape(ImageDraw.Draw(mask), kind, 0, 0, d, 255)
    l, t, r, b = mask.getbbox()
    return (float(x0 + l), float(y0 + t), float(x0 + r), float(y0 + b))


def _attrs(rng: np.random.Generator) -> tuple[str, str, str]:
    colours = list(COLOURS)
    return (KINDS[rng.integers(len(KINDS))], colours[rng.integers(len(colours))], SIZES[rng.integers(len(SIZES))])


def place_shapes(rng: np.random.Generator, cfg: SyntheticConfig, wanted: Sequence[Sequence[str]]
                 ) -> tuple[list[SceneObject], list[tuple[int, int, int]]]:
    """Place shapes ``(kind, colour, size)`` in order at random, at least ``gap_px`` apart; a shape with no room
    after 200 tries is dropped (rare; scenes with < min_objects are redrawn by the caller). Returns the objects
    (tight boxes) and their placements ``(x0, y0, d)``."""
    W, H = cfg.image_size
    side = min(W, H)
    objects: list[SceneObject] = []
    places: list[tuple[int, int, int]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for kind, colour, size in wanted:
        frac = cfg.size_fraction[size] * (1 + cfg.size_jitter * (2 * rng.random() - 1))
        d = max(3, int(round(frac * side)))
        for _ in range(200):
            x0 = int(rng.integers(cfg.border_px, W - d - cfg.border_px + 1))
            y0 = int(rng.integers(cfg.border_px, H - d - cfg.border_px + 1))
            g = cfg.gap_px
            if all(x0 + d + g <= bx0 or bx1 + g <= x0 or y0 + d + g <= by0 or by1 + g <= y0 for bx0, by0, bx1, by1 in boxes):
                break
        else:
            continue
        boxes.append((x0, y0, x0 + d, y0 + d))
        places.append((x0, y0, d))
        objects.append(SceneObject(kind, colour, size, _tight_box(kind, x0, y0, d)))
    return objects, places


def make_scene(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[list[SceneObject], list[tuple[int, int, int]]]:
    """Objects (target first) and their placements ``(x0, y0, d)``; non-overlapping by ``gap_px``."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    target = _attrs(rng)
    wanted = [target]
    for k in range(1, n):
        kind, colour, size = _attrs(rng)
        if rng.random() < (cfg.same_category_prob if k == 1 else 0.4):
            if rng.random() < 0.5:
                kind = target[0]
            else:
                colour = target[1]
        wanted.append((kind, colour, size))
    return place_shapes(rng, cfg, wanted)


def render_scene(
    objects: Sequence[SceneObject],
    places: Sequence[tuple[int, int, int]],
    cfg: SyntheticConfig,
    only: Optional[int] = None,
) -> np.ndarray:
    """Draw the scene as uint8 RGB (H, W, 3); ``only`` draws a single object (tests use it to check boxes)."""
    img = Image.new("RGB", cfg.image_size, cfg.background)
    draw = ImageDraw.Draw(img)
    for j, (o, (x0, y0, d)) in enumerate(zip(objects, places)):
        if only is None or j == only:
            _draw_shape(draw, o.kind, x0, y0, d, COLOURS[o.colour])
    return np.asarray(img, dtype=np.uint8).copy()


class _SceneImage:
    """``Sample.load_image`` of a synthetic scene (a class, not a closure, so samples pickle for worker processes)."""

    def __init__(self, objects, places, cfg: SyntheticConfig):
        self.objects, self.places, self.cfg = objects, places, cfg

    def __call__(self) -> np.ndarray:
        return render_scene(self.objects, self.places, self.cfg)


class _LazyIds(SequenceABC):
    def __init__(self, prefix: str, n: int):
        self._prefix, self._n = prefix, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return f"{self._prefix}{i % self._n:06d}"

    def index(self, value, *args) -> int:
        if isinstance(value, str) and value.startswith(self._prefix) and value[len(self._prefix):].isdigit():
            i = int(value[len(self._prefix):])
            if 0 <= i < self._n and self[i] == value:
                return i
        raise ValueError(f"{value!r} is not a sample id of this dataset")

    def __contains__(self, value) -> bool:
        try:
            self.index(value)
            return True
        except ValueError:
            return False


class SyntheticDataset:
    """Deterministic synthetic grounding scenes (see module doc). ``len`` = the split size; samples are made on demand.

    ``meta`` of each sample: ``objects`` (list of dicts), ``target`` (index into objects, always 0),
    ``expression_type``, ``split``, ``index``, ``seed``.
    """

    name = "synthetic"
    vocabulary = VOCABULARY

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        num_samples: Optional[int] = None,
        split_sizes: Optional[dict] = None,
        image_size: Union[int, tuple[int, int]] = (128, 128),
        **config,
    ):
        sizes = dict(DEFAULT_SPLIT_SIZES)
        sizes.update(split_sizes or {})
        if num_samples is None:
            if split not in sizes:
                raise DatasetError(
                    f"synthetic dataset has no split {split!r}; known splits {sorted(sizes)} "
                    "(pass num_samples=N or split_sizes={...} for another split name)"
                )
            num_samples = sizes[split]
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.split = split
        self.seed = int(seed)
        self.config = SyntheticConfig(image_size=image_size, **config)
        self._n = int(num_samples)
        self._split_key = zlib.crc32(split.encode("utf-8"))  # stable across runs and Python versions
        self._ids = _LazyIds(f"synthetic-{split}-", self._n)
        self._scenes: OrderedDict[int, tuple] = OrderedDict()  # index -> scene (see scene())
        self.bad_counts: dict[str, int] = {}

    def __len__(self) -> int:
        return self._n

    @property
    def sample_ids(self) -> Sequence[str]:
        return self._ids

    def index_of(self, sample_id: str) -> int:
        return self._ids.index(sample_id)

    @property
    def max_image_size(self) -> tuple[int, int]:
        """``(height, width)``: every scene has the configured size."""
        return (self.config.image_size[1], self.config.image_size[0])

    def scene(self, index: int):
        """``(objects, places, expression, expression_type)`` for ``index``, from (seed, split, index) alone.

        The last :data:`SCENE_MEMO` scenes are kept: one training sample is looked up several times in a row (its
        start record, its teacher plan, the env reset), and the expression search is most of a scene's cost."""
        index = int(index)
        got = self._scenes.pop(index, None) or self._build_scene(index)
        self._scenes[index] = got  # the most recent last
        if len(self._scenes) > SCENE_MEMO:
            self._scenes.popitem(last=False)
        objects, places, expression, etype = got
        return list(objects), list(places), expression, etype  # fresh lists: a caller's edit never reaches the memo

    def _build_scene(self, index: int):
        rng = np.random.default_rng([self.seed, self._split_key, index])
        cfg = self.config
        margin = cfg.margin * min(cfg.image_size)
        for _ in range(100):
            objects, places = make_scene(rng, cfg)
            if len(objects) < cfg.min_objects:
                continue
            got = generate_expression(objects, 0, rng, margin, cfg.type_weights)
            if got is not None:
                return objects, places, got[0], got[1]
        raise RuntimeError(f"could not build an unambiguous scene for index {index} (config too crowded?)")

    def __getitem__(self, index: int) -> Sample:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -self._n <= index < self._n:
            raise IndexError(f"index {index} out of range for synthetic/{self.split} of {self._n} samples")
        index = int(index) % self._n
        objects, places, expression, etype = self.scene(index)
        cfg = self.config
        W, H = cfg.image_size
        return Sample(
            sample_id=self._ids[index],
            expression=expression,
            gt_box=objects[0].box,
            width=W,
            height=H,
            source="synthetic",
            load_image=_SceneImage(objects, places, cfg),
            meta={
                "objects": [o.to_dict() for o in objects],
                "target": 0,
                "expression_type": etype,
                "split": self.split,
                "index": index,
                "seed": self.seed,
            },
        )

    def __repr__(self) -> str:
        return f"SyntheticDataset(split={self.split!r}, n={self._n}, seed={self.seed}, image_size={self.config.image_size})"
