"""One GRPO policy update on a batch of scored trajectories (the "update" of the loop in `agents.grpo`).

The learner sees only the :class:`~agents.policies.base.TrainablePolicy` interface: ``token_logprobs`` (generated
tokens only: injected prompt/image/instruction tokens are never scored), ``trainable_parameters``. The batch is split
into ``grad_accum`` micro-batches; each micro-batch loss uses the WHOLE batch's token/trajectory counts as
denominators, so the accumulated gradient equals the full-batch gradient of IVT Eq. 2 (see ``agents.losses``).
Under torchrun the gradients are averaged over ranks before clipping (``agents.distributed.all_reduce_grads``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from agents import distributed
from agents.losses import grpo_loss
from agents.step_credit import token_advantages


@dataclass
class UpdateStats:
    loss: float
    pg: float
    kl: float
    entropy: float
    grad_norm: float
    clip_frac: float
    num_tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "pg_loss": self.pg, "kl": self.kl, "entropy": self.entropy,
                "grad_norm": self.grad_norm, "clip_frac": self.clip_frac, "tokens": float(self.num_tokens)}


def generated_token_count(traj: Any) -> int:
    """Generated tokens of one trajectory (all steps)."""
    if not traj.has_tokens:
        raise ValueError(f"trajectory of sample {traj.sample_id!r} has no token ids: GRPO needs a model policy "
                         "that records token_ids/logprobs (token-in / token-out)")
    return sum(len(s.token_ids) for s in traj.steps)


def rollout_logprobs(trajs: Sequence[Any], like: torch.Tensor) -> torch.Tensor:
    """The sampling log-probs stored in the rollout (Step.logprobs), laid out like ``TokenLogprobs.logprobs``."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for i, t in enumerate(trajs):
        lp = [x for s in t.steps for x in (s.logprobs or [])]
        if len(lp) != generated_token_count(t):
            raise ValueError(f"trajectory of sample {t.sample_id!r}: {len(lp)} stored log-probs for "
                             f"{generated_token_count(t)} generated tokens")
        out[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out.to(like.dtype)


def micro_batches(n: int, k: int) -> list[np.ndarray]:
    """Split indices 0..n-1 into at most ``k`` contiguous, non-empty chunks of near-equal size."""
    return [c for c in np.array_split(np.arange(n), min(k, max(n, 1))) if len(c)]


def policy_update(
    policy: Any,
    optimizer: torch.optim.Optimizer,
    trajectories: Sequence[Any],
    advantages: torch.Tensor,
    *,
    grad_accum: int = 1,
    updates: int = 1,
    beta: float = 0.04,
    entropy_coef: float = 0.01,
    kl_estimator: str = "abs",
    clip_eps: Optional[float] = None,
    old_logprobs: str = "rollout",
    aggregation: str = "token_mean",
    norm_len: Optional[float] = None,
    max_grad_norm: float = 1.0,
) -> UpdateStats:
    """``updates`` optimizer steps on ``trajectories`` with per-trajectory ``advantages`` (B,), or per-step
    advantages (B, S) (entry (i, t) credited to the generated tokens of step t, ``agents.step_credit``); returns the
    stats of the first (the only one by default; later passes re-use the batch through the clipped ratio)."""
    B = len(trajectories)
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    adv = adv.reshape(-1) if adv.ndim <= 1 else adv  # (B,) per trajectory or (B, S) per step
    if adv.shape[0] != B:
        raise ValueError(f"policy_update: {adv.shape[0]} advantages for {B} trajectories")
    params = list(policy.trainable_parameters())
    chunks = micro_batches(B, grad_accum)
    num_tokens = sum(generated_token_count(t) for t in trajectories)
    loss_kw = dict(beta=beta, entropy_coef=entropy_coef, kl_estimator=kl_estimator, clip_eps=clip_eps,
                   aggregation=aggregation, num_tokens=num_tokens, num_seqs=B, norm_len=norm_len)
    ref_cache: dict[int, torch.Tensor] = {}
    old_cache: dict[int, torch.Tensor] = {}
    first: Optional[UpdateStats] = None

    for u in range(updates):
        optimizer.zero_grad(set_to_none=True)
        tot = dict(loss=0.0, pg=0.0, kl=0.0, entropy=0.0, clipped=0.0)
        for c, idx in enumerate(chunks):
            mb = [trajectories[i] for i in idx]
            if beta and c not in ref_cache:  # reference = SFT policy, no grad, once per batch
                ref_cache[c] = policy.token_logprobs(mb, reference=True, grad=False).logprobs.detach()
            if clip_eps is not None and c not in old_cache:
                if old_logprobs == "recompute":  # behaviour policy = the policy before this batch's first step
                    old_cache[c] = policy.token_logprobs(mb, grad=False).logprobs.detach()
            tl = policy.token_logprobs(mb, grad=True)
            old = None
            if clip_eps is not None:
                old = old_cache[c] if old_logprobs == "recompute" else rollout_logprobs(mb, tl.logprobs)
            if adv.ndim == 2:  # per step -> per token (B_mb, L), laid out like tl.logprobs
                a = token_advantages(mb, adv[idx], tl.logprobs.detach())
            else:
                a = adv[idx].to(device=tl.logprobs.device, dtype=tl.logprobs.dtype)
            ref = ref_cache.get(c)
            out = grpo_loss(tl.logprobs, tl.mask, a, ref_logprobs=ref, entropy=tl.entropy, old_logprobs=old,
                            **loss_kw)
            out.loss.backward()
            tot["loss"] += float(out.loss.detach())
            tot["pg"] += out.pg
            tot["kl"] += out.kl
            tot["entropy"] += out.entropy
            tot["clipped"] += out.clip_frac * out.num_tokens
        distributed.all_reduce_grads(params)
        if max_grad_norm and max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        optimizer.step()
        if first is None:
            first = UpdateStats(loss=tot["loss"], pg=tot["pg"], kl=tot["kl"], entropy=tot["entropy"],
                                grad_norm=grad_norm, clip_frac=tot["clipped"] / max(num_tokens, 1),
                                num_tokens=num_tokens)
    optimizer.zero_grad(set_to_none=True)
    assert first is not None
    return first
