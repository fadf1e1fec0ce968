"""The env with several boxes per step (IVT-SyntheticMulti-v0 and a hand-made two-object sample): check_env, HIoU
as info["iou"], the overlay of every box, default reward ``hiou``, depth observation and the ``depth`` reward by
hand, vector envs (sync and async, with depth maps)."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import ivt_env
from ivt_env.boxes import hiou, to_norm
from ivt_env.datasets.base import DatasetError, ListDataset, Sample
from ivt_env.env import GroundingRefineEnv
from ivt_env.multibox import format_boxes
from ivt_env.rewards import hiou_reward


def _check(env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_check_env_multi(split):
    _check(gym.make("IVT-SyntheticMulti-v0", split=split, render_mode="rgb_array"))


def test_check_env_multi_with_depth_observation():
    _check(gym.make("IVT-SyntheticMulti-v0", split="val", depth_observation=True, reward_fn="hiou_depth"))


def test_registered_with_reward_hiou():
    spec = gym.spec("IVT-SyntheticMulti-v0")
    assert spec.kwargs["dataset"] == "synthetic_multi" and spec.kwargs["reward_fn"] == "hiou"
    assert gym.make("IVT-SyntheticMulti-v0", split="val").unwrapped.reward_fn is hiou_reward
    assert ivt_env.make_env("IVT-SyntheticMulti-v0", split="val")().unwrapped.reward_fn is hiou_reward


def _two_objects(depth=True):
    """100 x 100 image, GT boxes (0, 0, 50, 50) and (50, 50, 100, 100); depth 0.5 on the top-left quarter, else 1."""
    def load():
        return np.zeros((100, 100, 3), dtype=np.uint8)

    def load_depth():
        d = np.ones((100, 100), dtype=np.float32)
        d[:50, :50] = 0.5
        return d

    meta = {"gt_boxes": [[0.0, 0.0, 50.0, 50.0], [50.0, 50.0, 100.0, 100.0]]}
    if depth:
        meta["load_depth"] = load_depth
    return ListDataset([Sample("two", "both squares", (0.0, 0.0, 50.0, 50.0), 100, 100, "t", load, meta)])


def test_hiou_info_and_overlay_of_every_box():
    env = GroundingRefineEnv(_two_objects(), max_refine_steps=1)
    obs, info = env.reset(options={"index": 0})
    assert info["multi"] and info["gt_boxes"] == [(0.0, 0.0, 50.0, 50.0), (50.0, 50.0, 100.0, 100.0)]
    # one box only: HIoU 0.5 (see tests/ivt_env/test_multibox.py)
    obs, r, term, trunc, info = env.step("<think>one</think> [[0, 0, 500, 500]]")
    assert info["valid"] and info["iou"] == pytest.approx(0.5) and info["boxes"] == [(0.0, 0.0, 50.0, 50.0)]
    assert r == 0.0 and not term
    assert obs["prev_valid"] == 1 and list(obs["prev_box"]) == [0, 0, 500, 500]
    obs, r, term, trunc, info = env.step("[[500, 500, 1000, 1000], [0, 0, 500, 500]]")
    assert info["iou"] == pytest.approx(1.0) and info["ious"] == pytest.approx([0.5, 1.0]) and term
    assert r == pytest.approx(1.0 + 0.1)  # reward hiou = IVT Eq. 3 on HIoU (default reward_fn None -> ivt, same form)
    img = obs["image"]  # both boxes tinted red
    assert img[25, 25, 0] > 0 and img[75, 75, 0] > 0 and img[25, 75, 0] == 0


def test_invalid_multi_step():
    env = GroundingRefineEnv(_two_objects(), max_refine_steps=0)
    env.reset(options={"index": 0})
    obs, r, term, trunc, info = env.step("[[0, 0, 500, 500], [10, 10, 5, 20]]")
    assert not info["valid"] and info["iou"] == 0.0 and info["boxes"] == [] and info["reason"] == "box 1: x2 <= x1"
    assert obs["prev_valid"] == 0 and not obs["image"].any()


def test_depth_checks_and_depth_reward_by_hand():
    env = GroundingRefineEnv(_two_objects(), max_refine_steps=1, reward_fn="depth", depth_observation=True)
    obs, info = env.reset(options={"index": 0})
    assert obs["depth"].shape == (100, 100) and obs["depth"][0, 0] == 0.5
    boxes = [(0, 0, 500, 500), (500, 500, 1000, 1000)]
    # |0.52 - 0.5| / 0.5 = 0.04 and |0.95 - 1| / 1 = 0.05: both within 0.1
    obs, r, _, _, info = env.step(format_boxes(boxes, [0.52, 0.95]))
    assert info["depth_ok"] is True and info["depths"] == [0.52, 0.95] and r == 0.0
    obs, r, _, _, info = env.step(format_boxes(boxes))  # no depth written: nothing to check
    assert info["depth_ok"] is None and r == 1.0
    env.reset(options={"index": 0})
    env.step(format_boxes(boxes, [0.56, None]))  # |0.56 - 0.5| / 0.5 = 0.12 > 0.1
    _, r, _, _, info = env.step(format_boxes(boxes, [0.5, 1.0]))
    assert info["depth_ok"] is True and r == 0.0  # one inconsistent pair in the trajectory: r_depth = 0
    env.reset(options={"index": 0})
    env.step(format_boxes(boxes))
    assert env.step(format_boxes(boxes))[1] == 0.0  # no depth at all earns nothing


def test_depth_observation_needs_depth_maps():
    env = GroundingRefineEnv(_two_objects(depth=False), depth_observation=True)
    with pytest.raises(DatasetError, match="no depth map"):
        env.reset(options={"index": 0})


def test_oracle_text_on_the_multi_env_and_sifthinker_reward():
    env = gym.make("IVT-SyntheticMulti-v0", split="test", max_refine_steps=1, reward_fn="sifthinker")
    obs, info = env.reset(seed=3)
    gts = [to_norm(b, info["width"], info["height"]) for b in info["gt_boxes"]]
    assert len(gts) == env.unwrapped.current_sample.meta["num_targets"]
    _, r0, _, _, i0 = env.step(format_boxes(gts[:1]))
    _, r1, _, _, i1 = env.step(format_boxes(gts))
    gt_px = [list(b) for b in info["gt_boxes"]]
    assert i0["iou"] == pytest.approx(hiou(i0["boxes"], gt_px)) and i1["iou"] > 0.95
    assert r1 == pytest.approx(i1["iou"] + (i1["iou"] - i0["iou"]))  # s_end + (s_end - s_init) on HIoU


@pytest.mark.parametrize("mode, vector_kwargs", [("sync", {}), ("async", {"context": "spawn"})])
def test_vector_envs_multi_with_depth(mode, vector_kwargs):
    venv = gym.make_vec("IVT-SyntheticMulti-v0", num_envs=2, vectorization_mode=mode, vector_kwargs=vector_kwargs,
                        split="val", depth_observation=True)
    try:
        obs, info = venv.reset(seed=[0, 1])
        refs = [gym.make("IVT-SyntheticMulti-v0", split="val", depth_observation=True).reset(seed=s) for s in (0, 1)]
        for k, (ro, ri) in enumerate(refs):
            assert np.array_equal(obs["image"][k], ro["image"]) and np.array_equal(obs["depth"][k], ro["depth"])
        texts = tuple(format_boxes([to_norm(b, 128, 128) for b in info["gt_boxes"][k]]) for k in range(2))
        obs, r, term, trunc, info = venv.step(texts)
        assert all(v > 0.95 for v in info["iou"]) and list(info["multi"]) == [True, True]
    finally:
        venv.close()
