"""Advantage estimators on hand-computed tensors (2 groups x 3 trajectories, equal-reward groups, SRPO bins)."""

import math

import pytest
import torch

from agents.grpo.advantages import (
    available_advantages,
    compute_advantages,
    get_advantage,
    group_rewards,
    scale_bins,
    zero_std_fraction,
)

R = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]], dtype=torch.float64)


def test_grpo_sample_std_by_hand():
    # group 0: mean 0.5, deviations (0.5, -0.5, 0), sample std sqrt((0.25 + 0.25) / 2) = 0.5 -> (1, -1, 0)
    a = compute_advantages("grpo", R, eps=0.0)
    assert torch.allclose(a, torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    # with the default eps the denominator is 0.5 + 1e-6
    a = compute_advantages("grpo", R, eps=1e-6)
    assert a[0, 0].item() == pytest.approx(0.5 / (0.5 + 1e-6), abs=1e-12)


def test_grpo_population_std_by_hand():
    # population std sqrt(0.5 / 3) = 0.408248...; 0.5 / 0.408248 = 1.224745
    a = compute_advantages("grpo", R, eps=0.0, population_std=True)
    s = math.sqrt(1.5)
    assert torch.allclose(a, torch.tensor([[s, -s, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))


def test_dr_grpo_by_hand():
    a = compute_advantages("dr_grpo", R)
    assert torch.allclose(a, torch.tensor([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "srpo"])
def test_equal_reward_groups_give_exact_zero_never_nan(name):
    # 0.1 * 6 / 6 != 0.1 in floating point: the zero must come from the equality test, not from the arithmetic
    r = torch.tensor([[0.1] * 6, [0.0] * 6, [0.3, 0.3, 0.3, 0.3, 0.3, 0.7]])
    a = compute_advantages(name, r, scales=torch.tensor([0.01, 0.3, 0.5]))
    assert torch.isfinite(a).all()
    assert (a[:2] == 0).all()
    assert (a[2] != 0).all()
    assert zero_std_fraction(r) == pytest.approx(2 / 3)
    assert zero_std_fraction(R) == 0.5


def test_srpo_two_bins_by_hand():
    # edges (0.05, 0.2): group 0 (1% of the image) -> bin 0; groups 1, 2 (50%, 30%) -> bin 2
    r = torch.tensor([[0.1, 0.3, 0.2], [0.9, 0.5, 0.7], [0.4, 0.8, 0.6]], dtype=torch.float64)
    scales = torch.tensor([0.01, 0.5, 0.3])
    assert scale_bins(scales).tolist() == [0, 2, 2]
    # d0 = (-0.1, 0.1, 0): sigma_0 = sqrt(0.02 / 3); d1 = (0.2, -0.2, 0), d2 = (-0.2, 0.2, 0): sigma_2 = sqrt(0.16 / 6)
    # d / sigma is +-sqrt(1.5) = 1.224745 in both bins; weights: K=3 groups, B=2 bins: w_0 = 3/(1*2) = 1.5,
    # w_2 = 3/(2*2) = 0.75
    s = math.sqrt(1.5)
    expect = torch.tensor([[-1.5 * s, 1.5 * s, 0], [0.75 * s, -0.75 * s, 0], [-0.75 * s, 0.75 * s, 0]],
                          dtype=torch.float64)
    a = compute_advantages("srpo", r, scales=scales, eps=0.0)
    assert torch.allclose(a, expect)
    # every bin carries the same total |A|
    assert a[0].abs().sum().item() == pytest.approx(a[1:].abs().sum().item())
    # balance=0: no re-weighting, only the per-bin scale
    a0 = compute_advantages("srpo", r, scales=scales, eps=0.0, balance=0.0)
    assert torch.allclose(a0, torch.tensor([[-s, s, 0], [s, -s, 0], [-s, s, 0]], dtype=torch.float64))


def test_srpo_small_bin_not_drowned_and_equal_group_in_bin():
    # bin 0 holds a learning group with tiny IoU differences and an all-equal group; bin 2 a large-spread group
    r = torch.tensor([[0.1, 0.3, 0.2], [0.5, 0.5, 0.5], [0.9, 0.1, 0.5], [0.4, 0.8, 0.6]], dtype=torch.float64)
    scales = torch.tensor([0.01, 0.02, 0.5, 0.3])
    # bin 0: d = (-0.1, 0.1, 0) and zeros -> sigma_0 = sqrt(0.02 / 6); w_0 = 4 / (2*2) = 1
    # bin 2: d = (0.4, -0.4, 0), (-0.2, 0.2, 0) -> sigma_2 = sqrt((0.32 + 0.08) / 6); w_2 = 1
    a = compute_advantages("srpo", r, scales=scales, eps=0.0)
    s0, s2 = math.sqrt(0.02 / 6), math.sqrt(0.4 / 6)
    expect = torch.tensor([[-0.1 / s0, 0.1 / s0, 0], [0, 0, 0], [0.4 / s2, -0.4 / s2, 0], [-0.2 / s2, 0.2 / s2, 0]],
                          dtype=torch.float64)
    assert torch.allclose(a, expect)
    # plain group-mean centring (dr_grpo) would give the small group 4x less weight than the large one
    assert a[0, 1] > a[3, 1]


def test_registry_import_path_and_errors():
    assert {"grpo", "dr_grpo", "srpo"} <= set(available_advantages())
    assert get_advantage("agents.grpo.advantages:dr_grpo_advantages") is get_advantage("dr_grpo")
    assert get_advantage("agents.grpo.advantages.grpo_advantages") is get_advantage("grpo")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        get_advantage("nope")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        get_advantage("agents.grpo.advantages:nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg'"):
        get_advantage("no_such_pkg:fn")
    with pytest.raises(ValueError, match="scales"):
        compute_advantages("srpo", R)
    with pytest.raises(ValueError, match="shape"):
        compute_advantages("grpo", torch.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages("grpo", torch.tensor([[0.0, float("nan")]]))
    assert group_rewards([1, 2, 3, 4, 5, 6], 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="groups of 4"):
        group_rewards([1, 2, 3], 4)
