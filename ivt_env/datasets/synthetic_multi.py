"""Synthetic scenes whose expression refers to ONE TO THREE objects (``IVT-SyntheticMulti-v0``): multi-object
grounding on the same procedural shapes as :mod:`.synthetic`, each expression uniquely resolvable.

Grammar (on top of the singular grammar of :mod:`.synthetic_language`, which supplies the one-object expressions;
``NPs`` is the plural of a noun phrase: ``circles``, ``blue squares``, ``large shapes``)::

    both NPs                          "both blue circles"            exactly two objects match NP
    all three NPs                     "all three triangles"          exactly three objects match NP
    every NP                          "every square"                 two or more objects match NP
    every NP RELATION the NP2         "every square left of the white circle"
                                                                     two or more NP objects lie towards RELATION

Semantics are those of the singular grammar (``every NP REL the NP2`` denotes what ``the NP REL the NP2`` would,
with the same margin rule: a referent set is accepted only when the objects it *certainly* and *possibly* denotes
are the same set, of the size the quantifier says). The GT boxes are listed left to right (box centre x).

Sample ``i`` of split ``s`` depends on ``(seed, crc32("multi/" + s), i)`` alone. ``meta``: ``objects``, ``targets``
(indices into objects, in GT-box order), ``target`` (the first of them), ``gt_boxes`` (pixels), ``num_targets``,
``expression_type`` (``attribute`` / ``superlative`` / ``comparative`` / ``relation`` for one object, ``both`` /
``all_three`` / ``every`` / ``every_relation`` for several), ``split``, ``index``, ``seed``; with depth
(``depth=True``, the default) also ``depths``, ``gt_depths`` and ``load_depth`` (see :mod:`ivt_env.depth`).
"""

from __future__ import annotations

import zlib
from typing import Optional, Sequence, Union

import numpy as np

from .base import Sample
from .synthetic import DEFAULT_SPLIT_SIZES, SyntheticConfig, SyntheticDataset, _SceneImage, place_shapes
from .synthetic_language import (
    COLOURS,
    KINDS,
    RELATIONS,
    SIZES,
    NounPhrase,
    SceneObject,
    generate_expression,
    noun_phrases,
    resolve,
)

__all__ = ["SyntheticMultiDataset", "resolve_multi", "generate_multi_expression", "plural", "COUNT_WEIGHTS"]

COUNT_WEIGHTS = {1: 0.3, 2: 0.4, 3: 0.3}
"""Default share of scenes whose expression refers to 1, 2 and 3 objects."""
MULTI_SPLIT_SIZES = dict(DEFAULT_SPLIT_SIZES, test=1000, val=200)


def plural(np_: NounPhrase) -> str:
    """``"large blue circles"``, ``"shapes"``: the noun phrase with a plural head."""
    words = [w for w in (np_.size, np_.colour) if w]
    return " ".join(words + [(np_.kind or "shape") + "s"])


def _singular_of(expression: str) -> tuple[str, Optional[int]]:
    """``(singular expression, required count)`` of a plural one: ``both blue circles`` -> ``the blue circle``, 2.
    ``every`` requires two or more (count ``None``)."""
    tokens = expression.split()
    if tokens[:1] == ["both"]:
        rest, count = tokens[1:], 2
    elif tokens[:2] == ["all", "three"]:
        rest, count = tokens[2:], 3
    elif tokens[:1] == ["every"]:
        return "the " + " ".join(tokens[1:]), None
    else:
        return expression, 1
    # the plural head is the last word of the noun phrase (these forms take no relation)
    if rest and rest[-1].endswith("s") and rest[-1][:-1] in KINDS + ("shape",):
        rest = rest[:-1] + [rest[-1][:-1]]
    return "the " + " ".join(rest), count


def resolve_multi(expression: str, objects: Sequence[SceneObject], margin: float) -> tuple[set[int], set[int]]:
    """(certain referents, possible referents) of a singular or plural expression; both empty when the quantifier's
    count does not hold. Raises :class:`~.synthetic_language.ParseError` for text outside the grammar."""
    singular, count = _singular_of(expression)
    certain, possible = resolve(singular, objects, margin)
    if count == 1:
        return certain, possible
    if count is None:  # every: two or more
        return (certain, possible) if len(possible) >= 2 else (set(), set())
    return (certain, possible) if len(possible) == count else (set(), set())


def _noun_phrases(objects: Sequence[SceneObject]) -> list[NounPhrase]:
    # sorted: a set's order depends on the string hash seed, and each candidate draws from the scene's rng in order
    return sorted({np_ for o in objects for np_ in noun_phrases(o)}, key=lambda n: (n.size or "", n.colour or "",
                                                                                    n.kind or ""))


def _quantified(objects: Sequence[SceneObject], k: int, rng) -> list[tuple[float, str, str]]:
    nps = _noun_phrases(objects)
    out = []
    for np_ in nps:
        n = sum(np_.matches(o) for o in objects)
        if n != k:
            continue
        if k == 2:
            out.append((rng.random(), f"both {plural(np_)}", "both"))
        if k == 3:
            out.append((rng.random(), f"all three {plural(np_)}", "all_three"))
        out.append((rng.random(), f"every {np_.text()}", "every"))
    return out


def _related(objects: Sequence[SceneObject], k: int, rng) -> list[tuple[float, str, str]]:
    nps = _noun_phrases(objects)
    anchors = [np_ for np_ in nps if sum(np_.matches(o) for o in objects) == 1]
    out = []
    for np_ in nps:
        if sum(np_.matches(o) for o in objects) <= k:  # the relation must matter: NP alone names more objects
            continue
        for anp in anchors:
            for r in RELATIONS:
                out.append((rng.random(), f"every {np_.text()} {r} the {anp.text()}", "every_relation"))
    return out


def generate_multi_expression(objects: Sequence[SceneObject], k: int, rng, margin: float,
                              type_weights: dict) -> Optional[tuple[str, str, list[int]]]:
    """``(expression, type, referent indices)`` of an expression that denotes exactly ``k`` objects (k >= 2),
    quantifier forms first with probability 0.6, else relations first; ``None`` when none exists."""
    quant, rel = _quantified(objects, k, rng), _related(objects, k, rng)
    groups = [quant, rel] if rng.random() < 0.6 else [rel, quant]
    for cands in groups:
        cands.sort()
        for _, expr, etype in cands:
            certain, possible = resolve_multi(expr, objects, margin)
            if certain == possible and len(certain) == k:
                return expr, etype, sorted(certain)
    return None


def _attrs(rng) -> list:
    colours = list(COLOURS)
    return [KINDS[rng.integers(len(KINDS))], colours[rng.integers(len(colours))], SIZES[rng.integers(len(SIZES))]]


def make_multi_scene(rng, cfg: SyntheticConfig, k: int):
    """Objects and placements of a scene where ``k`` objects share a noun phrase (kind and colour, or one of
    them), among ``max(k + 1, n)`` shapes, ``n`` uniform in [min_objects, max_objects]; non-overlapping."""
    n = max(k + 1, int(rng.integers(cfg.min_objects, cfg.max_objects + 1)))
    shared = _attrs(rng)
    keep = [(True, True), (True, False), (False, True)][rng.integers(3)]  # kind / colour kept for the group
    wanted = []
    for j in range(n):
        a = _attrs(rng)
        if j < k:
            a = [shared[0] if keep[0] else a[0], shared[1] if keep[1] else a[1], a[2]]
        wanted.append(a)
    objects, places = place_shapes(rng, cfg, wanted)
    order = rng.permutation(len(objects)).tolist()  # the group is not always first
    return [objects[i] for i in order], [places[i] for i in order]


class SyntheticMultiDataset(SyntheticDataset):
    """Deterministic multi-object grounding scenes (see module doc); ``multi_box = True`` makes the env score
    every sample with HIoU. ``count_weights``: share of 1/2/3-referent expressions; ``depth``: per-object depths
    and a depth map (:mod:`ivt_env.depth`)."""

    name = "synthetic_multi"
    multi_box = True

    def __init__(self, split: str = "train", seed: int = 0, num_samples: Optional[int] = None,
                 split_sizes: Optional[dict] = None, image_size: Union[int, tuple[int, int]] = (128, 128),
                 count_weights: Optional[dict] = None, depth: bool = True, **config):
        config.setdefault("min_objects", 3)
        config.setdefault("max_objects", 5)
        super().__init__(split, seed, num_samples, dict(MULTI_SPLIT_SIZES, **(split_sizes or {})), image_size,
                         **config)
        self.count_weights = {int(c): float(w) for c, w in (count_weights or COUNT_WEIGHTS).items() if w > 0}
        if not self.count_weights or not set(self.count_weights) <= {1, 2, 3}:
            raise ValueError(f"count_weights must weigh counts among 1, 2, 3; got {count_weights!r}")
        self.depth = bool(depth)
        self._split_key = zlib.crc32(("multi/" + split).encode("utf-8"))
        self._ids = type(self._ids)(f"synthetic_multi-{split}-", self._n)

    def scene(self, index: int):
        """``(objects, places, expression, expression_type, targets)`` from (seed, split, index) alone."""
        rng = np.random.default_rng([self.seed, self._split_key, int(index)])
        cfg = self.config
        margin = cfg.margin * min(cfg.image_size)
        counts = sorted(self.count_weights)
        p = np.asarray([self.count_weights[c] for c in counts])
        k = counts[int(rng.choice(len(counts), p=p / p.sum()))]
        for _ in range(200):
            objects, places = make_multi_scene(rng, cfg, k)
            if len(objects) < max(cfg.min_objects, k + 1):
                continue
            if k == 1:
                t = int(rng.integers(len(objects)))
                got = generate_expression(objects, t, rng, margin, cfg.type_weights)
                if got is not None:
                    return objects, places, got[0], got[1], [t]
                continue
            got = generate_multi_expression(objects, k, rng, margin, cfg.type_weights)
            if got is not None:
                return objects, places, got[0], got[1], got[2]
        raise RuntimeError(f"could not build an unambiguous {k}-object scene for index {index}")

    def __getitem__(self, index: int) -> Sample:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -self._n <= index < self._n:
            raise IndexError(f"index {index} out of range for synthetic_multi/{self.split} of {self._n} samples")
        index = int(index) % self._n
        objects, places, expression, etype, targets = self.scene(index)
        targets = sorted(targets, key=lambda j: (objects[j].cx, objects[j].cy))
        cfg = self.config
        W, H = cfg.image_size
        gt_boxes = [list(objects[j].box) for j in targets]
        meta = {
            "objects": [o.to_dict() for o in objects],
            "targets": targets,
            "target": targets[0],
            "gt_boxes": gt_boxes,
            "num_targets": len(targets),
            "expression_type": etype,
            "split": self.split,
            "index": index,
            "seed": self.seed,
        }
        if self.depth:
            from ivt_env.depth import scene_depths

            meta.update(scene_depths(objects, places, targets, cfg, (self.seed, self._split_key, index)))
        return Sample(
            sample_id=self._ids[index],
            expression=expression,
            gt_box=tuple(gt_boxes[0]),
            width=W,
            height=H,
            source="synthetic_multi",
            load_image=_SceneImage(objects, places, cfg),
            meta=meta,
        )

    def __repr__(self) -> str:
        return (f"SyntheticMultiDataset(split={self.split!r}, n={self._n}, seed={self.seed}, "
                f"image_size={self.config.image_size})")
