"""Step-0 boxes that teacher trajectories start from (IVT Sec. 3.2).

The paper starts every SFT trajectory from the *student's own* step-0 prediction (realistic, model-idiosyncratic
errors). Two stand-ins here need no model:

- :func:`scripted_student_box`: the CPU default's student. No pre-trained VLM exists offline, so a scripted
  student imitates the error modes a grounding model shows: with probability ``p_wrong`` it answers a *distractor*
  (another object of the scene, from ``sample.meta["objects"]`` when the dataset provides it, else a random box:
  "wrong object"), with probability ``p_close`` a close answer (the GT slightly jittered: often a fit), otherwise
  the GT box moved and rescaled by Gaussian noise ("shifted", "too large / small").
- :func:`perturbed_gt_box`: the paper's ablation, a uniform random perturbation of the GT box (what IVT first tried
  and found to cause step-0 sandbagging under GRPO).

Both return normalised ``[x1, y1, x2, y2]`` integers in [0, 1000] (valid boxes, at least ``MIN_SIDE`` wide/high).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

from ivt_env.boxes import NORM_MAX, to_norm

MIN_SIDE = 4  # [0, 1000] units: the smallest box a stand-in produces


@dataclass
class ScriptedStudentConfig:
    """Error model of the scripted student (the CPU default's stand-in for a base VLM's step-0 answers)."""

    p_wrong: float = 0.3
    """Probability of answering another object of the scene (or a random box when the sample lists no objects)."""
    shift_sigma: float = 0.2
    """Std of the centre offset, as a fraction of the chosen box's width / height."""
    scale_sigma: float = 0.25
    """Std of the log of each side's scale factor."""
    p_close: float = 0.0
    """Probability of a close answer: the GT jittered by ``close_shift_sigma`` / ``close_scale_sigma`` (about 44%
    of these fit, IoU >= 0.85). A trained grounder's step 0 is often right (the base checkpoint: about half its
    test answers have IoU >= 0.75), and the broad jitter alone almost never fits (0.5% reach 0.85), so without
    close answers the teacher rarely shows how to treat a box that is already right."""
    close_shift_sigma: float = 0.05
    """Std of a close answer's centre offset, as a fraction of the GT's width / height."""
    close_scale_sigma: float = 0.06
    """Std of the log of a close answer's per-side scale factor."""

    def __post_init__(self):
        for name in ("p_wrong", "p_close"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"scripted.{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        if self.p_wrong + self.p_close > 1.0 + 1e-9:
            raise ValueError(f"scripted.p_wrong + scripted.p_close must be at most 1, got {self.p_wrong} + {self.p_close}")


@dataclass
class PerturbConfig:
    """Uniform GT perturbation of the ablation (IVT Sec. 3.2, "random perturbations of ground-truth boxes")."""

    max_shift: float = 0.5
    """Largest centre offset per axis, as a fraction of the GT side."""
    max_scale: float = 0.5
    """Each side is scaled by a factor drawn uniformly from [1 - max_scale, 1 + max_scale]."""


def _clip_box(cx: float, cy: float, w: float, h: float) -> list[int]:
    """A valid integer box of (at least MIN_SIDE) size w x h centred near (cx, cy), inside [0, 1000]."""
    w = min(max(w, MIN_SIDE), NORM_MAX)
    h = min(max(h, MIN_SIDE), NORM_MAX)
    x1 = min(max(cx - w / 2, 0.0), NORM_MAX - w)
    y1 = min(max(cy - h / 2, 0.0), NORM_MAX - h)
    box = [int(math.floor(x1 + 0.5)), int(math.floor(y1 + 0.5)), int(math.floor(x1 + w + 0.5)), int(math.floor(y1 + h + 0.5))]
    box = [min(NORM_MAX, max(0, v)) for v in box]
    if box[2] - box[0] < 1:  # rounding at the border
        box[0] = max(0, box[2] - MIN_SIDE)
    if box[3] - box[1] < 1:
        box[1] = max(0, box[3] - MIN_SIDE)
    return box


def _jitter(box: Sequence[float], rng: random.Random, shift_sigma: float, scale_sigma: float) -> list[int]:
    w, h = box[2] - box[0], box[3] - box[1]
    cx = (box[0] + box[2]) / 2 + rng.gauss(0.0, shift_sigma) * w
    cy = (box[1] + box[3]) / 2 + rng.gauss(0.0, shift_sigma) * h
    return _clip_box(cx, cy, w * math.exp(rng.gauss(0.0, scale_sigma)), h * math.exp(rng.gauss(0.0, scale_sigma)))


def random_box(rng: random.Random, min_side: float = 50.0, max_side: float = 500.0) -> list[int]:
    """A uniformly placed box with sides uniform in [min_side, max_side] ([0, 1000] units)."""
    w, h = rng.uniform(min_side, max_side), rng.uniform(min_side, max_side)
    return _clip_box(rng.uniform(w / 2, NORM_MAX - w / 2), rng.uniform(h / 2, NORM_MAX - h / 2), w, h)


def distractor_boxes_norm(sample) -> list[tuple[int, int, int, int]]:
    """Normalised boxes of the other objects of ``sample`` (``meta["objects"]`` minus ``meta["target"]``)."""
    objects = (sample.meta or {}).get("objects") or []
    target = (sample.meta or {}).get("target", None)
    out = []
    for j, o in enumerate(objects):
        if j == target or "box" not in o:
            continue
        out.append(to_norm(o["box"], sample.width, sample.height))
    return out


def scripted_student_box(sample, rng: random.Random, cfg: ScriptedStudentConfig) -> list[int]:
    """The scripted student's step-0 box for ``sample`` (see module doc)."""
    gt = to_norm(sample.gt_box, sample.width, sample.height)
    u = rng.random()  # one draw picks the error mode (p_close = 0: the same random stream as before it existed)
    if u < cfg.p_wrong:
        others = distractor_boxes_norm(sample)
        base = rng.choice(others) if others else random_box(rng)
        return _jitter(base, rng, cfg.shift_sigma / 2, cfg.scale_sigma / 2)
    if u < cfg.p_wrong + cfg.p_close:
        return _jitter(gt, rng, cfg.close_shift_sigma, cfg.close_scale_sigma)
    return _jitter(gt, rng, cfg.shift_sigma, cfg.scale_sigma)


def perturbed_gt_box(sample, rng: random.Random, cfg: PerturbConfig) -> list[int]:
    """The ablation's start: the GT box with a uniform centre shift and per-side scale (IVT Sec. 3.2)."""
    x1, y1, x2, y2 = to_norm(sample.gt_box, sample.width, sample.height)
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + rng.uniform(-cfg.max_shift, cfg.max_shift) * w
    cy = (y1 + y2) / 2 + rng.uniform(-cfg.max_shift, cfg.max_shift) * h
    return _clip_box(cx, cy, w * rng.uniform(1 - cfg.max_scale, 1 + cfg.max_scale),
                     h * rng.uniform(1 - cfg.max_scale, 1 + cfg.max_scale))
