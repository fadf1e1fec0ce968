"""The geometric teacher for several boxes per step (multi-object grounding, ``IVT-SyntheticMulti-v0``).

The single-box recipe (IVT Sec. 3.2) carries over box by box: the student's step-0 boxes are matched one-to-one
to the GT boxes (Kuhn-Munkres on IoU, centre distance breaking ties), every matched box is interpolated to its GT
box over T steps, a GT box the student missed appears at step 1, an extra box is dropped at step 1. From step 1
the boxes are listed in GT order (left to right). Reasoning texts stay terse (the tiny model learns them):

- step 0: ``"Target at left."`` (one box) or ``"2 targets: left, top right."``
- step t >= 1: the count problem (``"Missing 1."``, ``"1 extra."``), then ``"Boxes fit. Keep them."`` when every
  red box fits its GT box (IoU >= 0.85), else ``"Adjust 2."`` (how many boxes change).

Text of a step: ``<think>{reasoning}</think> [[x1, y1, x2, y2], ...]`` (:func:`ivt_env.multibox.format_boxes`).
All boxes are normalised ``[x1, y1, x2, y2]`` in [0, 1000].
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

from ivt_env.boxes import iou, to_norm
from ivt_env.multibox import format_boxes
from agents.teacher.geometric import FIT_IOU, _round_half_up, region_name
from agents.teacher.starts import ScriptedStudentConfig, _jitter, random_box

Box = Sequence[float]


def is_multi_sample(sample: Any, dataset: Any = None) -> bool:
    """Whether the env scores ``sample`` with several boxes (the env's auto rule)."""
    return bool(getattr(dataset, "multi_box", False)) or len((sample.meta or {}).get("gt_boxes") or []) > 1


def gt_boxes_norm(sample: Any) -> list[list[int]]:
    """The sample's GT boxes (``meta["gt_boxes"]``, else its one ``gt_box``) in [0, 1000]."""
    boxes = (sample.meta or {}).get("gt_boxes") or [sample.gt_box]
    return [list(to_norm(b, sample.width, sample.height)) for b in boxes]


def is_nested(boxes: Any) -> bool:
    """True for a list of boxes (``[[...], ...]``), False for one box (``[x1, y1, x2, y2]``)."""
    return bool(boxes) and isinstance(boxes[0], (list, tuple))


def match_boxes(pred: Sequence[Box], gt: Sequence[Box]) -> list[tuple[int, int]]:
    """One-to-one ``(pred index, gt index)`` pairs maximising total IoU (centre distance breaks ties)."""
    if not pred or not gt:
        return []
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    def dist(a, b):
        return abs(a[0] + a[2] - b[0] - b[2]) / 2 + abs(a[1] + a[3] - b[1] - b[3]) / 2

    cost = np.array([[1.0 - iou(p, g) + 1e-4 * dist(p, g) / 1000.0 for g in gt] for p in pred])
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def interpolate_box_sets(start: Sequence[Box], gt: Sequence[Box], T: int, keep_fitting: bool = False
                         ) -> list[list[list[int]]]:
    """T+1 box lists from ``start`` (step 0, as given) to ``gt`` (step T, GT order); see the module doc.
    ``keep_fitting``: a matched box that already fits its GT box (IoU >= 0.85) stays as it is."""
    plan = [[[int(v) for v in b] for b in start]]
    pairs = dict((j, i) for i, j in match_boxes(start, gt))
    for t in range(1, T + 1):
        a = t / T
        boxes = []
        for j, g in enumerate(gt):
            if j not in pairs:
                boxes.append([int(v) for v in g])
                continue
            s = start[pairs[j]]
            if keep_fitting and iou(s, g) >= FIT_IOU:
                boxes.append([int(v) for v in s])
            else:
                boxes.append([_round_half_up(x + (y - x) * a) for x, y in zip(s, g)])
        plan.append(boxes)
    return plan


def multi_reasoning(prev: Optional[Sequence[Box]], new: Sequence[Box], gt: Sequence[Box], step: int) -> str:
    """The terse reasoning of one multi-box teacher step (see the module doc)."""
    if step == 0 or not prev:
        lead = "" if step == 0 else "No red box. "
        if len(new) == 1:
            return f"{lead}Target at {region_name(new[0])}."
        return f"{lead}{len(new)} targets: {', '.join(region_name(b) for b in new)}."
    parts = []
    if len(prev) < len(gt):
        parts.append(f"Missing {len(gt) - len(prev)}.")
    elif len(prev) > len(gt):
        parts.append(f"{len(prev) - len(gt)} extra.")
    pairs = match_boxes(prev, gt)
    fits = sum(iou(prev[i], gt[j]) >= FIT_IOU for i, j in pairs)
    if not parts and fits == len(gt):
        parts.append("Box fits. Keep it." if len(gt) == 1 else "Boxes fit. Keep them.")
    else:
        changed = sum(1 for i, j in pairs if iou(prev[i], gt[j]) < FIT_IOU)
        if changed:
            parts.append(f"Adjust {changed}.")
    return " ".join(parts)


def format_multi_step(reasoning: str, boxes: Sequence[Box]) -> str:
    """``<think>{reasoning}</think> [[x1, y1, x2, y2], ...]``."""
    return f"<think>{reasoning}</think> {format_boxes(boxes)}"


def multi_teacher_texts(plan: Sequence[Sequence[Box]], gt: Sequence[Box]) -> list[str]:
    """The step texts of one multi-box teacher trajectory over ``plan`` (from :func:`interpolate_box_sets`)."""
    return [format_multi_step(multi_reasoning(plan[t - 1] if t else None, boxes, gt, t), boxes)
            for t, boxes in enumerate(plan)]


def info_gt_boxes_norm(info: Any) -> Optional[list[list[int]]]:
    """Every GT box in [0, 1000] of a multi-box episode (``info["multi"]``), else ``None``."""
    if not info.get("multi"):
        return None
    return [list(to_norm(b, info["width"], info["height"])) for b in info["gt_boxes"]]


def planned_multi_step(t: int, gts: Sequence[Box], history: Sequence[Any], start_of: Any, T: int,
                       sample_id: Any = None) -> tuple[str, list]:
    """``(text, plan)`` of step ``t`` of the scripted teacher in a multi-box episode: at step 0 the plan from
    ``start_of(gt box)`` per GT box (:func:`interpolate_box_sets` over ``T``), later the plan of step 0's output
    (``history[0].extra["plan"]``)."""
    if t == 0:
        plan = interpolate_box_sets([start_of(g) for g in gts], gts, T)
    else:
        if not history or "plan" not in history[0].extra:
            raise ValueError(f"InterpolatingTeacher: step {t} of sample {sample_id} has no plan in its step-0 history")
        plan = history[0].extra["plan"]
    boxes = plan[min(t, len(plan) - 1)]
    return format_multi_step(multi_reasoning(plan[t - 1] if t > 0 else None, boxes, gts, t), boxes), plan


def other_boxes_norm(sample: Any) -> list[list[int]]:
    """Normalised boxes of the scene's objects that are not referred to (``meta["objects"]`` minus targets)."""
    meta = sample.meta or {}
    targets = set(meta.get("targets") or [meta.get("target")])
    return [list(to_norm(o["box"], sample.width, sample.height)) for j, o in enumerate(meta.get("objects") or [])
            if j not in targets and "box" in o]


def multi_student_boxes(sample: Any, rng: random.Random, cfg: ScriptedStudentConfig, p_count: float = 0.3
                        ) -> list[list[int]]:
    """The scripted student's step-0 boxes: each GT box jittered (with ``p_wrong`` another object instead); with
    probability ``p_count`` a count error: one box dropped (when several) or one non-referred object added."""
    gts = gt_boxes_norm(sample)
    others = other_boxes_norm(sample)
    boxes = []
    for g in gts:
        if rng.random() < cfg.p_wrong:
            base = rng.choice(others) if others else random_box(rng)
            boxes.append(_jitter(base, rng, cfg.shift_sigma / 2, cfg.scale_sigma / 2))
        else:
            boxes.append(_jitter(g, rng, cfg.shift_sigma, cfg.scale_sigma))
    if rng.random() < p_count:
        if len(boxes) > 1 and rng.random() < 0.5:
            boxes.pop(rng.randrange(len(boxes)))
        else:
            base = rng.choice(others) if others else random_box(rng)
            boxes.insert(rng.randrange(len(boxes) + 1), _jitter(base, rng, cfg.shift_sigma / 2, cfg.scale_sigma / 2))
    return boxes
