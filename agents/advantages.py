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

import importlib
from typing import Callable, Optional, Sequence

import torch

AdvantageFn = Callable[..., torch.Tensor]
_REGISTRY: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def available_advantages() -> list[str]:
    return sorted(_REGISTRY)


def get_advantage(name_or_path: str) -> AdvantageFn:
    """A registered estimator by name, else a callable by import path ``module:attr`` / ``module.attr``."""
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    if ":" in name_or_path:
        mod, _, attr = name_or_path.partition(":")
    elif "." in name_or_path:
        mod, _, attr = name_or_path.rpartition(".")
    else:
        raise ValueError(f"unknown advantage estimator {name_or_path!r}; known: {available_advantages()} "
                         "(or give an import path such as 'my_pkg.adv:my_fn')")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"advantage estimator {name_or_path!r}: cannot import {attr!r} from {mod!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"advantage estimator {name_or_path!r} is not callable")
    return fn


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


# ------------------------------------------------------------------------------------------ per-step estimators
# A per-step estimator maps per-step scores ``scores`` (G, N, S) (S = T + 1 steps; the step's IoU by default)
# and the trajectory returns ``returns`` (G, N) to per-step advantages (G, N, S): entry (g, i, t) is credited to
# the generated tokens of step t of trajectory i of group g (agents.step_credit lays them out per token).
# ``branch`` = M > 1: the group holds K = N / M step-0 answers, each shared by M adjacent members ("siblings",
# i // M equal: same step-0 tokens, so their refinements saw the same overlay); refinement steps are compared with
# their siblings only. Register with ``@register_step_advantage("name")``; signature
# ``fn(scores, *, returns, branch=1, eps=1e-6, population_std=False, **kwargs) -> Tensor (G, N, S)``.
_STEP_REGISTRY: dict[str, AdvantageFn] = {}


def register_step_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        _STEP_REGISTRY[name] = fn
        return fn

    return deco


def available_step_advantages() -> list[str]:
    return sorted(_STEP_REGISTRY)


def compute_step_advantages(name: str, scores: torch.Tensor, *, returns: torch.Tensor, branch: int = 1,
                            **kwargs) -> torch.Tensor:  # fmt: skip
    """Validate ``scores`` (G, N, S) and ``returns`` (G, N), run the registered per-step estimator ``name``."""
    if name not in _STEP_REGISTRY:
        raise ValueError(f"unknown per-step advantage estimator {name!r}; known: {available_step_advantages()}")
    scores = torch.as_tensor(scores, dtype=torch.float64)
    returns = _check(returns).to(torch.float64)
    if scores.ndim != 3 or scores.shape[:2] != returns.shape:
        raise ValueError(f"step scores must have shape (G, N, S) matching returns {tuple(returns.shape)}, got "
                         f"{tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"step scores contain NaN/inf: {scores.tolist()}")
    if branch < 1 or scores.shape[1] % branch:
        raise ValueError(f"branch {branch} does not divide the group size {scores.shape[1]}")
    adv = _STEP_REGISTRY[name](scores, returns=returns, branch=branch, **kwargs)
    if adv.shape != scores.shape:
        raise ValueError(f"per-step estimator {name!r} returned shape {tuple(adv.shape)}, expected "
                         f"{tuple(scores.shape)}")
    return adv


def group_normalize(x: torch.Tensor, *, eps: float = 1e-6, population_std: bool = False) -> torch.Tensor:
    """IVT Eq. 1 along the LAST dim: ``(x - mean) / (std + eps)``, exactly 0 where all entries are equal."""
    flat = x.reshape(-1, x.shape[-1])  # (groups, n)
    return grpo_advantages(flat, eps=eps, population_std=population_std).reshape(x.shape)


def _sibling_normalize(x: torch.Tensor, branch: int, **kw) -> torch.Tensor:
    """``x`` (G, N) normalised within each block of ``branch`` adjacent members (the whole group when 1)."""
    G, N = x.shape
    return group_normalize(x.reshape(G, N // branch, branch), **kw).reshape(G, N) if branch > 1 else \
        group_normalize(x, **kw)


def _sibling_mean(x: torch.Tensor, branch: int) -> torch.Tensor:
    """``x`` (G, N) -> (G, N): the mean over each member's comparison block (siblings, or the whole group)."""
    G, N = x.shape
    if branch > 1:
        return x.reshape(G, N // branch, branch).mean(-1, keepdim=True).expand(-1, -1, branch).reshape(G, N)
    return x.mean(-1, keepdim=True).expand(G, N)


def _answer_returns(returns: torch.Tensor, branch: int) -> torch.Tensor:
    """(G, N): what a step-0 answer earned: its own return, or with ``branch`` > 1 the mean return of the siblings
    that continued it (they share those step-0 tokens)."""
    return _sibling_mean(returns, branch) if branch > 1 else returns


@register_step_advantage("progressive")
def progressive_step_advantages(scores: torch.Tensor, *, returns: torch.Tensor, branch: int = 1, eps: float = 1e-6,
                                population_std: bool = False, **_: object) -> torch.Tensor:  # fmt: skip
    """SIFThinker's progressive reward, credited per step and made group-relative per step.

    ``r_0 = s_0``; for t >= 1 ``r_t = s_t + (s_t - mean_j s_{j,t-1})`` (SIFThinker r_ans,t) with the mean over
    the comparison block (the whole group, or the siblings when ``branch`` > 1); ``A_t`` = IVT Eq. 1 of ``r_t``
    over that block (step 0: over the whole group), credited to the tokens of step t. Within one block the
    progressive term shifts every member alike, so the per-step advantage ranks the members by ``s_t``: refinement
    tokens are judged by the box they wrote, not by the group's spread of step-0 boxes.
    """
    kw = dict(eps=eps, population_std=population_std)
    adv = torch.zeros_like(scores)
    adv[:, :, 0] = group_normalize(scores[:, :, 0], **kw)
    for t in range(1, scores.shape[2]):
        r = 2 * scores[:, :, t] - _sibling_mean(scores[:, :, t - 1], branch)  # (G, N) SIFThinker r_ans,t
        adv[:, :, t] = _sibling_normalize(r, branch, **kw)
    return adv


@register_step_advantage("step_delta")
def delta_step_advantages(scores: torch.Tensor, *, returns: torch.Tensor, branch: int = 1, eps: float = 1e-6,
                          population_std: bool = False, **_: object) -> torch.Tensor:  # fmt: skip
    """Step 0 credited with the trajectory return (IVT Eq. 1 over the group; with ``branch`` > 1 each step-0 answer
    with the mean return of its siblings), refinement step t with its OWN change ``s_t - s_{t-1}`` (Eq. 1 over the
    comparison block): rewriting a good box exactly scores 0, a jittered copy scores below it, a correction above."""
    kw = dict(eps=eps, population_std=population_std)
    adv = torch.zeros_like(scores)
    adv[:, :, 0] = group_normalize(_answer_returns(returns, branch), **kw)
    for t in range(1, scores.shape[2]):
        adv[:, :, t] = _sibling_normalize(scores[:, :, t] - scores[:, :, t - 1], branch, **kw)
    return adv


@register_step_advantage("branch")
def branch_step_advantages(scores: torch.Tensor, *, returns: torch.Tensor, branch: int = 1, eps: float = 1e-6,
                           population_std: bool = False, **_: object) -> torch.Tensor:  # fmt: skip
    """Tree GRPO on branching groups: step-0 tokens get IVT Eq. 1 of the mean return of each step-0 answer's
    siblings (over the K answers of the group), refinement tokens Eq. 1 of the trajectory return among the M
    siblings that share their step 0 (same overlay). Needs ``branch`` > 1."""
    if branch < 2:
        raise ValueError("the 'branch' step advantage needs branching groups (branch_size >= 2)")
    kw = dict(eps=eps, population_std=population_std)
    adv = torch.zeros_like(scores)
    adv[:, :, 0] = group_normalize(_answer_returns(returns, branch), **kw)
    adv[:, :, 1:] = _sibling_normalize(returns, branch, **kw)[:, :, None]
    return adv
