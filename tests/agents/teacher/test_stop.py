"""Adaptive refinement in the teachers: plans cut at the first box that fits, the stop text (why it stops, the
marker before the box), the synthesizer's stopping trajectories and the scripted teacher in a stopping env."""

import gymnasium as gym
import pytest

import ivt_env  # noqa: F401
from agents.policies.scripted import InterpolatingTeacher
from agents.synthesis.synthesizer import SynthesizeConfig, Synthesizer
from agents.teacher.geometric import FIT_IOU, format_step, stop_plan, stop_reasoning
from rollouts.collector import collect_groups

GT = [100, 100, 200, 200]
BOXES = [[0, 0, 100, 100], [50, 50, 150, 150], [100, 100, 200, 200]]  # IoU 0, 2500 / 17500 = 1/7, 1


def test_stop_plan_cuts_after_the_first_fitting_box():
    assert stop_plan(BOXES, GT) == BOXES  # only the last box fits (IoU 1 >= 0.85)
    assert stop_plan(BOXES, GT, stop_iou=0.1) == BOXES[:2]  # 1/7 >= 0.1: stop at step 1
    assert stop_plan([GT, BOXES[0]], GT) == [GT]  # a start that fits stops at step 0
    assert stop_plan([BOXES[0]], GT) == [BOXES[0]]


def test_stop_text_says_why_and_puts_the_marker_before_the_box():
    assert stop_reasoning("Target at center.", 0) == "Target at center. It fits."
    assert stop_reasoning("Too far left. Move right.", 1) == "Too far left. Move right. Now it fits."
    assert stop_reasoning("Box fits. Keep it.", 2) == "Box fits."
    assert format_step("Box fits.", [1, 2, 3, 4], "<stop>") == "<think>Box fits.</think> <stop> [1, 2, 3, 4]"
    assert format_step("Box fits.", [1, 2, 3, 4]) == "<think>Box fits.</think> [1, 2, 3, 4]"


def test_synthesizer_trajectories_stop_once_the_box_fits():
    cfg = SynthesizeConfig(split="val", steps=2, iou_max=1.0, stop=True, stop_iou=FIT_IOU, batch_size=8,
                           save_images=False, progress=False)
    syn = Synthesizer(cfg)
    try:
        trajs = syn.trajectories(syn.starts(list(range(24))), keep_observations=False)
    finally:
        syn.close()
    assert {len(t.steps) for t in trajs} > {3}  # some stop early (the scripted student is often close)
    for t in trajs:
        assert t.meta["allow_stop"]
        fits = [s.iou >= FIT_IOU - 0.01 for s in t.steps]  # box rounding: env IoU vs the plan's [0, 1000] IoU
        for s in t.steps[:-1]:
            assert "<stop>" not in s.text
        if len(t.steps) < 3:
            assert "<stop>" in t.steps[-1].text and fits[-1] and "fits." in t.steps[-1].text


def test_scripted_teacher_stops_in_a_stopping_env():
    fixed = collect_groups(lambda: gym.make("IVT-Synthetic-v0", split="val"), InterpolatingTeacher(), range(6))
    adaptive = collect_groups(lambda: gym.make("IVT-Synthetic-Adaptive-v0", split="val"), InterpolatingTeacher(),
                              range(6))
    assert {len(t.steps) for t in fixed} == {3} and all("<stop>" not in s.text for t in fixed for s in t.steps)
    for t in adaptive:  # the start is perturbed to IoU <= 0.85, the GT box fits: stop at step 1 or 2
        assert "<stop>" in t.steps[-1].text and t.steps[-1].iou >= FIT_IOU - 0.01
        assert all("<stop>" not in s.text for s in t.steps[:-1]) and t.steps[0].iou <= 0.85 + 0.01
    given = collect_groups(lambda: gym.make("IVT-Synthetic-Adaptive-v0", split="val"), InterpolatingTeacher(), [0],
                           reset_options={0: {"start_box": [0, 0, 20, 20]}})[0]  # refines the given box
    assert given.steps[0].extra["start_box"] and "<stop>" in given.steps[-1].text
