"""A policy that plays planned teacher trajectories, so the rollout collector can record them in the env.

Teacher trajectories are played *through the env*: each step's observation (step 0 the original image, step t the
overlay of box t-1) is exactly the image the student will see at inference, because the env rendered it from the
parsed text, as it does for any policy (IVT Sec. 3.2, forward-reasoning framing).

:class:`PlannedTeacher` holds, per sample id, the planned boxes (``interpolate_boxes`` from the start box to the
GT) and writes at step t ``"<think>{reasoning}</think> [box_t]"``. The reasoning comes from the offline geometric
teacher, or from a ``reasoner`` (the VLM teacher of :mod:`agents.synthesis.vlm_reasoner`) that sees the step's observation.

Keeping (``keep_marker``, with plans that hold a fitting box): a step whose planned box equals the previous one
writes the env's keep action (``<think>Box fits. Keep it.</think>``, no box), so the env carries the box exactly.

Adaptive refinement (``stop_marker``, for an env with ``allow_stop=True``): the step whose box fits the GT
(IoU >= ``stop_iou``) says why and carries the marker (:func:`~agents.teacher.geometric.stop_reasoning`,
:func:`~agents.teacher.geometric.format_step`), so the episode ends there; plans are usually cut there already
(:func:`~agents.teacher.geometric.stop_plan`).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping, Optional, Sequence

from rollouts.policy import Policy, PolicyOutput, SamplingParams
from agents.teacher.geometric import FIT_IOU, format_step, geometric_reasoning, stop_reasoning
from agents.teacher.multi import format_multi_step, is_nested, multi_reasoning
from ivt_env.boxes import iou, to_norm

# reasoner(images, expressions, prev_boxes, new_boxes, gt_boxes, steps) -> one reasoning text per item ("" = none)
Reasoner = Callable[[Sequence[Any], Sequence[str], Sequence[Optional[list]], Sequence[list], Sequence[list], Sequence[int]], list[str]]


class PlannedTeacher(Policy):
    """Plays ``plans[sample_id]`` (T+1 normalised boxes) with step reasoning. Needs ``info["sample_id"]`` and
    ``info["gt_box_norm"]`` (a teacher may read the GT; model policies must not)."""

    name = "planned_teacher"

    def __init__(
        self,
        plans: Mapping[str, Sequence[Sequence[int]]],
        *,
        verbosity: int = 0,
        reasoner: Optional[Reasoner] = None,
        seed: Optional[int] = 0,
        stop_marker: Optional[str] = None,
        stop_iou: float = FIT_IOU,
        keep_marker: Optional[str] = None,
    ):
        self.plans = dict(plans)
        self.keep_marker = keep_marker or None
        self.stop_marker, self.stop_iou = stop_marker, float(stop_iou)
        self.verbosity = verbosity
        self.reasoner = reasoner
        self.rng = random.Random(seed)
        self.fallbacks = 0  # steps where the reasoner returned nothing usable and the geometric text was used

    def seed(self, seed: Optional[int]) -> None:
        self.rng = random.Random(seed)

    def act(
        self,
        observations: Sequence[Mapping[str, Any]],
        histories: Sequence[Sequence[PolicyOutput]],
        infos: Sequence[Mapping[str, Any]],
        sampling: SamplingParams,
    ) -> list[PolicyOutput]:
        items = []
        for obs, hist, info in zip(observations, histories, infos):
            sid = info["sample_id"]
            if sid not in self.plans:
                raise KeyError(f"PlannedTeacher: no planned boxes for sample {sid!r}")
            boxes = self.plans[sid]
            t = len(hist)
            if t >= len(boxes):
                raise ValueError(f"PlannedTeacher: sample {sid!r} asked for step {t}, the plan has {len(boxes)} boxes")
            prev = list(boxes[t - 1]) if t > 0 else None
            if is_nested(boxes[t]):  # a multi-box plan: the multi-box teacher's text (no reasoner)
                gts = [list(to_norm(b, info["width"], info["height"])) for b in info["gt_boxes"]]
                items.append((obs, info, t, prev, list(boxes[t]), gts))
                continue
            items.append((obs, info, t, prev, list(boxes[t]), list(info["gt_box_norm"])))
        if any(is_nested(it[4]) for it in items):  # multi-box plans (a multi-box dataset has no others)
            return [PolicyOutput(text=format_multi_step(multi_reasoning(prev, new, gt, t), new),
                                 extra={"teacher": "geometric"}) for _o, _i, t, prev, new, gt in items]
        texts: list[str] = [""] * len(items)
        if self.reasoner is not None and items:
            texts = list(self.reasoner(
                [o["image"] for o, *_ in items], [o["expression"] for o, *_ in items],
                [it[3] for it in items], [it[4] for it in items], [it[5] for it in items], [it[2] for it in items],
            ))
        out = []
        for (obs, _info, t, prev, new, gt), text in zip(items, texts):
            source = "vlm" if text else "geometric"
            holds = prev is not None and t > 0 and list(new) == list(prev)  # the plan keeps the previous box
            if not text:
                if self.reasoner is not None:
                    self.fallbacks += 1
                # a held near-fit (keep_iou < FIT_IOU) is described as fitting: the teacher chose to keep it
                ref = prev if holds and iou(prev, gt) < FIT_IOU else gt
                text = geometric_reasoning(prev, new, ref, t, obs["expression"], self.rng, self.verbosity)
            stop = bool(self.stop_marker) and iou(new, gt) >= self.stop_iou
            if stop:
                text = stop_reasoning(text, t)
            keep = bool(self.keep_marker) and not stop and holds
            out.append(PolicyOutput(text=format_step(text, new, self.stop_marker if stop else None,
                                                     keep_marker=self.keep_marker if keep else None),
                                    extra={"teacher": source, **({"stop": True} if stop else {}),
                                           **({"keep": True} if keep else {})}))
        return out
