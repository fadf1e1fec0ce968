"""The keep marker: a refinement step that ENDS with "Keep it." and has no box keeps the previous valid box exactly
(its IoU, a valid step, the overlay and ``prev_box`` of the next observation), on FakeDataset sample 0 (64 x 48
pixels, GT (16, 12, 48, 36) = [250, 250, 750, 750])."""

import numpy as np
import pytest

from tests.ivt_env.test_env_adaptive import GT, QUARTER, make  # FakeDataset sample 0, T = 2; QUARTER: IoU 1/7


def test_keep_carries_the_previous_box_and_the_episode_goes_on():
    env = make()
    env.reset(options={"index": 0})
    obs0, *_ = env.step(QUARTER)
    obs, r, term, _, info = env.step("<think>Box fits. Keep it.</think>")
    assert not term and info["box_carried"] and info["kept"] and info["valid"] and info["reason"] is None
    assert info["box_norm"] == (0, 0, 500, 500) and info["iou"] == pytest.approx(1 / 7)
    assert info["box"] == pytest.approx((0.0, 0.0, 32.0, 24.0)) and info["steps_used"] == 1
    # the next observation draws the same box as the one after step 0
    assert np.array_equal(obs["image"], obs0["image"]) and obs["prev_box"].tolist() == [0, 0, 500, 500]
    _, r, term, _, info = env.step("Keep it. \n")
    assert term and info["valids"] == [True, True, True] and info["ious"] == [pytest.approx(1 / 7)] * 3
    assert r == pytest.approx(1 / 7 + 0.1)  # IVT Eq. 3: final IoU 1/7 + 0.1 * 3 valid / 3 steps


def test_keep_needs_a_previous_valid_box_and_a_box_wins():
    env = make()
    env.reset(options={"index": 0})
    _, _, _, _, info = env.step("Keep it.")  # step 0: nothing to keep
    assert not info["valid"] and "box_carried" not in info
    _, _, _, _, info = env.step("Keep it.")  # still nothing valid to keep
    assert not info["valid"] and info["iou"] == 0.0
    _, _, _, _, info = env.step(f"Keep it. {GT}")  # a text with a box is scored by its box
    assert info["valid"] and info["iou"] == 1.0 and "box_carried" not in info


def test_keep_carries_the_last_VALID_box_and_can_be_renamed_or_turned_off():
    env = make(keep_marker="SAME")
    env.reset(options={"index": 0})
    env.step(GT)
    env.step("<think>SAME</think> the box is fine")  # the marker must END the text: invalid step 1
    assert not env.step("<think>SAME")[4]["valid"]  # an unclosed reasoning is no keep
    env.reset(options={"index": 0})
    env.step(GT)
    env.step("<think>SAME</think> the box is fine")
    _, _, _, _, info = env.step("SAME")
    assert info["valid"] and info["box_norm"] == (250, 250, 750, 750) and info["valids"] == [True, False, True]
    env = make(keep_marker=None)
    env.reset(options={"index": 0})
    env.step(GT)
    assert not env.step("Keep it.")[4]["valid"]
    with pytest.raises(ValueError, match="keep_marker"):
        make(keep_marker="  ")
