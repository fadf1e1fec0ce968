"""Rewards on hand-computed cases; reward shaping as a ``reward_fn`` and as a ``RewardWrapper``."""

import gymnasium as gym
import pytest

from ivt_env.env import GroundingRefineEnv
from ivt_env.rewards import (
    REWARDS,
    ShapedReward,
    dense_iou_improvement,
    get_reward,
    ivt_reward,
    register_reward,
    reward_name,
    reward_extras,
    sifthinker_reward,
    vlm_r1_iou,
)
from ivt_env.wrappers import RecordStepIoUs, ShapedRewardWrapper
from tests.ivt_env.fake_data import FakeDataset


def per_step(fn, ious, valids):
    """The reward at each step of an episode with these per-step IoUs (T = len - 1)."""
    T = len(ious) - 1
    return [fn(ious[: t + 1], valids[: t + 1], step=t, max_steps=T) for t in range(T + 1)]


def test_ivt_eq3():
    assert per_step(ivt_reward, [0.3, 0.5, 0.8], [True, True, True]) == pytest.approx([0, 0, 0.8 + 0.1])
    # one invalid step of three: format fraction 2/3
    assert per_step(ivt_reward, [0.3, 0.0, 0.8], [True, False, True]) == pytest.approx([0, 0, 0.8 + 0.1 * 2 / 3])
    assert per_step(ivt_reward, [0.0, 0.0, 0.0], [False, False, False]) == [0, 0, 0]
    # T = 0 (single shot): IoU + 0.1
    assert per_step(ivt_reward, [0.6], [True]) == pytest.approx([0.7])


def test_dense_improvement_telescopes_to_final_iou():
    r = per_step(dense_iou_improvement, [0.3, 0.5, 0.2], [True, True, True])
    assert r == pytest.approx([0.3, 0.2, -0.3])
    assert sum(r) == pytest.approx(0.2)


def test_vlm_r1_pure_iou():
    assert per_step(vlm_r1_iou, [0.3, 0.5, 0.8], [True, True, True]) == pytest.approx([0, 0, 0.8])
    assert per_step(vlm_r1_iou, [0.3, 0.5, 0.0], [True, True, False]) == [0, 0, 0]


def test_sifthinker_correction_enhanced():
    # s_end + (s_end - s_init)
    assert per_step(sifthinker_reward, [0.3, 0.5, 0.8], [True] * 3) == pytest.approx([0, 0, 0.8 + 0.5])
    assert per_step(sifthinker_reward, [0.6, 0.5, 0.4], [True] * 3) == pytest.approx([0, 0, 0.4 - 0.2])
    assert per_step(sifthinker_reward, [1.0, 0.0], [True, False]) == pytest.approx([0, -1.0])


SMALL, WHOLE = (100, 100, 300, 300), (0, 0, 1000, 1000)


def test_sifthinker_s_init_is_the_first_box_not_covering_the_image():
    # SIFThinker: B_ini = first box of the trajectory that does not cover the whole image
    r = lambda ious, valids, boxes: sifthinker_reward(ious, valids, step=len(ious) - 1,  # noqa: E731
                                                      max_steps=len(ious) - 1, boxes=boxes)
    # invalid step 0: s_init is step 1's 0.5 -> 0.8 + 0.3 = 1.10 (step 0's 0 would give 1.60)
    assert r([0.0, 0.5, 0.8], [False, True, True], [None, SMALL, SMALL]) == pytest.approx(1.10)
    # whole-image step 0 (IoU 0.1) is skipped too
    assert r([0.1, 0.5, 0.8], [True, True, True], [WHOLE, SMALL, SMALL]) == pytest.approx(1.10)
    # no box before the end qualifies: s_init = s_end, no correction to pay for
    assert r([0.1, 0.0, 0.8], [True, False, True], [WHOLE, None, SMALL]) == pytest.approx(0.8)
    assert r([0.1, 0.1], [True, True], [WHOLE, WHOLE]) == pytest.approx(0.1)
    # a qualifying step 0 is s_init as before
    assert r([0.3, 0.5, 0.8], [True] * 3, [SMALL] * 3) == pytest.approx(1.3)
    with pytest.raises(ValueError, match="boxes"):
        r([0.3, 0.5], [True, True], [SMALL])


def test_reward_extras_detected_from_the_signature():
    def old_style(ious, valids, *, step, max_steps):
        return 0.0

    def with_boxes(ious, valids, *, step, max_steps, boxes):
        return 0.0

    def with_kwargs(ious, valids, **kw):  # a catch-all does not ask for boxes: only a named parameter does
        return 0.0

    assert reward_extras(old_style) == frozenset() and reward_extras(with_kwargs) == frozenset()
    assert reward_extras(with_boxes) == {"boxes"} and reward_extras(sifthinker_reward) == {"boxes"}
    assert reward_extras(ShapedReward()) == frozenset() and reward_extras(ivt_reward) == frozenset()


def test_shaped_components_by_hand():
    f = ShapedReward()
    # ious 0.3 -> 0.5 -> 0.5, all valid
    # step 0: format +0.05
    # step 1: d = 0.2 -> improvement 0.2, format 0.05
    # step 2: d = 0 -> stagnation -0.05 (0.5 < 0.9), format 0.05, convergence 0.5, efficiency 0.1 * (3 - 1) / 3
    assert per_step(f, [0.3, 0.5, 0.5], [True] * 3) == pytest.approx([0.05, 0.25, 0.5 + 0.2 / 3])
    c = f.components([0.3, 0.5, 0.5], [True] * 3, step=2, max_steps=2)
    assert c == pytest.approx(
        dict(improvement=0, regression=0, stagnation=-0.05, format=0.05, convergence=0.5, efficiency=0.2 / 3)
    )
    # regression then recovery: 0.8 -> invalid (0) -> 0.95
    # step 1: regression -0.8, format -0.05; step 2: improvement 0.95 + format 0.05 + convergence 0.95 + eff 0.1
    assert per_step(f, [0.8, 0.0, 0.95], [True, False, True]) == pytest.approx([0.05, -0.85, 2.05])
    # copying an already good box is not stagnation: 0.95 -> 0.95, T = 1: format + convergence + efficiency 0.1
    assert per_step(f, [0.95, 0.95], [True, True]) == pytest.approx([0.05, 1.1])
    # custom weights
    g = ShapedReward(w_format=0.0, w_converge=2.0, w_efficiency=0.0, w_stagnate=0.0)
    assert per_step(g, [0.2, 0.2], [True, True]) == pytest.approx([0.0, 0.4])


@pytest.mark.parametrize("fn", list(REWARDS.values()))
def test_contract_is_checked(fn):
    with pytest.raises(ValueError, match="reward contract"):
        fn([0.1, 0.2], [True], step=1, max_steps=2)
    with pytest.raises(ValueError, match="reward contract"):
        fn([0.1, 0.2], [True, True], step=3, max_steps=2)


def test_get_reward_resolution():
    assert get_reward(None) is ivt_reward
    assert get_reward("ivt") is ivt_reward
    assert get_reward("iou") is vlm_r1_iou and get_reward("dense") is dense_iou_improvement
    assert get_reward("sifthinker") is sifthinker_reward and isinstance(get_reward("shaped"), ShapedReward)
    assert get_reward("ivt_env.rewards:vlm_r1_iou") is vlm_r1_iou
    assert isinstance(get_reward("ivt_env.rewards:ShapedReward"), ShapedReward)  # a class is instantiated

    def mine(ious, valids, *, step, max_steps):
        return 1.0

    assert get_reward(mine) is mine
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ValueError, match="reward 'ivt_env.rewards:missing': module 'ivt_env.rewards' has no attr"):
        get_reward("ivt_env.rewards:missing")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="non-callable"):
        get_reward("ivt_env.rewards:__doc__")
    with pytest.raises(TypeError):
        get_reward(3)


def test_register_reward_and_names():
    def constant(ious, valids, *, step, max_steps):
        return 0.5

    register_reward("test-constant", constant)
    try:
        assert get_reward("test-constant") is constant
        assert reward_name(constant) == "test-constant"
    finally:
        del REWARDS["test-constant"]
    assert reward_name(ivt_reward) == "ivt" and reward_name(ShapedReward()) == "shaped"
    assert reward_name(constant).endswith("constant")
    with pytest.raises(TypeError):
        register_reward("x", 3)


# ---------------------------------------------------------------- shaping in the env, two ways
# FakeDataset sample 0: 64 x 48 image, GT (16, 12, 48, 36) px = [250, 250, 750, 750] normalised.
# "[0, 0, 500, 500]" -> (0, 0, 32, 24) px: overlap 16 x 12 = 192, union 768 + 768 - 192 = 1344 -> IoU 1/7.
EPISODE = ["<think>first</think> [0, 0, 500, 500]", "I do not know", '{"bbox_2d": [250, 250, 750, 750]}']
IOUS, VALIDS = [1 / 7, 0.0, 1.0], [True, False, True]


def run(env):
    env.reset(options={"index": 0})
    out = []
    for text in EPISODE:
        _, r, terminated, _, info = env.step(text)
        out.append(r)
    assert terminated and info["ious"] == pytest.approx(IOUS) and info["valids"] == VALIDS
    return out, info


def test_env_rewards_by_name_hand_values():
    rewards, _ = run(GroundingRefineEnv(FakeDataset()))
    assert rewards == pytest.approx([0, 0, 1 + 0.1 * 2 / 3])
    shaped, _ = run(GroundingRefineEnv(FakeDataset(), reward_fn="shaped"))
    # step 0: +0.05; step 1: regression -1/7, format -0.05; step 2: improvement 1 + format 0.05 + convergence 1
    # + efficiency 0.1 * (3 - 2) / 3
    assert shaped == pytest.approx([0.05, -1 / 7 - 0.05, 2.05 + 0.1 / 3])
    assert shaped == pytest.approx(per_step(ShapedReward(), IOUS, VALIDS))


def test_shaping_as_reward_wrapper():
    env = ShapedRewardWrapper(GroundingRefineEnv(FakeDataset()), shaping="shaped", scale=0.5)
    rewards, info = run(env)
    base = per_step(ivt_reward, IOUS, VALIDS)
    extra = per_step(ShapedReward(), IOUS, VALIDS)
    assert rewards == pytest.approx([b + 0.5 * e for b, e in zip(base, extra)])
    assert info["base_reward"] == pytest.approx(base[-1])
    assert info["shaping_reward"] == pytest.approx(0.5 * extra[-1])
    # potential-based shaping: the return grows by exactly the final IoU
    env = ShapedRewardWrapper(GroundingRefineEnv(FakeDataset()), shaping="dense")
    rewards, _ = run(env)
    assert sum(rewards) == pytest.approx(sum(base) + IOUS[-1])
    assert "dense" in repr(env)


def test_reward_wrapper_is_a_plain_wrapper_reading_the_step_info():
    # a RewardWrapper's reward(r) cannot see the IoUs the shaping needs: the wrapper changes reward AND info
    assert not isinstance(ShapedRewardWrapper(GroundingRefineEnv(FakeDataset())), gym.RewardWrapper)
    env = ShapedRewardWrapper(GroundingRefineEnv(FakeDataset()), shaping=lambda i, v, *, step, max_steps: 10 * i[-1],
                              scale=0.5)
    env.reset(seed=0)
    _, r, _, _, info = env.step("[0, 0, 1000, 1000]")
    assert info["shaping_reward"] == pytest.approx(0.5 * 10 * info["iou"])
    assert r == pytest.approx(info["base_reward"] + 5 * info["iou"])


def test_custom_callable_sees_the_contract():
    calls = []

    def spy(ious, valids, *, step, max_steps):
        calls.append((list(ious), list(valids), step, max_steps))
        ious.append(99.0)  # the env passes copies: mutating them must not leak into the env
        return float(step)

    rewards, _ = run(GroundingRefineEnv(FakeDataset(), reward_fn=spy))
    assert rewards == [0.0, 1.0, 2.0]
    assert [c[2:] for c in calls] == [(0, 2), (1, 2), (2, 2)]
    assert calls[-1][0] == pytest.approx(IOUS) and calls[-1][1] == VALIDS


def test_env_passes_boxes_to_a_reward_that_names_them():
    # EPISODE: step 0 "[0, 0, 500, 500]" (IoU 1/7), step 1 invalid, step 2 the GT (IoU 1)
    seen = []

    def spy(ious, valids, *, step, max_steps, boxes):
        seen.append(list(boxes))
        return 0.0

    run(GroundingRefineEnv(FakeDataset(), reward_fn=spy))
    assert seen[-1] == [(0, 0, 500, 500), None, (250, 250, 750, 750)]
    assert [len(b) for b in seen] == [1, 2, 3]
    rewards, info = run(GroundingRefineEnv(FakeDataset(), reward_fn="sifthinker"))
    assert info["boxes_norm"] == seen[-1]
    assert rewards == pytest.approx([0, 0, 1 + (1 - 1 / 7)])
    # a whole-image step 0 is not B_ini: s_init is then the final box's IoU (no correction term)
    env = GroundingRefineEnv(FakeDataset(), reward_fn="sifthinker")
    env.reset(options={"index": 0})
    for text in ["[0, 0, 1000, 1000]", "nothing", "[250, 250, 750, 750]"]:
        _, r, *_ = env.step(text)
    assert r == pytest.approx(1.0)
    # the wrapper passes them too
    rewards, _ = run(ShapedRewardWrapper(GroundingRefineEnv(FakeDataset()), shaping="sifthinker", scale=1.0))
    assert rewards[-1] == pytest.approx(1 + 0.1 * 2 / 3 + 1 + (1 - 1 / 7))


def test_record_step_ious_wrapper():
    env = RecordStepIoUs(GroundingRefineEnv(FakeDataset()), maxlen=2)
    _, info = run(env)
    ep = info["episode"]
    assert ep["ious"] == pytest.approx(IOUS) and ep["valids"] == VALIDS and ep["length"] == 3
    assert ep["return"] == pytest.approx(1 + 0.1 * 2 / 3) and ep["delta"] == pytest.approx(1 - 1 / 7)
    assert ep["sample_id"] == "fake-0"
    run(env)
    run(env)
    assert len(env.history) == 2
