"""The geometric teacher: interpolation and reasoning texts against hand-computed expectations."""

import random

import pytest

from ivt_env.boxes import parse_box
from agents.teacher.geometric import (
    diagnose,
    format_step,
    geometric_reasoning,
    interpolate_boxes,
    region_name,
    teacher_corpus,
    teacher_step_texts,
)

GT = [400, 400, 600, 600]  # 200 x 200, centre (500, 500)


def test_interpolate_hand_computed():
    # start (100,100,200,200) -> GT (300,500,401,600), T=2: midpoint (200, 300, 300.5, 400) -> 300.5 rounds half up
    assert interpolate_boxes([100, 100, 200, 200], [300, 500, 401, 600], 2) == [
        [100, 100, 200, 200],
        [200, 300, 301, 400],
        [300, 500, 401, 600],
    ]
    # T=4 from (0,0,40,40) to (40,40,80,80): steps of 10
    assert interpolate_boxes([0, 0, 40, 40], [40, 40, 80, 80], 4) == [
        [0, 0, 40, 40], [10, 10, 50, 50], [20, 20, 60, 60], [30, 30, 70, 70], [40, 40, 80, 80]]
    assert interpolate_boxes([1, 2, 3, 4], GT, 0) == [[1, 2, 3, 4]]


def test_interpolate_keeps_one_unit_boxes_valid():
    # x1 = 1.5, x2 = 2.5 at t=1: banker's rounding would give 2 and 2 (zero width); half-up gives 2 and 3
    boxes = interpolate_boxes([1, 1, 2, 2], [2, 2, 3, 3], 2)
    assert boxes[1] == [2, 2, 3, 3]
    assert all(b[2] > b[0] and b[3] > b[1] for b in boxes)


@pytest.mark.parametrize("bad", [[10, 10, 5, 20], [0, 0, 1001, 5], [0, 0, float("nan"), 5], [1, 2, 3]])
def test_interpolate_rejects_bad_boxes(bad):
    with pytest.raises(ValueError, match="start box"):
        interpolate_boxes(bad, GT, 2)
    with pytest.raises(ValueError, match="T must be"):
        interpolate_boxes(GT, GT, -1)


def test_region_name_grid():
    assert region_name([0, 0, 100, 100]) == "top left"
    assert region_name([400, 400, 600, 600]) == "center"
    assert region_name([900, 400, 1000, 600]) == "right"
    assert region_name([400, 900, 600, 1000]) == "bottom"
    assert region_name([700, 700, 900, 900]) == "bottom right"


def test_diagnose_cases():
    # 100 units right of the GT (tolerance max(0.15*200, 10) = 30), same size: shifted right -> move left
    d = diagnose([500, 400, 700, 600], GT)
    assert (d["kind"], d["shift_x"], d["shift_y"], d["size_w"], d["size_h"], d["move"]) == (
        "off", "right", None, None, None, "left")
    # same centre, 300 x 300 (ratio 1.5 > 1.2): too large; IoU = 40000 / 90000 = 0.44
    d = diagnose([350, 350, 650, 650], GT)
    assert (d["kind"], d["size_w"], d["size_h"], d["move"]) == ("off", "large", "large", "")
    assert d["iou"] == pytest.approx(4 / 9)
    # far away, no overlap: wrong object, moving down right towards the GT
    d = diagnose([0, 0, 100, 100], GT)
    assert (d["kind"], d["move"]) == ("wrong", "down right")
    # IoU (190*200)/(200*200) = 0.95 >= 0.85: fits
    assert diagnose([410, 400, 600, 600], GT)["kind"] == "fit"


def test_reasoning_step0_terse_and_sentences():
    assert geometric_reasoning(None, [0, 0, 100, 100], GT, 0, "the red circle", None, 0) == "Target at top left."
    assert geometric_reasoning(None, GT, GT, 0, "red circle", None, 1) == "The target is at the center."
    assert (geometric_reasoning(None, GT, GT, 0, "red circle", None, 2)
            == "I look for the red circle. It is at the center.")


def test_reasoning_refinement_cases():
    # too far right and too high (GT centre 500,500; red box centre 600,400), same size
    prev = [500, 300, 700, 500]
    assert geometric_reasoning(prev, [450, 350, 650, 550], GT, 1, "x", None, 0) == (
        "Too far right, too high. Move down left.")
    assert geometric_reasoning(prev, [450, 350, 650, 550], GT, 1, "x", None, 1) == (
        "The red box is too far right and too high. Move it down left.")
    # centred but too small (100 x 100 vs 200 x 200)
    assert geometric_reasoning([450, 450, 550, 550], [425, 425, 575, 575], GT, 1, "x", None, 0) == (
        "Too small. Grow.")
    assert geometric_reasoning([450, 450, 550, 550], [425, 425, 575, 575], GT, 1, "x", None, 1) == (
        "The red box is too small. Make it larger.")
    # too wide only (300 x 200)
    assert geometric_reasoning([350, 400, 650, 600], GT, GT, 2, "x", None, 0) == "Too wide. Narrower."
    # wrong object far away
    assert geometric_reasoning([0, 0, 100, 100], [200, 200, 350, 350], GT, 1, "x", None, 0) == (
        "Wrong object. Move down right.")
    assert geometric_reasoning([0, 0, 100, 100], [200, 200, 350, 350], GT, 1, "x", None, 1) == (
        "The red box is on the wrong object. Move it down right.")
    # a fit
    assert geometric_reasoning([410, 400, 600, 600], GT, GT, 2, "x", None, 0) == "Box fits. Keep it."
    # no red box drawn at step 1 (invalid step-0 answer)
    assert geometric_reasoning(None, GT, GT, 1, "x", None, 0) == "No red box. Target at center."


def test_rng_varies_phrasing_only_above_verbosity0():
    texts = {geometric_reasoning(None, GT, GT, 0, "x", random.Random(s), 1) for s in range(20)}
    assert texts == {"The target is at the center.", "I see the target at the center."}
    assert {geometric_reasoning(None, GT, GT, 0, "x", random.Random(s), 0) for s in range(20)} == {
        "Target at center."}


def test_format_step_and_trajectory_texts_parse_back():
    assert format_step("Target at center.", [1, 2, 3.0, 4]) == "<think>Target at center.</think> [1, 2, 3, 4]"
    boxes = interpolate_boxes([0, 0, 100, 100], GT, 2)
    texts = teacher_step_texts(boxes, GT, "the red circle")
    assert texts == [
        "<think>Target at top left.</think> [0, 0, 100, 100]",
        "<think>Wrong object. Move down right.</think> [200, 200, 350, 350]",
        # (200,200,350,350) vs GT: IoU 0, centre distance 318 > 200: still "wrong object"
        "<think>Wrong object. Move down right.</think> [400, 400, 600, 600]",
    ]
    assert [list(parse_box(t).box) for t in texts] == boxes


def test_vocabulary_is_small():
    words = {w.strip(".,").lower() for line in teacher_corpus(0) for w in line.split()}
    assert len(words) <= 40
    assert {"left", "right", "up", "down", "wrong", "object", "fits", "large", "small"} <= words


def test_hold_fitting_boxes_by_hand():
    from agents.teacher.geometric import hold_fitting_boxes

    gt = [120, 100, 220, 200]
    plan = interpolate_boxes([110, 100, 210, 200], gt, 2)  # x1: 110, 115, 120
    assert [b[0] for b in plan] == [110, 115, 120]
    # equal-size boxes shifted by d: IoU (100 - d) / (100 + d). Start: 90/110 = 0.82 (off); box 1: 95/105 = 0.905
    # (fits): box 2 stays box 1 instead of creeping on to the GT
    held = hold_fitting_boxes(plan, gt)
    assert held == [[110, 100, 210, 200], [115, 100, 215, 200], [115, 100, 215, 200]]
    far = interpolate_boxes([0, 0, 100, 100], [500, 500, 600, 600], 2)
    assert hold_fitting_boxes(far, [500, 500, 600, 600]) == far  # nothing fits before the end: unchanged
    texts = teacher_step_texts(held, gt, "the blue circle")
    assert all("Keep it" in t for t in texts[2:]) and "Keep it" not in texts[1]
