"""Adaptive refinement in the env: the stop marker ends an episode (box final, a box-less stop keeps the previous
valid box), ``steps_used``, ``start_box`` as step 0, and the per-step cost (env option and wrapper), all with
rewards computed by hand on FakeDataset sample 0 (64 x 48 pixels, GT (16, 12, 48, 36) = [250, 250, 750, 750])."""

import gymnasium as gym
import numpy as np
import pytest

import ivt_env  # noqa: F401  (registers the ids)
from ivt_env.env import GroundingRefineEnv
from ivt_env.wrappers import StepCost
from tests.ivt_env.fake_data import FakeDataset

GT = "[250, 250, 750, 750]"
QUARTER = "[0, 0, 500, 500]"  # pixels (0, 0, 32, 24): overlap 16 x 12 = 192, union 768 + 768 - 192 -> IoU 1/7


def make(**kw):
    return GroundingRefineEnv(FakeDataset(), max_refine_steps=2, **kw)


def test_defaults_keep_fixed_length_and_ignore_the_marker():
    env = make()
    env.reset(options={"index": 0})
    _, r, term, _, info = env.step(f"<stop> {GT}")
    assert (r, term, info["stopped"], info["steps_used"]) == (0.0, False, False, 0)
    env.step(QUARTER)
    _, r, term, _, info = env.step(GT)
    assert term and info["steps_used"] == 2 and r == pytest.approx(1.0 + 0.1)  # Eq. 3: IoU 1 + 0.1 * 3 / 3


def test_stop_ends_the_episode_and_rewards_see_the_steps_taken():
    env = make(allow_stop=True)
    env.reset(options={"index": 0})
    _, r, term, _, info = env.step(QUARTER)
    assert (r, term, info["steps_used"]) == (0.0, False, 0) and info["iou"] == pytest.approx(1 / 7)
    obs, r, term, _, info = env.step(f"<think>fits</think> <stop> {GT}")
    # Eq. 3 with the stop as the last step: IoU 1 + 0.1 * (2 valid / 2 steps)
    assert term and info["stopped"] and info["steps_used"] == 1 and r == pytest.approx(1.1)
    assert obs["step"] == 2 and info["ious"] == [pytest.approx(1 / 7), 1.0]
    with pytest.raises(RuntimeError, match="ended after 2 steps"):
        env.step(GT)


def test_stop_at_step_zero_and_a_custom_marker():
    env = make(allow_stop=True, stop_marker="DONE")
    env.reset(options={"index": 0})
    _, r, term, _, info = env.step(f"<stop> {GT}")  # not this env's marker
    assert not term
    env.reset(options={"index": 0})
    _, r, term, _, info = env.step(f"DONE {QUARTER}")
    assert term and info["steps_used"] == 0 and r == pytest.approx(1 / 7 + 0.1)  # IoU 1/7 + 0.1 * 1 / 1


def test_stop_without_a_box_keeps_the_previous_valid_box():
    env = make(allow_stop=True)
    env.reset(options={"index": 0})
    env.step(QUARTER)
    env.step("no box here")  # invalid step 1: IoU 0
    _, r, term, _, info = env.step("looks right <stop>")
    assert term and info["box_carried"] and info["valid"] and info["box_norm"] == (0, 0, 500, 500)
    assert info["iou"] == pytest.approx(1 / 7) and info["valids"] == [True, False, True]
    assert r == pytest.approx(1 / 7 + 0.1 * 2 / 3)
    env.reset(options={"index": 0})
    _, r, term, _, info = env.step("<stop>")  # nothing to keep: an invalid final step
    assert term and not info["valid"] and r == 0.0


def test_step_cost_option_and_wrapper_agree():
    env = make(allow_stop=True, step_cost=0.05)
    wrapped = StepCost(make(allow_stop=True), cost=0.05)
    for e in (env, wrapped):
        e.reset(options={"index": 0})
        assert e.step(QUARTER)[1] == 0.0  # step 0 pays no cost
        assert e.step(QUARTER)[1] == pytest.approx(-0.05)  # refinement step 1: Eq. 3 pays 0, minus the cost
        _, r, term, _, _ = e.step(GT)
        assert term and r == pytest.approx(1.1 - 0.05)
    with pytest.raises(ValueError, match="step_cost"):
        make(step_cost=-1)
    with pytest.raises(ValueError, match="stop_marker"):
        make(stop_marker="")


def test_start_box_is_step_zero():
    env = make(allow_stop=True)
    original = FakeDataset()[0].load_image()
    obs, info = env.reset(options={"index": 0, "start_box": [0, 0, 32, 24]})
    assert obs["step"] == 1 and obs["prev_valid"] == 1 and list(obs["prev_box"]) == [0, 0, 500, 500]
    assert info["step"] == 0 and info["start_box"] and info["steps_used"] == 0 and info["iou"] == pytest.approx(1 / 7)
    assert not np.array_equal(obs["image"], original) and np.array_equal(info["start_image"], original)
    _, r, term, _, info = env.step(QUARTER)
    assert (r, term, info["steps_used"], info["step"]) == (0.0, False, 1, 1)
    _, r, term, _, info = env.step(GT)
    assert term and info["steps_used"] == 2 and r == pytest.approx(1.1)  # IoU 1 + 0.1 * 3 valid / 3
    _, info = env.reset(options={"index": 0, "start_box": [-5, -5, 100, 100]})  # clipped to the image
    assert info["box"] == (0.0, 0.0, 64.0, 48.0)


@pytest.mark.parametrize("bad", [[1, 2, 3], "box", [0, 0, float("nan"), 4], [10, 10, 5, 20]])
def test_bad_start_box_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="start_box"):
        make().reset(options={"index": 0, "start_box": bad})
    with pytest.raises(ValueError, match="max_refine_steps >= 1"):
        GroundingRefineEnv(FakeDataset(), max_refine_steps=0).reset(options={"start_box": [0, 0, 5, 5]})


def test_adaptive_id_stops():
    env = gym.make("IVT-Synthetic-Adaptive-v0", split="val")
    env.reset(seed=0)
    assert env.step("<stop> [0, 0, 1000, 1000]")[2]
