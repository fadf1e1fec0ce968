"""GroundingRefineEnv: transitions, observations, info, reset options, rendering, errors, check_env."""

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from ivt_env.datasets.base import DatasetError, Sample
from ivt_env.env import GroundingRefineEnv
from ivt_env.rendering import OverlayStyle, draw_box
from tests.ivt_env.fake_data import FakeDataset

INFO_KEYS = {
    "sample_id", "dataset", "source", "index", "gt_box", "gt_box_norm", "width", "height", "step",
    "max_steps", "box", "box_norm", "valid", "reason", "iou", "ious", "valids", "boxes_norm",
    "steps_used", "allow_stop",  # adaptive refinement (issue 14): refinement steps taken, whether stopping is on
    "keep_marker",  # the text that keeps the previous box ("Keeping a box")
    "stop_marker",  # the text that ends an episode (allow_stop)
}


@pytest.fixture
def env():
    return GroundingRefineEnv(FakeDataset(), render_mode="rgb_array")


def test_reset_observation_and_info(env):
    obs, info = env.reset(options={"index": 1})
    sample = env.unwrapped.dataset[1]  # 30 x 40 image, GT (7.5, 10, 22.5, 30)
    original = sample.load_image()
    assert set(obs) == {"image", "expression", "step", "prev_box", "prev_valid"}
    assert np.array_equal(obs["image"], original) and obs["image"].shape == (40, 30, 3)
    assert obs["expression"] == "the object number 1" and obs["step"] == 0 and obs["prev_valid"] == 0
    assert obs["prev_box"].dtype == np.float32 and not obs["prev_box"].any()
    assert obs in env.observation_space
    assert set(info) == INFO_KEYS
    assert info["sample_id"] == "fake-1" and info["dataset"] == "fake" and info["index"] == 1
    assert info["gt_box"] == (7.5, 10.0, 22.5, 30.0) and info["gt_box_norm"] == (250, 250, 750, 750)
    assert (info["width"], info["height"], info["step"], info["max_steps"]) == (30, 40, -1, 2)
    assert info["ious"] == [] and info["valids"] == [] and info["box"] is None and not info["valid"]


def test_episode_transitions_by_hand(env):
    obs0, _ = env.reset(options={"index": 0})  # 64 x 48, GT (16, 12, 48, 36) px
    original = obs0["image"].copy()
    # step 0: valid box [0, 0, 500, 500] -> (0, 0, 32, 24) px: IoU = 192 / 1344 = 1/7
    obs, r, term, trunc, info = env.step("<think>left</think> [0, 0, 500, 500]")
    assert (r, term, trunc) == (0.0, False, False)
    assert info["step"] == 0 and info["valid"] and info["reason"] is None
    assert info["box"] == (0.0, 0.0, 32.0, 24.0) and info["box_norm"] == (0.0, 0.0, 500.0, 500.0)
    assert info["iou"] == pytest.approx(1 / 7) and info["ious"] == pytest.approx([1 / 7])
    assert obs["step"] == 1 and obs["prev_valid"] == 1
    assert np.array_equal(obs["prev_box"], np.array([0, 0, 500, 500], np.float32))
    # the next observation is the ORIGINAL with this box drawn, at native resolution
    assert np.array_equal(obs["image"], draw_box(original, (0, 0, 32, 24)))
    assert not np.array_equal(obs["image"], original)
    assert np.array_equal(env.render(), obs["image"]) and env.render() is not obs["image"]
    # step 1: no box -> invalid, IoU 0, nothing drawn, prev_box zeros
    obs, r, term, _, info = env.step("the red one, I think")
    assert not info["valid"] and info["reason"] == "no box found" and info["box"] is None and info["iou"] == 0.0
    assert np.array_equal(obs["image"], original) and obs["prev_valid"] == 0 and not obs["prev_box"].any()
    assert (r, term) == (0.0, False)
    # step 2 (= T): the GT box -> IoU 1, Eq. 3 pays 1 + 0.1 * 2/3, episode over
    obs, r, term, trunc, info = env.step("```json\n[{\"bbox_2d\": [250, 250, 750, 750]}]\n```")
    assert term and not trunc and r == pytest.approx(1 + 0.1 * 2 / 3)
    assert info["ious"] == pytest.approx([1 / 7, 0.0, 1.0]) and info["valids"] == [True, False, True]
    assert obs["step"] == 3 and obs in env.observation_space
    assert np.array_equal(obs["image"], draw_box(original, (16, 12, 48, 36)))
    with pytest.raises(RuntimeError, match="reset"):
        env.step("[1, 2, 3, 4]")
    # a new episode starts clean
    obs, info = env.reset(options={"index": 0})
    assert obs["step"] == 0 and info["ious"] == [] and np.array_equal(obs["image"], original)


def test_out_of_range_and_non_string_actions_are_invalid_steps(env):
    env.reset(options={"index": 0})
    _, _, _, _, info = env.step("[0, 0, 1200, 500]")
    assert not info["valid"] and "out of range" in info["reason"]
    _, _, _, _, info = env.step(None)
    assert not info["valid"] and "not a string" in info["reason"]


@pytest.mark.parametrize("T", [0, 1, 4])
def test_episode_length_is_T_plus_one(T):
    env = GroundingRefineEnv(FakeDataset(), max_refine_steps=T)
    assert env.observation_space["step"].n == T + 2
    env.reset(seed=0)
    terms = [env.step("[0, 0, 10, 10]")[2] for _ in range(T + 1)]
    assert terms == [False] * T + [True]


def test_reset_selection():
    env = GroundingRefineEnv(FakeDataset(sizes=[(10, 10)] * 8))
    assert env.reset(options={"sample_id": "fake-5"})[1]["index"] == 5
    assert env.reset(options={"index": -1})[1]["index"] == 7
    assert env.reset(options={"index": np.int64(3)})[1]["index"] == 3
    picks = [env.reset(seed=s)[1]["index"] for s in range(40)]
    assert picks == [env.reset(seed=s)[1]["index"] for s in range(40)]  # deterministic by seed
    assert set(picks) == set(range(8))  # and covers the dataset
    for bad in ({"index": 8}, {"index": "2"}, {"index": True}, {"sample_id": "nope"}, {"foo": 1},
                {"index": 1, "sample_id": "fake-1"}):
        with pytest.raises(ValueError):
            env.reset(options=bad)


def test_sample_id_lookup_without_index_of():
    class NoIndexOf(FakeDataset):
        pass

    env = GroundingRefineEnv(NoIndexOf())
    assert not hasattr(env.dataset, "index_of")
    assert env.reset(options={"sample_id": "fake-2"})[1]["index"] == 2


def test_render_modes():
    env = GroundingRefineEnv(FakeDataset())
    env.reset(seed=0)
    assert env.render() is None
    with pytest.raises(RuntimeError):
        GroundingRefineEnv(FakeDataset(), render_mode="rgb_array").render()
    with pytest.raises(ValueError, match="render_mode"):
        GroundingRefineEnv(FakeDataset(), render_mode="human")


def test_overlay_style_argument():
    env = GroundingRefineEnv(FakeDataset(), overlay={"color": (0, 255, 0), "alpha": 1.0, "outline_width": 0})
    env.reset(options={"index": 2})  # 64 x 64
    obs, *_ = env.step("[0, 0, 500, 500]")
    assert (obs["image"][:32, :32] == [0, 255, 0]).all()
    assert env.overlay_style == OverlayStyle(color=(0, 255, 0), alpha=1.0, outline_width=0)


def test_image_bound_and_argument_errors():
    env = GroundingRefineEnv(FakeDataset())  # sizes (48, 64), (40, 30), (64, 64)
    assert (env.observation_space["image"].max_height, env.observation_space["image"].max_width) == (64, 64)
    assert GroundingRefineEnv(FakeDataset(), max_image_size=(100, 200)).observation_space["image"].max_width == 200
    with pytest.raises(ValueError):
        GroundingRefineEnv(FakeDataset(), max_refine_steps=-1)
    with pytest.raises(TypeError, match="GroundingDataset"):
        GroundingRefineEnv(object())
    with pytest.raises(ValueError, match="dataset_kwargs"):
        GroundingRefineEnv(FakeDataset(), dataset_kwargs={"x": 1})
    with pytest.raises(DatasetError, match="no samples"):
        GroundingRefineEnv(FakeDataset(sizes=[]), max_image_size=(1, 1))


def test_image_that_disagrees_with_its_record_is_reported():
    data = FakeDataset(sizes=[(10, 12)])
    s = data[0]
    wrong = np.zeros((11, 12, 3), np.uint8)  # one row more than the record says
    data._samples[0] = Sample(s.sample_id, s.expression, s.gt_box, 12, 10, "fake", lambda: wrong)
    env = GroundingRefineEnv(FakeDataset(sizes=[(10, 12)]))
    env.reset(seed=0)
    env.dataset = data  # the next reset meets the bad record
    with pytest.raises(DatasetError, match=r"fake-0.*\(10, 12, 3\)"):
        env.reset(seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("[1, 2, 3, 4]")  # a failed reset does not continue the previous episode


def test_observations_are_fresh_arrays(env):
    obs0, _ = env.reset(seed=0)
    obs0["image"][:] = 0  # the caller may write into what it got
    obs1, *_ = env.step("[0, 0, 10, 10]")
    assert obs1["image"].any(), "the env must keep its own original image"
    assert not np.shares_memory(obs1["image"], obs0["image"])


def test_synthetic_by_name():
    env = GroundingRefineEnv("synthetic", split="val", dataset_kwargs={"num_samples": 5})
    assert env.dataset_name == "synthetic" and len(env.unwrapped.dataset) == 5
    obs, info = env.reset(seed=0)
    assert obs["image"].shape == (128, 128, 3) and info["sample_id"].startswith("synthetic-val-")
    x1, y1, x2, y2 = info["gt_box_norm"]
    _, _, _, _, info = env.step(f"[{x1}, {y1}, {x2}, {y2}]")
    assert info["iou"] > 0.9  # the floored GT loses under one normalised unit per side


def test_check_env_on_images_of_varying_size():
    env = GroundingRefineEnv(FakeDataset(), render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning fails the test
        warnings.filterwarnings("ignore", message=".*not having a spec.*")
        check_env(env)


def test_answer_box_option_picks_first_or_last():
    text = "[250, 250, 750, 750] no, rather [0, 0, 100, 100]"
    for which, want in (("last", (0.0, 0.0, 100.0, 100.0)), ("first", (250.0, 250.0, 750.0, 750.0))):
        env = GroundingRefineEnv(FakeDataset(), answer_box=which)
        env.reset(seed=0, options={"index": 0})
        _, _, _, _, info = env.step(text)
        assert info["box_norm"] == want
    assert GroundingRefineEnv(FakeDataset()).answer_box == "last"
    with pytest.raises(ValueError, match="answer_box must be one of"):
        GroundingRefineEnv(FakeDataset(), answer_box="any")


def test_long_actions_are_cut_to_their_tail(monkeypatch):
    """The parser never sees more than the action space's bound (the cost of a step is then bounded too:
    benchmarks/env_step.py prints the worst step time over hostile texts, no timing threshold here)."""
    import ivt_env.env as env_mod
    from ivt_env.env import MAX_ACTION_CHARS

    env = GroundingRefineEnv(FakeDataset())
    assert env.action_space.max_length == MAX_ACTION_CHARS == 16384
    head = "[0, 0, 10, 10] " + "x" * 6_000_000  # 6 MB: the box at the start lies outside the kept tail
    env.reset(seed=0, options={"index": 0})
    _, _, _, _, info = env.step(head + " [250, 250, 750, 750]")
    assert info["action_truncated"] and info["box_norm"] == (250.0, 250.0, 750.0, 750.0) and info["iou"] == 1.0
    _, _, _, _, info = env.step(head)
    assert info["action_truncated"] and not info["valid"]
    _, _, _, _, info = env.step("y" * (MAX_ACTION_CHARS - 20) + "[250, 250, 750, 750]")  # exactly at the bound
    assert not info["action_truncated"] and info["valid"]
    seen = []
    real = env_mod.parse_box
    monkeypatch.setattr(env_mod, "parse_box", lambda text, which="last": seen.append(len(text)) or real(text, which))
    hostile = [
        "[1, 2, 3, 4] " * 460_000,
        '{"bbox_2d": [1, 2, 3, 4]} ' * 700,
        '{"bbox_2d": [1, 2, 3]} ' * 800,
        '{"a": [1, 2, 3, 4], "bbox_2d": [5, 6, 7, 8]} ' * 400,
        "<answer>[1, 2, 3, 4]" * 1000,
        "<think>" * 2400,
        "[" * 20000,
        "[1, 2, 3, " * 1700,
    ]
    expect_valid = [True, True, False, True, True, False, False, False]
    for which in ("last", "first"):
        env = GroundingRefineEnv(FakeDataset(), answer_box=which)
        for text, valid in zip(hostile, expect_valid):
            env.reset(seed=0, options={"index": 0})
            _, _, _, _, info = env.step(text)
            assert info["valid"] is valid, (which, text[:30])
    assert seen and max(seen) <= MAX_ACTION_CHARS
