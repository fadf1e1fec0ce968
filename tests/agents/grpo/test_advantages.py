"""Advantage estimators on hand-computed tensors (2 groups x 3 trajectories, equal-reward groups, SRPO as Ground-R1
defines it, non-finite rewards as TRL treats them, TRL's eps)."""

import inspect
import math

import pytest
import torch

from agents.grpo.advantages import (
    available_advantages,
    compute_advantages,
    get_advantage,
    grpo_advantages,
    group_rewards,
    nonfinite_fraction,
    srpo_bins,
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
    scales = torch.tensor([[0.01] * 6, [0.3] * 6, [0.5, 0.9, 0.1, 0.5, 0.5, float("nan")]])
    a = compute_advantages(name, r, scales=scales)
    assert torch.isfinite(a).all()
    assert (a[:2] == 0).all()
    assert (a[2] != 0).all()
    assert zero_std_fraction(r) == pytest.approx(2 / 3)
    assert zero_std_fraction(R) == 0.5


def test_srpo_bins_ground_r1_discretisation():
    # s(i) = min(floor(K a_i) + 1, K), K = 3; no valid box (NaN) -> bin 0
    a = torch.tensor([0.0, 0.2, 0.34, 0.5, 0.7, 1.0, float("nan")])
    assert srpo_bins(a, 3).tolist() == [1, 1, 2, 2, 3, 3, 0]
    assert srpo_bins(a, 1).tolist() == [1, 1, 1, 1, 1, 1, 0]


def test_srpo_intra_and_inter_bin_by_hand():
    # one group, N = 6; areas -> bins (1, 1, 2, 2, 0, 3)
    r = torch.tensor([[0.9, 0.5, 0.7, 0.3, 0.2, 0.6]], dtype=torch.float64)
    scales = torch.tensor([[0.1, 0.2, 0.5, 0.4, float("nan"), 0.9]], dtype=torch.float64)
    # intra: bin 1 {0.9, 0.5}: mu 0.7, sample std 0.2 * sqrt(2); bin 2 {0.7, 0.3}: mu 0.5, same std -> +-1/sqrt(2);
    # bins 0 and 3 hold one rollout each -> 0
    h = 1 / math.sqrt(2)
    intra = [h, -h, h, -h, 0.0, 0.0]
    # inter: best mean is bin 1 (0.7) -> r_inter = (1, 1, 0, 0, 0, 0): mean 1/3, sample std sqrt(4/15)
    sd = math.sqrt(4 / 15)
    inter = [(2 / 3) / sd] * 2 + [(-1 / 3) / sd] * 4
    a = compute_advantages("srpo", r, scales=scales, eps=0.0)
    assert torch.allclose(a, torch.tensor([[x + y for x, y in zip(intra, inter)]], dtype=torch.float64))


def test_srpo_is_grpo_when_each_group_grounds_one_scale():
    # the case: one small-box group among eight. Ground-R1 bins ROLLOUTS, so a group whose rollouts all
    # ground boxes of one scale is normalised exactly like GRPO (no inter-bin term): the small group keeps its
    # GRPO share of the summed |A| (the old GT-area bin balancing gave it 48.6%).
    g = torch.Generator().manual_seed(0)
    r = torch.rand(8, 6, generator=g, dtype=torch.float64)
    r[0] = r[0] * 0.05  # small IoU differences: the small-box group
    scales = torch.full((8, 6), 0.5, dtype=torch.float64)
    scales[0] = 0.01
    a = compute_advantages("srpo", r, scales=scales)
    assert torch.allclose(a, compute_advantages("grpo", r))
    share = a[0].abs().sum() / a.abs().sum()
    assert 0.08 < share < 0.17  # ~ the fair 1/8, not ~1/2


def test_srpo_all_equal_group_across_bins_is_zero():
    r = torch.tensor([[0.4, 0.4, 0.4, 0.4]], dtype=torch.float64)
    scales = torch.tensor([[0.05, 0.5, 0.9, float("nan")]], dtype=torch.float64)
    assert (compute_advantages("srpo", r, scales=scales) == 0).all()


def test_nonfinite_reward_gets_zero_and_group_normalised_without_it():
    # TRL: nanmean / nanstd over the group, nan_to_num(adv, 0). Group 0's finite rewards (1, 0, 0.5): mean 0.5,
    # sample std 0.5 -> (1, -1, 0); the NaN and the inf get 0
    r = torch.tensor([[1.0, float("nan"), 0.0, 0.5, float("inf")], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=torch.float64)
    a = compute_advantages("grpo", r, eps=0.0)
    assert torch.isfinite(a).all()
    assert torch.allclose(a[0], torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(a[1], compute_advantages("grpo", r[1:], eps=0.0)[0])
    assert nonfinite_fraction(r) == pytest.approx(0.2)
    assert zero_std_fraction(r) == 0.0
    # a group with a single finite reward has nothing to compare: all 0
    one = torch.tensor([[float("nan"), 0.3, float("-inf")]])
    assert (compute_advantages("dr_grpo", one) == 0).all() and zero_std_fraction(one) == 1.0
    # srpo: the per-rollout scales are cut like the rewards
    sc = torch.tensor([[0.1, 0.1, 0.1, 0.5, 0.5], [0.5] * 5], dtype=torch.float64)
    a = compute_advantages("srpo", r, scales=sc, eps=0.0)
    keep = torch.tensor([0, 2, 3])
    ref = compute_advantages("srpo", r[:1, keep], scales=sc[:1, keep], eps=0.0)
    assert torch.allclose(a[0, keep], ref[0]) and a[0, 1] == 0 and a[0, 4] == 0


def test_default_eps_is_trl_1e_4_and_damps_near_ties():
    from agents.grpo.config import GRPOConfig

    assert GRPOConfig().adv_eps == 1e-4
    assert inspect.signature(grpo_advantages).parameters["eps"].default == 1e-4
    # rewards 1e-5 apart (noise): deviations +-5e-6, sample std 5e-6 * sqrt(2)
    r = torch.tensor([[0.5, 0.5 + 1e-5]], dtype=torch.float64)
    d, sd = 0.5e-5, 0.5e-5 * math.sqrt(2)
    assert compute_advantages("grpo", r)[0, 1].item() == pytest.approx(d / (sd + 1e-4), rel=1e-6)  # 0.0467
    assert compute_advantages("grpo", r, eps=1e-6)[0, 1].item() == pytest.approx(d / (sd + 1e-6), rel=1e-6)  # 0.62


def test_registry_import_path_and_errors():
    assert {"grpo", "dr_grpo", "centered", "srpo"} <= set(available_advantages())
    assert get_advantage("centered") is get_advantage("dr_grpo")
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
    with pytest.raises(ValueError, match=r"\(G, N\)"):
        compute_advantages("srpo", R, scales=torch.tensor([0.1, 0.2]))
    assert group_rewards([1, 2, 3, 4, 5, 6], 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="groups of 4"):
        group_rewards([1, 2, 3], 4)
