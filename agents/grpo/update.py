"""One GRPO policy update on a batch of scored trajectories (the "update" of the loop in `agents.grpo`).

The learner sees only the :class:`~agents.policies.base.TrainablePolicy` interface: ``token_logprobs`` (generated
tokens only: injected prompt/image/instruction tokens are never scored), ``trainable_parameters``. The batch is split
into ``grad_accum`` micro-batches; each micro-batch loss uses the WHOLE batch's token/trajectory counts as
denominators, so the accumulated gradient equals the full-batch gradient of IVT Eq. 2 (see ``agents.grpo.losses``).
Under torchrun the gradients are averaged over ranks before clipping (``agents.common.distributed.all_reduce_grads``);
the token/trajectory denominators are the counts over ALL ranks divided by the world size (TRL's dapo normaliser),
so K ranks with unequal lengths give exactly the one-process full-batch gradient.

Non-finite values never reach the parameters: a non-finite advantage (on any rank), loss or gradient skips the
update (no optimizer step, :attr:`UpdateStats.skipped` says why); the caller stops the run after several skips in a
row (``GRPOConfig.max_skipped_updates``) and :func:`check_finite_state` guards every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from agents.common import distributed
from agents.policies.base import BCLossOptions
from agents.grpo.losses import grpo_loss
from agents.grpo.step_credit import token_advantages


@dataclass
class UpdateStats:
    loss: float
    pg: float
    kl: float
    entropy: float
    grad_norm: float
    clip_frac: float
    num_tokens: int
    guide_loss: float = 0.0  # teacher-guidance cross-entropy per target token (0 without guidance)
    skipped: str = ""  # why the update was skipped (non-finite advantage / loss / gradient); "" when applied

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "pg_loss": self.pg, "kl": self.kl, "entropy": self.entropy,
                "grad_norm": self.grad_norm, "clip_frac": self.clip_frac, "tokens": float(self.num_tokens),
                "skipped_update": float(bool(self.skipped)), "guide_loss": self.guide_loss}


class NonFiniteUpdateError(RuntimeError):
    """Training cannot go on: updates keep being non-finite, or a state to checkpoint holds NaN/inf."""


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (the skip decision must be collective)."""
    return distributed.all_reduce_sum(float(bool(flag))) > 0


def global_denominators(num_tokens: int, num_seqs: int) -> tuple[float, float]:
    """Token and trajectory counts over all ranks / world size: each rank's loss is its share of the full-batch loss
    times K, so the K-rank gradient average equals the one-process full-batch gradient (TRL dapo:
    ``num_items_in_batch / num_processes``). One process: the local counts."""
    world = distributed.current().world_size
    if world <= 1:
        return float(num_tokens), float(num_seqs)
    return distributed.all_reduce_sum(num_tokens) / world, distributed.all_reduce_sum(num_seqs) / world


def check_finite_state(params: Sequence[torch.Tensor], optimizer: Optional[torch.optim.Optimizer] = None,
                       what: str = "checkpoint") -> None:
    """Raise :class:`NonFiniteUpdateError` if a parameter or an optimizer state tensor holds NaN/inf."""
    for i, p in enumerate(params):
        if not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteUpdateError(f"refusing to write the {what}: trainable parameter {i} holds NaN/inf")
    if optimizer is not None:
        for i, st in enumerate(optimizer.state.values()):
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise NonFiniteUpdateError(f"refusing to write the {what}: optimizer state {k!r} of parameter "
                                               f"{i} holds NaN/inf")


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
    entropy_aggregation: str = "token_mean",
    guide: Sequence[Any] = (),
    guide_coef: float = 0.0,
    guide_options: Optional[BCLossOptions] = None,
) -> UpdateStats:
    """``updates`` optimizer steps on ``trajectories`` with per-trajectory ``advantages`` (B,), or per-step
    advantages (B, S) (entry (i, t) credited to the generated tokens of step t, ``agents.grpo.step_credit``); returns
    the stats of the first (the only one by default; later passes re-use the batch through the clipped ratio), or of
    the first skipped one (``skipped`` set: no optimizer step was taken from then on).

    ``guide`` (teacher guidance, :mod:`agents.grpo.guidance`): sequences whose LAST step is a teacher target; their
    cross-entropy times ``guide_coef`` joins the loss, in ``grad_accum`` chunks weighted by their share of the
    sequences (exactly the full-batch token mean with one chunk)."""
    B = len(trajectories)
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    adv = adv.reshape(-1) if adv.ndim <= 1 else adv  # (B,) per trajectory or (B, S) per step
    if adv.shape[0] != B:
        raise ValueError(f"policy_update: {adv.shape[0]} advantages for {B} trajectories")
    params = list(policy.trainable_parameters())
    chunks = micro_batches(B, grad_accum)
    num_tokens = sum(generated_token_count(t) for t in trajectories)
    tok_denom, seq_denom = global_denominators(num_tokens, B)
    loss_kw = dict(beta=beta, entropy_coef=entropy_coef, kl_estimator=kl_estimator, clip_eps=clip_eps,
                   aggregation=aggregation, num_tokens=tok_denom, num_seqs=seq_denom, norm_len=norm_len,
                   entropy_aggregation=entropy_aggregation)
    if _any_rank(not bool(torch.isfinite(adv).all())):  # e.g. a huge finite reward overflowing in float32
        optimizer.zero_grad(set_to_none=True)
        return UpdateStats(loss=0.0, pg=0.0, kl=0.0, entropy=0.0, grad_norm=float("nan"), clip_frac=0.0,
                           num_tokens=num_tokens, skipped="non-finite advantage")
    ref_cache: dict[int, torch.Tensor] = {}
    old_cache: dict[int, torch.Tensor] = {}
    first: Optional[UpdateStats] = None

    for u in range(updates):
        optimizer.zero_grad(set_to_none=True)
        tot = dict(loss=0.0, pg=0.0, kl=0.0, entropy=0.0, clipped=0.0)
        bad_loss = False
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
            if not bool(torch.isfinite(out.loss.detach())):
                bad_loss = True  # no backward: the loss would only turn the gradients NaN
                continue
            out.loss.backward()
            tot["loss"] += float(out.loss.detach())
            tot["pg"] += out.pg
            tot["kl"] += out.kl
            tot["entropy"] += out.entropy
            tot["clipped"] += out.clip_frac * out.num_tokens
        guide_loss = 0.0
        if guide and guide_coef > 0 and not bad_loss:
            opts = dataclasses.replace(guide_options or BCLossOptions(), last_step_only=True)
            for gidx in micro_batches(len(guide), grad_accum):
                g_loss, _ = policy.bc_loss([guide[i] for i in gidx], opts)
                g_loss = g_loss * guide_coef * len(gidx) / len(guide)
                if not bool(torch.isfinite(g_loss.detach())):
                    bad_loss = True
                    break
                g_loss.backward()
                guide_loss += float(g_loss.detach()) / guide_coef
        skipped = "non-finite loss" if _any_rank(bad_loss) else ""
        grad_norm = float("nan")
        if not skipped:
            distributed.all_reduce_grads(params)  # identical averaged gradients on every rank: same decision below
            if max_grad_norm and max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
            skipped = "" if math.isfinite(grad_norm) else "non-finite gradient"
        if not skipped:
            optimizer.step()
        stats = UpdateStats(loss=tot["loss"], pg=tot["pg"], kl=tot["kl"], entropy=tot["entropy"],
                            grad_norm=grad_norm, clip_frac=tot["clipped"] / max(num_tokens, 1),
                            num_tokens=num_tokens, skipped=skipped, guide_loss=guide_loss)
        if first is None or skipped:  # a skipped later pass is reported: the caller counts skips
            first = stats
        if skipped:
            break
    optimizer.zero_grad(set_to_none=True)
    assert first is not None
    return first
