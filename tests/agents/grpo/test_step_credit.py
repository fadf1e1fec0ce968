"""Per-step credit: the per-step estimators on hand-made IoU tensors, the per-token layout, and the update path
(per-step advantages that are equal over the steps give exactly the per-trajectory update)."""

import math

import pytest
import torch

from agents.grpo.advantages import available_step_advantages, compute_step_advantages
from agents.grpo.update import policy_update
from agents.grpo.losses import grpo_loss
from agents.grpo.step_credit import check_branches, step_scores, token_advantages
from rollouts.types import Step, Trajectory
from tests.agents.toy_policy import ToyBoxPolicy

# 3 trajectories (one group) x 3 steps of IoU, chosen by hand
S = torch.tensor([[[0.2, 0.5, 0.6], [0.4, 0.3, 0.3], [0.9, 0.9, 0.9]]], dtype=torch.float64)
R = S[:, :, -1].clone()


def test_registry_lists_the_per_step_estimators():
    assert {"progressive", "step_delta", "branch"} <= set(available_step_advantages())
    with pytest.raises(ValueError, match="unknown per-step"):
        compute_step_advantages("nope", S, returns=R)


def test_progressive_by_hand():
    # SIFThinker r_t = s_t + (s_t - mean_j s_{j,t-1}):
    #   r_0 = s_0 = [0.2, 0.4, 0.9]
    #   r_1 = 2 [0.5, 0.3, 0.9] - mean(0.2, 0.4, 0.9) = 2 s_1 - 0.5 = [0.5, 0.1, 1.3]
    #   r_2 = 2 [0.6, 0.3, 0.9] - mean(0.5, 0.3, 0.9) = [0.6333, 0.0333, 1.2333]
    # A_t = (r_t - mean) / sample std, per step:
    #   step 0: dev [-0.3, -0.1, 0.4], std sqrt(0.26 / 2) = 0.360555 -> [-0.83205, -0.27735, 1.10940]
    #   step 1: mean 0.63333, dev [-0.13333, -0.53333, 0.66667], std sqrt(0.746667 / 2) = 0.611010
    #           -> [-0.21822, -0.87287, 1.09109]
    #   step 2: mean 0.63333, dev [0, -0.6, 0.6], std 0.6 -> [0, -1, 1]
    want = torch.tensor([[[-0.83205, -0.21822, 0.0], [-0.27735, -0.87287, -1.0], [1.10940, 1.09109, 1.0]]],
                        dtype=torch.float64)
    got = compute_step_advantages("progressive", S, returns=R, eps=0.0)
    assert torch.allclose(got, want, atol=1e-5), got


def test_step_delta_by_hand():
    # step 0: the return R = s_2 = [0.6, 0.3, 0.9]: mean 0.6, dev [0, -0.3, 0.3], std 0.3 -> [0, -1, 1]
    # step 1: s_1 - s_0 = [0.3, -0.1, 0.0]: mean 0.066667, dev [0.233333, -0.166667, -0.066667],
    #         std sqrt(0.086667 / 2) = 0.208167 -> [1.12090, -0.80064, -0.32026]
    # step 2: s_2 - s_1 = [0.1, 0, 0]: mean 0.033333, dev [0.066667, -0.033333, -0.033333], std 0.057735
    #         -> [1.15470, -0.57735, -0.57735]
    want = torch.tensor([[[0.0, 1.12090, 1.15470], [-1.0, -0.80064, -0.57735], [1.0, -0.32026, -0.57735]]],
                        dtype=torch.float64)
    got = compute_step_advantages("step_delta", S, returns=R, eps=0.0)
    assert torch.allclose(got, want, atol=1e-5), got


def test_branch_by_hand():
    # N = 4, M = 2 siblings per step-0 answer; returns [1.0, 0.6 | 0.2, 0.2]
    scores = torch.tensor([[[0.5, 0.7, 1.0], [0.5, 0.4, 0.6], [0.1, 0.2, 0.2], [0.1, 0.2, 0.2]]], dtype=torch.float64)
    ret = scores[:, :, -1].clone()
    got = compute_step_advantages("branch", scores, returns=ret, branch=2, eps=0.0)
    # step 0: sibling means [0.8, 0.8, 0.2, 0.2], mean 0.5, dev +-0.3, sample std sqrt(0.36 / 3) -> +-0.866025
    assert torch.allclose(got[0, :, 0], torch.tensor([0.866025, 0.866025, -0.866025, -0.866025],
                                                     dtype=torch.float64), atol=1e-5)
    # refinements vs siblings: [1.0, 0.6] -> +-1/sqrt(2); the tied block [0.2, 0.2] -> exactly 0
    r = 1 / math.sqrt(2)
    assert torch.allclose(got[0, :, 1], torch.tensor([r, -r, 0.0, 0.0], dtype=torch.float64), atol=1e-6)
    assert torch.equal(got[0, :, 1], got[0, :, 2])
    # progressive on the same branching group: step t >= 1 compared within the sibling block
    prog = compute_step_advantages("progressive", scores, returns=ret, branch=2, eps=0.0)
    assert torch.allclose(prog[0, :2, 1], torch.tensor([r, -r], dtype=torch.float64), atol=1e-6)  # 0.7 vs 0.4
    assert torch.equal(prog[0, 2:, 1], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="branch"):
        compute_step_advantages("branch", scores, returns=ret, branch=1)


def _traj(counts, ious=None, first=None):
    steps = []
    for t, n in enumerate(counts):
        ids = list(first) if (t == 0 and first is not None) else list(range(10 * t, 10 * t + n))
        steps.append(Step(t=t, text="", valid=True, iou=(ious[t] if ious else 0.0), token_ids=ids,
                          logprobs=[-1.0] * len(ids), injected_ids=[]))
    return Trajectory(sample_id="s", dataset="d", expression="x", gt_box=[0, 0, 1, 1], width=1, height=1, steps=steps)


def test_token_layout_and_scores():
    trajs = [_traj([2, 1, 3], [0.1, 0.2, 0.3]), _traj([1, 2, 1], [0.4, 0.5, 0.6])]
    like = torch.zeros(2, 7)
    step_adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    got = token_advantages(trajs, step_adv, like)
    want = torch.tensor([[1, 1, 2, 3, 3, 3, 0], [4, 5, 5, 6, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(got, want)
    assert torch.equal(step_scores([trajs]), torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]], dtype=torch.float64))
    check_branches([[_traj([2, 1], first=[7, 8]), _traj([2, 1], first=[7, 8])]], 2)
    with pytest.raises(ValueError, match="do not share"):
        check_branches([[_traj([2, 1], first=[7, 8]), _traj([2, 1], first=[7, 9])]], 2)


def test_per_token_loss_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv_tok = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 4.0, 9.0]])
    out = grpo_loss(lp, mask, adv_tok, beta=0.0, entropy_coef=0.0)
    # -(sum of lp * A over the 5 real tokens) / 5 = -(-1 - 4 - 9 + 0.5 - 6) / 5 = 19.5 / 5
    assert out.pg == pytest.approx(19.5 / 5)
    per_traj = grpo_loss(lp, mask, torch.tensor([2.0, -1.0]), beta=0.0, entropy_coef=0.0)
    same = grpo_loss(lp, mask, torch.tensor([[2.0] * 3, [-1.0] * 3]), beta=0.0, entropy_coef=0.0)
    assert same.pg == per_traj.pg


def test_per_step_update_equals_per_trajectory_update_when_steps_agree():
    trajs = [_traj([1, 1, 1]) for _ in range(4)]
    for k, t in enumerate(trajs):  # the toy policy's token ids are candidate indices
        for s in t.steps:
            s.token_ids = [(k + s.t) % 9]
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    out = []
    for a in (adv, adv[:, None].expand(4, 3)):
        pol = ToyBoxPolicy()
        opt = torch.optim.SGD(pol.trainable_parameters(), lr=0.1)
        policy_update(pol, opt, trajs, a, beta=0.04, entropy_coef=0.01, grad_accum=2)
        out.append(pol.logits.detach().clone())
    assert torch.equal(out[0], out[1])


def test_step0_weight_scales_only_step_zero():
    """update_advantages with step0_weight 0: step_delta's hand values above with step 0 zeroed, refinement kept."""
    from agents.grpo.config import GRPOConfig
    from agents.grpo.step_credit import update_advantages

    groups = [[_traj([1, 1, 1], ious=S[0, i].tolist()) for i in range(3)]]
    cfg = GRPOConfig(group_size=3, step_advantage="step_delta", step0_weight=0.0, adv_eps=0.0)
    got = update_advantages(cfg, groups, R.clone(), torch.zeros(3))
    want = compute_step_advantages("step_delta", S, returns=R, eps=0.0).reshape(3, 3)
    assert torch.equal(got[:, 0], torch.zeros(3)) and torch.allclose(got[:, 1:], want[:, 1:])
    with pytest.raises(ValueError, match="step0_weight"):
        GRPOConfig(step0_weight=0.0, step_advantage="").validate()


def _stopped(ious):
    steps = [Step(t=k, text="", valid=True, iou=v, token_ids=[1], logprobs=[-1.0]) for k, v in enumerate(ious)]
    return Trajectory(sample_id="s", dataset="d", expression="x", gt_box=[0, 0, 1, 1], width=1, height=1, steps=steps)


def test_variable_length_step_scores_and_delta_advantages_by_hand():
    # A stopped at step 1, B used T = 2, C stopped at step 0: padded with each one's LAST score
    group = [_stopped([0.2, 0.6]), _stopped([0.4, 0.3, 0.5]), _stopped([0.9])]
    scores = step_scores([group])
    assert torch.equal(scores, torch.tensor([[[0.2, 0.6, 0.6], [0.4, 0.3, 0.5], [0.9, 0.9, 0.9]]], dtype=torch.float64))
    # step_delta, returns R = final IoUs [0.6, 0.5, 0.9], sample std:
    #   step 0: R - mean 2/3 = [-1/15, -1/6, 7/30], std sqrt(0.086667 / 2) = 0.208167 -> [-0.32026, -0.80064, 1.12090]
    #   step 1: deltas [0.4, -0.1, 0] - 0.1 = [0.3, -0.2, -0.1], std sqrt(0.07) -> [1.13389, -0.75593, -0.37796]
    #   step 2: deltas [0, 0.2, 0] - 1/15, std sqrt(0.013333) = 0.115470 -> [-0.57735, 1.15470, -0.57735]
    adv = compute_step_advantages("step_delta", scores, returns=torch.tensor([[0.6, 0.5, 0.9]], dtype=torch.float64),
                                  eps=0.0)
    want = torch.tensor([[[-0.32026, 1.13389, -0.57735], [-0.80064, -0.75593, 1.15470], [1.12090, -0.37796, -0.57735]]],
                        dtype=torch.float64)
    assert torch.allclose(adv, want, atol=1e-5), adv
    # per token: only the steps taken get credit (C's one token gets its step-0 advantage, nothing else)
    tok = token_advantages(group, adv.reshape(3, 3), torch.zeros(3, 3))
    assert torch.allclose(tok, want[0].float() * torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]), atol=1e-5)
    equal = [_stopped([0.1, 0.2, 0.3]), _stopped([0.4, 0.5, 0.6])]  # equal lengths: exactly as before
    assert torch.equal(step_scores([equal]), torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]], dtype=torch.float64))
