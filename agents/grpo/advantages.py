"""Group-relative advantage estimators, pluggable by name or import path.

Every estimator maps trajectory returns ``rewards`` of shape (G, N) (G groups = prompts, N trajectories per prompt)
to advantages of the same shape. Extra data is passed by keyword; estimators that do not need it ignore it:
``scales`` (G, N) is the area of the region each ROLLOUT grounds (its final box) as a fraction of the image area,
NaN for a rollout without a valid box (``srpo`` bins rollouts by it).

A group whose rewards are all equal carries no learning signal: its advantages are exactly 0 (never NaN), and
:func:`zero_std_fraction` reports the share of such groups (``rollout/frac_zero_std_groups``).

Non-finite rewards (NaN, +-inf) follow TRL's rule (``GRPOTrainer._generate_and_score_completions``: ``nanmean`` /
``nanstd`` over the group, then ``nan_to_num(advantages, nan=0)``): such a trajectory gets advantage 0 and the rest
of its group is normalised WITHOUT it (the estimator runs on the group's finite rewards only);
:func:`nonfinite_fraction` counts them (``rollout/frac_nonfinite_reward``).

eps: 1e-4 by default, TRL's constant (``advantages / (std_rewards + 1e-4)``). With 1e-6 a near-tie group (rewards
that differ by ~1e-5, i.e. noise) was scaled up to nearly +-1 like a real difference; with 1e-4 it stays ~0.1.

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
    """Validate ``rewards`` (G, N), run the estimator, and zero every all-equal group.

    Non-finite rewards get advantage 0 and their group is normalised without them (TRL's rule, module docstring):
    the estimator sees the all-finite groups as one (G', N) batch and each other group alone, as (1, n_finite).
    """
    rewards = _check(rewards)
    fn = get_advantage(name_or_path)
    finite = torch.isfinite(rewards)  # (G, N)
    if bool(finite.all()):
        return _zero_equal(rewards, _run(name_or_path, fn, rewards, kwargs))
    adv = torch.zeros_like(rewards)
    whole = finite.all(dim=1)  # (G,) groups without a non-finite reward
    if bool(whole.any()):
        sub = rewards[whole]
        adv[whole] = _zero_equal(sub, _run(name_or_path, fn, sub, _slice_kwargs(kwargs, whole, None, rewards)))
    for g in torch.nonzero(~whole).flatten().tolist():
        cols = finite[g]  # (N,)
        if int(cols.sum()) < 2:  # fewer than 2 finite rewards: nothing to compare
            continue
        sub = rewards[g, cols][None]  # (1, n_finite)
        a = _run(name_or_path, fn, sub, _slice_kwargs(kwargs, g, cols, rewards))
        adv[g, cols] = _zero_equal(sub, a)[0]
    return adv


def nonfinite_fraction(rewards: torch.Tensor) -> float:
    """Share of trajectories whose reward is NaN or +-inf (``rollout/frac_nonfinite_reward``)."""
    rewards = _check(rewards)
    return float((~torch.isfinite(rewards)).float().mean()) if rewards.numel() else 0.0


def zero_std_fraction(rewards: torch.Tensor) -> float:
    """Share of groups whose N rewards are all equal (no learning signal); non-finite rewards are left out."""
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
    return rewards.to(torch.float64) if not rewards.is_floating_point() else rewards


def _run(name: str, fn: AdvantageFn, rewards: torch.Tensor, kwargs: dict) -> torch.Tensor:
    adv = fn(rewards, **kwargs)
    if adv.shape != rewards.shape:
        raise ValueError(f"advantage estimator {name!r} returned shape {tuple(adv.shape)}, "
                         f"expected {tuple(rewards.shape)}")
    return adv


def _slice_kwargs(kwargs: dict, rows, cols, rewards: torch.Tensor) -> dict:
    """Per-group tensors in ``kwargs`` (leading dim G, e.g. ``scales`` (G, N)) cut to the rewards the estimator
    sees: ``rows`` (a (G,) mask or one group index) and, for (G, N) tensors, ``cols`` (an (N,) mask)."""
    out = {}
    G, N = rewards.shape
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == G:
            v = v[rows] if not isinstance(rows, int) else v[rows:rows + 1]
            if cols is not None and v.ndim >= 2 and v.shape[1] == N:
                v = v[:, cols]
        out[k] = v
    return out


def _equal_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(G,) bool: all finite rewards of the group are equal (exact comparison; a constant group has no signal;
    fewer than 2 finite rewards count as equal)."""
    finite = torch.isfinite(rewards)
    hi = torch.where(finite, rewards, torch.full_like(rewards, -torch.inf)).amax(dim=1)
    lo = torch.where(finite, rewards, torch.full_like(rewards, torch.inf)).amin(dim=1)
    return (hi == lo) | (finite.sum(dim=1) < 2)


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
def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-4, population_std: bool = False,
                    **_: object) -> torch.Tensor:
    """IVT Eq. 1: ``A_gi = (R_gi - mean_g) / (std_g + eps)``.

    ``std_g`` is the SAMPLE standard deviation of the group (Bessel-corrected, divisor N-1) by default, as in the
    GRPO reference implementations (``torch.std``: DeepSeekMath/TRL/verl); ``population_std=True`` divides by N.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = _std(rewards, 1, population_std).unsqueeze(1)
    return _zero_equal(rewards, (rewards - mean) / (std + eps))


@register_advantage("dr_grpo")
@register_advantage("centered")
def dr_grpo_advantages(rewards: torch.Tensor, **_: object) -> torch.Tensor:
    """``A_gi = R_gi - mean_g``, no division by the group std (which up-weights near-tie groups, i.e. too easy or
    too hard prompts).

    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", Sec. 3.1) is this advantage TOGETHER with a
    constant loss normaliser instead of the per-sequence length ``1/|o_i|`` (TRL's ``loss_type="dr_grpo"``: sum over
    tokens / (B * max_completion_length)), i.e. ``aggregation="seq_sum_norm"`` here: the GRPO config refuses
    ``advantage: dr_grpo`` with another aggregation. ``centered`` is the same advantage without that constraint (for
    ablations, e.g. TRL's ``scale_rewards="none"`` with ``loss_type="dapo"``).
    """
    return _zero_equal(rewards, rewards - rewards.mean(dim=1, keepdim=True))


DEFAULT_SRPO_BINS = 3  # Ground-R1: K = 3


@register_advantage("srpo")
def srpo_advantages(rewards: torch.Tensor, *, scales: Optional[torch.Tensor] = None, eps: float = 1e-4,
                    num_bins: int = DEFAULT_SRPO_BINS, population_std: bool = False, **_: object) -> torch.Tensor:
    """Scale Relative Policy Optimization, Ground-R1 (Cao et al., arXiv:2505.20272v3, 2026, Sec. "SRPO").

    Inputs: rewards ``R`` (G, N); ``scales`` a (G, N): the area of the region rollout (g, i) grounds (its own final
    box) / image area, NaN when it has no valid box. Per group g (our reading: Ground-R1 replaces GRPO's normalisation
    over the rollouts of one question, so bins and their statistics are those of the group's rollouts):

    1. Evidence region discretisation: ``s(i) = min(floor(K a_i) + 1, K)`` in 1..K (K equal-width area bins;
       Ground-R1 uses K = 3). A rollout without a valid box goes to bin 0 of its own (our choice: it grounds no
       region, so no size bin applies).
    2. Intra-bin: ``mu_k``, ``sigma_k`` = mean and std of the rewards of the group's rollouts in bin k; the
       intra-bin advantage ``(R_gi - mu_s(i)) / (sigma_s(i) + eps)`` (0 in a bin of one rollout or equal rewards).
    3. Inter-bin reward: ``r_inter_i = 1`` if ``s(i)`` is the bin with the highest mean reward ``argmax_k mu_k``,
       else 0 (our choice for ties: every bin attaining the maximum gets 1, so all-tied bins give no signal),
       normalised over the group: ``(r_inter_i - mean) / (std + eps)``.
    4. ``A_gi = intra + inter`` (Ground-R1's scale-aware advantage).

    std is the sample std like ``grpo`` (``population_std=True``: divisor n), eps as ``grpo``. Source: the formulas of
    Ground-R1 v3 ("Thinking with Images via Scale Relative Policy Optimization", 2026-02) as restated in a
    third-party digest of the paper; the seed gives only the abstract and the released code (github.com/zzzhhzzz/
    Ground-R1) is the earlier version without SRPO. The per-group scope, the tie rule, the invalid-box bin and the
    std convention are our reading.
    """
    if scales is None:
        raise ValueError("srpo advantages need `scales`: the grounded box area fraction of each rollout, shape (G, N)")
    scales = torch.as_tensor(scales, dtype=rewards.dtype, device=rewards.device)
    if scales.shape != rewards.shape:
        raise ValueError(f"srpo: scales of shape {tuple(scales.shape)} for rewards {tuple(rewards.shape)}; "
                         "give one area fraction per rollout (G, N)")
    bins = srpo_bins(scales, num_bins)  # (G, N)
    adv = torch.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        r, b = rewards[g], bins[g]  # (N,)
        intra = torch.zeros_like(r)
        present = torch.unique(b).tolist()
        mu = {}
        for k in present:
            sel = b == k
            mu[k] = r[sel].mean()
            if int(sel.sum()) >= 2 and bool(r[sel].amax() > r[sel].amin()):
                intra[sel] = (r[sel] - mu[k]) / (_std(r[sel], 0, population_std) + eps)
        best = max(mu.values())
        inter_r = torch.stack([(mu[k] == best).to(r.dtype) for k in b.tolist()])  # (N,) 1 in the best bin(s)
        inter = torch.zeros_like(r)
        if bool(inter_r.amax() > inter_r.amin()):
            inter = (inter_r - inter_r.mean()) / (_std(inter_r, 0, population_std) + eps)
        adv[g] = intra + inter
    return adv


def srpo_bins(scales: torch.Tensor, num_bins: int = DEFAULT_SRPO_BINS) -> torch.Tensor:
    """Ground-R1's scale bin of each rollout: ``min(floor(K a) + 1, K)`` in 1..K; 0 for NaN (no valid box)."""
    if num_bins < 1:
        raise ValueError(f"srpo: num_bins must be >= 1, got {num_bins}")
    a = torch.as_tensor(scales, dtype=torch.float64)
    b = torch.clamp(torch.floor(num_bins * a.clamp(min=0.0)) + 1, max=num_bins)
    return torch.where(torch.isnan(a), torch.zeros_like(b), b).long()




# ------------------------------------------------------------------------------------------ per-step estimators
# A per-step estimator maps per-step scores ``scores`` (G, N, S) (S = T + 1 steps; the step's IoU by default)
# and the trajectory returns ``returns`` (G, N) to per-step advantages (G, N, S): entry (g, i, t) is credited to
# the generated tokens of step t of trajectory i of group g (agents.grpo.step_credit lays them out per token).
# ``branch`` = M > 1: the group holds K = N / M step-0 answers, each shared by M adjacent members ("siblings",
# i // M equal: same step-0 tokens, so their refinements saw the same overlay); refinement steps are compared with
# their siblings only. Register with ``@register_step_advantage("name")``; signature
# ``fn(scores, *, returns, branch=1, eps=1e-4, population_std=False, **kwargs) -> Tensor (G, N, S)``.
STEP_ADVANTAGES: Registry[AdvantageFn] = Registry("per-step advantage estimator")
register_step_advantage = STEP_ADVANTAGES.register


def available_step_advantages() -> list[str]:
    return STEP_ADVANTAGES.names()


def compute_step_advantages(name: str, scores: torch.Tensor, *, returns: torch.Tensor, branch: int = 1,
                            **kwargs) -> torch.Tensor:
    """Validate ``scores`` (G, N, S) and ``returns`` (G, N), run the registered per-step estimator ``name``."""
    fn = STEP_ADVANTAGES.get(name)  # the error lists the known names
    scores = torch.as_tensor(scores, dtype=torch.float64)
    returns = _check(returns).to(torch.float64)
    if scores.ndim != 3 or scores.shape[:2] != returns.shape:
        raise ValueError(f"step scores must have shape (G, N, S) matching returns {tuple(returns.shape)}, got "
                         f"{tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"step scores contain NaN/inf: {scores.tolist()}")
    if branch < 1 or scores.shape[1] % branch:
        raise ValueError(f"branch {branch} does not divide the group size {scores.shape[1]}")
    bad = ~torch.isfinite(returns)  # (G, N): the non-finite rule of compute_advantages, per step
    if bad.any():  # the bad member takes its group's finite mean (so it does not move the others) and gets 0
        mean = torch.nanmean(torch.where(bad, torch.nan, returns), dim=1, keepdim=True).nan_to_num(0.0)
        returns = torch.where(bad, mean.expand_as(returns), returns)
    adv = fn(scores, returns=returns, branch=branch, **kwargs)
    adv = adv.masked_fill(bad[:, :, None], 0.0)
    if adv.shape != scores.shape:
        raise ValueError(f"per-step estimator {name!r} returned shape {tuple(adv.shape)}, expected "
                         f"{tuple(scores.shape)}")
    return adv


def group_normalize(x: torch.Tensor, *, eps: float = 1e-4, population_std: bool = False) -> torch.Tensor:
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
def progressive_step_advantages(scores: torch.Tensor, *, returns: torch.Tensor, branch: int = 1, eps: float = 1e-4,
                                population_std: bool = False, **_: object) -> torch.Tensor:
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
def delta_step_advantages(scores: torch.Tensor, *, returns: torch.Tensor, branch: int = 1, eps: float = 1e-4,
                          population_std: bool = False, **_: object) -> torch.Tensor:
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
def branch_step_advantages(scores: torch.Tensor, *, returns: torch.Tensor, branch: int = 1, eps: float = 1e-4,
                           population_std: bool = False, **_: object) -> torch.Tensor:
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
