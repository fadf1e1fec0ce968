"""Teacher guidance: the geometric teacher's answer to every refinement state the policy visited (DAgger-style).

Why: the behaviour-cloned tiny policy never writes "Box fits. Keep it." nor an exact copy of a good box (0 of 5,600
greedy and sampled refinement steps of assets/tiny-ivt-bc on val/train scenes), so pure GRPO can only learn to keep a
good box by slowly narrowing its number distributions: most of its measured "degradation" is a good step-0 box
rewritten a few units off. BC cloned the teacher on a SCRIPTED student's states; the states the policy reaches itself
(its own step-0 boxes, about half of them already fitting) were never labelled. DAgger (Ross et al., 2011) labels the
learner's own states with the expert's action; here the expert is the paper's teacher (IVT Sec. 3.2: interpolate to
the GT over the remaining steps, with the BC recipe's ``keep_fitting``: a box with IoU >= FIT_IOU is kept).

:func:`guidance_trajectories` turns each collected trajectory and refinement step t into one training sequence:
steps 0..t-1 as the policy wrote them (context, not targets), and at step t, with the same overlay observation, the
teacher's text. ``GRPOConfig.guide_coef`` weighs its cross-entropy (``BCLossOptions(last_step_only=True)``) beside
the GRPO loss; 0 (the default of the paper's config) leaves GRPO exactly as IVT Eq. 2.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

from agents.teacher.geometric import FIT_IOU, format_step, geometric_reasoning, interpolate_boxes
from ivt_env.boxes import iou, to_norm


def teacher_refinement(prev_norm: Optional[Sequence[float]], gt_norm: Sequence[int], step: int, remaining: int,
                       expression: str, verbosity: int = 0, keep_marker: str = "") -> tuple[str, list[int]]:
    """The teacher's step-``step`` text and box after the red box ``prev_norm`` (None: no valid box drawn), with
    ``remaining`` >= 1 steps left (this one included): keep a fitting box, else move 1/remaining of the way to the
    GT (the interpolation of IVT Sec. 3.2 restarted from the policy's own box). ``keep_marker``: a kept box is
    answered with the marker instead of its numbers (the env carries the previous box).

    >>> teacher_refinement([100, 100, 300, 300], [100, 100, 310, 300], 1, 2, "the circle")
    ('<think>Box fits. Keep it.</think> [100, 100, 300, 300]', [100, 100, 300, 300])
    >>> teacher_refinement([100, 100, 300, 300], [100, 100, 310, 300], 1, 2, "the circle", keep_marker="Keep it.")[0]
    '<think>Box fits. Keep it.</think>'
    >>> teacher_refinement([0, 0, 100, 100], [200, 200, 300, 300], 2, 1, "the circle")[1]
    [200, 200, 300, 300]
    """
    if remaining < 1:
        raise ValueError(f"teacher_refinement: remaining steps must be >= 1, got {remaining}")
    gt = [int(round(v)) for v in gt_norm]
    if prev_norm is None:
        new = list(gt)
        prev = None
    else:
        prev = [int(round(v)) for v in prev_norm]
        new = prev if iou(prev, gt) >= FIT_IOU else interpolate_boxes(prev, gt, remaining)[1]
    keep = bool(keep_marker) and prev is not None and new == prev
    text = format_step(geometric_reasoning(prev, new, gt, step, expression, None, verbosity), new,
                       keep_marker=keep_marker if keep else None)
    return text, new


GUIDE_STATES = ("all", "fit")  # label every refinement state | only those whose red box fits (the teacher keeps it)


def guidance_trajectories(trajectories: Sequence[Any], *, verbosity: int = 0, states: str = "all",
                          keep_marker: str = "") -> list[Any]:
    """One sequence per distinct refinement state: the policy's steps 0..t-1 plus a step t holding the teacher's
    text (``token_ids`` None: tokenised from the text, as BC does; the observation and injected tokens of the
    policy's own step t, which depend only on steps < t). Siblings of a branching group share step 0, so their
    step-1 states are labelled once. ``states="fit"``: only states whose red box fits the GT (IoU >= FIT_IOU), whose
    label is "keep it" (the one action the behaviour-cloned policy never samples, see the module docstring);
    ``keep_marker``: keep answers write the marker, not the box (:func:`teacher_refinement`).
    Trajectories must carry their observations in memory (the collector keeps them for the update)."""
    if states not in GUIDE_STATES:
        raise ValueError(f"guidance states must be one of {GUIDE_STATES}, got {states!r}")
    out, seen = [], set()
    for traj in trajectories:
        T = len(traj.steps) - 1
        gt = list(to_norm(traj.gt_box, traj.width, traj.height))
        for t in range(1, T + 1):
            prefix = traj.steps[:t]
            key = (traj.sample_id, tuple(tuple(s.token_ids or ()) or (s.text,) for s in prefix))
            if key in seen:
                continue
            seen.add(key)
            prev = prefix[-1].box_norm if prefix[-1].valid else None
            if states == "fit" and (prev is None or iou(prev, gt) < FIT_IOU):
                continue
            text, box = teacher_refinement(prev, gt, t, T - t + 1, traj.expression, verbosity, keep_marker)
            own = traj.steps[t]
            target = copy.copy(own)  # shallow: shares the observation array, replaces the generated part
            target.text, target.token_ids, target.logprobs, target.temperature = text, None, None, None
            target.box_norm, target.extra = [float(v) for v in box], {}
            guided = copy.copy(traj)
            guided.steps = list(prefix) + [target]
            out.append(guided)
    return out
