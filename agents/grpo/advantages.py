"""Group-relative advantage estimators, pluggable by name or import path.

Every estimator maps trajectory returns ``rewards`` of shape (G, N) (G groups = prompts, N trajectories per prompt)
to advantages of the same shape. Extra per-group data (``scales``: the GT box area as a fraction of the image area,
shape (G,)) is passed by keyword; estimators that do not need it ignore it.

A group whose rewards are all equal carries no learning signal: its advantages are exactly 0 (never NaN), and
:func:`zero_std_fraction` reports the share of such groups (``rollout/frac_zero_std_groups``).

Add an estimator with ``@register_advantage("name")``, or name any callable by import path
(``my_pkg.my_mod:my_fn`` or ``my_pkg.my_mod.my_fn``) with the signature
``fn(rewards, *, eps, scales=None, **kwargs) -> Tensor (G, N)``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ivt_env.registries import Registry

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.get  # a registered name, else an import path 'pkg.mod:fn'


def available_advantages() -> list[str]:
    return ADVANTAGES.names()


def compute_advantages(name_or_path: str, rewards: torch.Tensor, **kwargs) -> torch.Tensor:
    """Validate ``rewards`` (G, N), run the estimator, and zero every all-equal group."""
    rewards = _check(rewards)
    adv = get_advantage(name_or_path)(rewards, **kwargs)
    if adv.shape != rewards.shape:
        raise ValueError(f"advantage estimator {name_or_path!r} returned shape {tuple(adv.shape)}, "
                         f"expected {tuple(rewards.shape)}")
    return _zero_equal(rewards, adv)


def zero_std_fraction(rewards: torch.Tensor) -> float:
    """Share of groups whose N rewards are all equal (no learning signal)."""
    rewards = _check(rewards)
    return float(_equal_groups(rewards).float().mean()) if rewards.shape[0] else 0.0


def group_rewards(returns: Sequence[float], group_size: int) -> torch.Tensor:
    """Reshape a flat list of returns, ordered group by group, into (G, N)."""
    if group_size <= 0 or len(returns) % group_size:
        raise ValueError(f"{len(returns)} returns do not split into groups of {group_size}")
    return torch.tensor(list(returns), dtype=torch.float64).view(-1, group_size)


def _check(rewards: torch.Tensor) -> torch.Tensor:
    rewards = torch.as_tensor(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape (G groups, N trajectories), got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards contain NaN/inf: {rewards.tolist()}")
    return rewards.to(torch.float64) if not rewards.is_floating_point() else rewards


def _equal_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(G,) bool: all N rewards of the group are equal (exact comparison; a constant group has no signal)."""
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def _zero_equal(rewards: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Exact zeros for all-equal groups (``mean`` of equal floats can differ from them by rounding)."""
    return torch.where(_equal_groups(rewards)[:, None], torch.zeros_like(adv), adv)


def _std(x: torch.Tensor, dim, population: bool) -> torch.Tensor:
    n = x.shape[dim] if isinstance(dim, int) else x.numel()
    if not population and n < 2:
        return torch.zeros_like(x.mean(dim=dim))
    return x.std(dim=dim, correction=0 if population else 1)


# ---------------------------------------------------------------------------------------------------- estimators
@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, population_std: bool = False,
                    **_: object) -> torch.Tensor:
    """IVT Eq. 1: ``A_gi = (R_gi - mean_g) / (std_g + eps)``.

    ``std_g`` is the SAMPLE standard deviation of the group (Bessel-corrected, divisor N-1) by default, as in the
    GRPO reference implementations (``torch.std``: DeepSeekMath/TRL/verl); ``population_std=True`` divides by N.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = _std(rewards, 1, population_std).unsqueeze(1)
    return _zero_equal(rewards, (rewards - mean) / (std + eps))


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, **_: object) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): ``A_gi = R_gi - mean_g``, no division by the group std (which up-weights
    near-tie groups, i.e. too easy or too hard prompts)."""
    return _zero_equal(rewards, rewards - rewards.mean(dim=1, keepdim=True))


DEFAULT_SCALE_EDGES = (0.05, 0.2)


@register_advantage("srpo")
def srpo_advantages(rewards: torch.Tensor, *, scales: Optional[torch.Tensor] = None, eps: float = 1e-6,
                    scale_edges: Sequence[float] = DEFAULT_SCALE_EDGES, balance: float = 1.0,
                    **_: object) -> torch.Tensor:
    """Scale Relative Policy Optimization (after Ground-R1's SRPO; that abstract gives only the idea, this is our
    concrete version).

    Inputs: rewards ``R`` (G, N); ``scales`` s_g (G,): GT box area / image area of group g's sample.

    1. Scale-aware binning: group g goes to bin ``b(g) = #{e in scale_edges : s_g >= e}`` (default edges 0.05 and
       0.2: small < 5% of the image, medium [5%, 20%), large >= 20%).
    2. Intra-group comparison (as in GRPO): ``d_gi = R_gi - mean_i R_gi``.
    3. Intra-bin normalisation: ``sigma_b`` = population std of all ``d_gi`` pooled over the groups of bin b
       (``sqrt(mean over g in b, i of d_gi^2)``, as each group's d has mean 0). Each bin is scaled to unit spread
       by its OWN reward spread, so the small IoU differences typical of small boxes weigh as much as the large
       ones of big boxes, and a near-tie group is not blown up by its own tiny std (unlike GRPO).
    4. Inter-bin balance: ``w_b = (K / (n_b * B))^balance`` where n_b = groups in bin b, K = groups in the batch,
       B = non-empty bins: with ``balance=1`` every non-empty bin carries the same total weight however many groups
       it holds; ``balance=0`` turns the re-weighting off.

    ``A_gi = w_b(g) * d_gi / (sigma_b(g) + eps)``; a bin whose d are all 0 gives 0.
    """
    if scales is None:
        raise ValueError("srpo advantages need `scales`: the GT box area fraction of each group, shape (G,)")
    scales = torch.as_tensor(scales, dtype=rewards.dtype, device=rewards.device).reshape(-1)
    if scales.shape[0] != rewards.shape[0]:
        raise ValueError(f"srpo: {scales.shape[0]} scales for {rewards.shape[0]} groups")
    edges = torch.as_tensor(sorted(scale_edges), dtype=rewards.dtype, device=rewards.device)
    bins = (scales[:, None] >= edges[None, :]).sum(dim=1)  # (G,)
    d = _zero_equal(rewards, rewards - rewards.mean(dim=1, keepdim=True))  # (G, N)
    adv = torch.zeros_like(rewards)
    present = torch.unique(bins)
    n_groups, n_bins = rewards.shape[0], len(present)
    for b in present:
        sel = bins == b
        db = d[sel]  # (n_b, N)
        sigma = db.pow(2).mean().sqrt()
        if sigma == 0:
            continue
        w = (n_groups / (int(sel.sum()) * n_bins)) ** balance
        adv[sel] = w * db / (sigma + eps)
    return adv


def scale_bins(scales: torch.Tensor, scale_edges: Sequence[float] = DEFAULT_SCALE_EDGES) -> torch.Tensor:
    """The SRPO bin index of each group (0 = smallest); exposed for logging."""
    scales = torch.as_tensor(scales, dtype=torch.float64).reshape(-1)
    edges = torch.as_tensor(sorted(scale_edges), dtype=torch.float64)
    return (scales[:, None] >= edges[None, :]).sum(dim=1)
