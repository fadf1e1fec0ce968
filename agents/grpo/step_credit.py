"""Credit for the refinement steps: per-step advantages laid out per generated token, and branching groups.

IVT Eq. 1 gives ONE advantage per trajectory, from its return. With T = 2 and step 0 sampled at T = 1.0, most of a
group's reward spread comes from its different step-0 boxes, so the refinement tokens get little signal of their
own. Two remedies, each optional (``GRPOConfig.step_advantage``, ``GRPOConfig.branch_size``):

- per-step advantages (``agents.grpo.advantages`` per-step registry, e.g. SIFThinker's progressive reward): a (G, N, S)
  tensor whose entry (g, i, t) is credited to the generated tokens of step t of trajectory i (:func:`token_advantages`);
- branching groups: each group holds K = N / M step-0 answers, each shared by M adjacent members ("siblings"):
  the policy samples the step-0 answer once per sibling block and the rollout engine forks its KV cache
  (``RolloutEngine.start(share=...)``), so every refinement is compared with siblings that saw the same overlay.

Without either, :func:`update_advantages` returns the trajectory advantages unchanged (the IVT path, exact).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from agents.grpo.advantages import compute_step_advantages


def step_scores(groups: Sequence[Sequence[Any]], score: str = "iou") -> torch.Tensor:
    """(G, N, S) float64 per-step scores: ``iou`` = the step's IoU with the GT box (0 for an invalid box), or
    ``reward`` = the env's step reward. S = the longest episode's step count (IVT episodes always have T + 1).

    Adaptive refinement (episodes that stopped early have fewer steps): a shorter trajectory is padded with its
    LAST score, i.e. a stopped episode keeps its final box for the steps it did not take (IoU: the same IoU;
    reward: the same reward). The padded entries have no tokens, so :func:`token_advantages` credits nothing to
    them; they only enter the per-step group statistics as "this member's box stayed". Equal lengths: unchanged."""
    if score not in ("iou", "reward"):
        raise ValueError(f"step score must be iou|reward, got {score!r}")
    rows = [[[float(getattr(s, score)) for s in t.steps] for t in g] for g in groups]
    lengths = {len(r) for g in rows for r in g}
    if 0 in lengths:
        raise ValueError("per-step advantages: a trajectory has no steps")
    S = max(lengths) if lengths else 0
    return torch.tensor([[r + [r[-1]] * (S - len(r)) for r in g] for g in rows], dtype=torch.float64)


def token_advantages(trajs: Sequence[Any], step_adv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-step advantages ``step_adv`` (B, S) spread over the generated tokens of each step, laid out like
    ``TokenLogprobs.logprobs`` ``like`` (B, L): steps concatenated in order, right-padded with 0."""
    out = torch.zeros(like.shape, dtype=like.dtype)
    if step_adv.shape[0] != len(trajs):
        raise ValueError(f"token_advantages: {step_adv.shape[0]} rows of step advantages for {len(trajs)} trajectories")
    for b, t in enumerate(trajs):
        vals = [float(step_adv[b, k]) for k, s in enumerate(t.steps) for _ in range(len(s.token_ids or ()))]
        if len(vals) > out.shape[1]:
            raise ValueError(f"trajectory {t.sample_id!r}: {len(vals)} generated tokens but {out.shape[1]} columns")
        out[b, : len(vals)] = torch.tensor(vals, dtype=like.dtype)
    return out.to(like.device)


def check_branches(groups: Sequence[Sequence[Any]], branch: int) -> None:
    """Siblings (members i // branch equal) must share their step-0 tokens: the policy honoured
    ``SamplingParams.branch`` (a policy that ignores it would make the branch estimators compare unlike things)."""
    if branch <= 1:
        return
    for g in groups:
        for k in range(0, len(g), branch):
            first = [tuple(t.steps[0].token_ids or ()) for t in g[k : k + branch]]
            if len(set(first)) != 1:
                raise ValueError(f"branching groups: members {k}..{k + branch - 1} of sample {g[0].sample_id!r} do "
                                 "not share their step-0 answer; the policy does not support SamplingParams.branch")


def update_advantages(cfg: Any, groups: Sequence[Sequence[Any]], rewards: torch.Tensor,
                      traj_adv: torch.Tensor) -> torch.Tensor:
    """What ``policy_update`` receives: the trajectory advantages (B,) when ``cfg.step_advantage`` is empty (IVT),
    else per-step advantages (B, S) from the named per-step estimator."""
    check_branches(groups, cfg.branch_size)
    if not cfg.step_advantage:
        return traj_adv.reshape(-1)
    scores = step_scores(groups, cfg.step_score)
    adv = compute_step_advantages(cfg.step_advantage, scores, returns=rewards, branch=cfg.branch_size,
                                  eps=cfg.adv_eps, population_std=cfg.population_std)  # (G, N, S)
    adv[:, :, 0] *= cfg.step0_weight  # 0: step 0 is context for the refinement credit, not trained by it
    return adv.reshape(-1, adv.shape[-1])
