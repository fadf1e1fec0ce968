"""The GRPO policy loss of IVT Eq. 2, over generated tokens only.

    L = -E[log pi(a|s) * A]  +  beta * mean |log pi - log pi_ref|  -  lambda * H(pi)          (IVT Eq. 2)

Per token t of trajectory i (only where ``mask`` is True: injected prompt/image/instruction tokens never count):

- policy-gradient term ``pg_it = -logp_it * A_i`` (REINFORCE, the paper). With ``clip_eps`` set it is PPO's clipped
  surrogate ``pg_it = -min(r_it * A_i, clip(r_it, 1 - eps, 1 + eps) * A_i)`` with ``r_it = exp(logp_it - old_it)``:
  for users who take several updates per batch. On the first update (old = current) its gradient equals REINFORCE's.
- KL term ``kl_it``: ``"abs"`` = ``|logp_it - ref_it|`` (the paper), or ``"k3"`` = ``exp(ref - logp) - (ref - logp)
  - 1`` (Schulman's unbiased, non-negative estimator of KL(pi || pi_ref), as in DeepSeekMath).
- entropy ``H_it`` of the full next-token distribution at that position (from ``TokenLogprobs.entropy``).

Token aggregation ``agg`` of the policy-gradient and KL terms, chosen by ``aggregation`` (each equals a TRL 1.x
``GRPOTrainer._compute_loss`` ``loss_type``, same loss and same gradients, also under gradient accumulation):

- ``"token_mean"`` (default) = TRL ``dapo``: sum over all generated tokens of the batch / number of those tokens.
  Every token weighs the same, so long trajectories are not down-weighted per token (DAPO's choice).
- ``"seq_mean"`` = TRL ``grpo``: mean over each trajectory's tokens, then mean over trajectories (the original GRPO).
- ``"seq_sum_norm"`` = TRL ``dr_grpo``: sum over each trajectory's tokens / ``norm_len`` (a constant, e.g. max new
  tokens x steps), then mean over trajectories (Dr. GRPO: no length bias; pair it with the ``dr_grpo`` advantage).

The entropy bonus is aggregated by ``entropy_aggregation``: ``"token_mean"`` (default: the mean entropy per generated
token whatever ``aggregation`` is, as TRL's entropy bonus for every loss type; under ``seq_sum_norm`` the loss's
aggregation would shrink the bonus by mean length / ``norm_len``) or ``"loss"`` (the same as ``aggregation``).

Several ranks: pass ``num_tokens`` / ``num_seqs`` = the count over ALL ranks / world size (TRL's dapo normaliser:
``num_items_in_batch / num_processes``); the average of the ranks' gradients is then the one-process full-batch
gradient (``agents.grpo.update`` does this).

Gradient accumulation: pass the WHOLE batch's denominators (``num_tokens`` / ``num_seqs``) to every micro-batch;
then the micro-batch losses add up to the full-batch loss exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ivt_env.registries import Registry

AGGREGATIONS: Registry[Callable[..., torch.Tensor]] = Registry("loss aggregation")
KL_ESTIMATORS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("KL estimator")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, carries grad
    pg: float  # aggregated policy-gradient term
    kl: float  # aggregated KL estimate (0 when there is no reference)
    entropy: float  # aggregated entropy (0 when not given)
    clip_frac: float  # share of tokens where the clipped surrogate was active (0 without clipping)
    num_tokens: int  # generated tokens in this (micro-)batch


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", *,
              num_tokens: Optional[float] = None, num_seqs: Optional[float] = None,
              norm_len: Optional[float] = None) -> torch.Tensor:
    """Aggregate per-token ``values`` (B, L) over True positions of ``mask`` (B, L) with the registered
    aggregation ``mode`` (see the module docstring).

    ``num_tokens`` / ``num_seqs`` override the denominators (whole-batch counts under gradient accumulation).
    Masked-out positions may hold anything (even NaN): they are replaced by 0, never multiplied.
    """
    if values.shape != mask.shape:
        raise ValueError(f"aggregate: values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    mask = mask.bool()
    v = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return AGGREGATIONS.get(mode)(v, mask, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)


def _num_seqs(mask: torch.Tensor, num_seqs: Optional[float]) -> float:
    return float((mask.sum(dim=1) > 0).sum()) if num_seqs is None else float(num_seqs)


@AGGREGATIONS.register("token_mean")
def token_mean(v: torch.Tensor, mask: torch.Tensor, *, num_tokens: Optional[float] = None, **_: object) -> torch.Tensor:
    """Sum over all generated tokens / their number (TRL ``dapo``)."""
    denom = float(mask.sum()) if num_tokens is None else float(num_tokens)
    return v.sum() / max(denom, 1.0)


@AGGREGATIONS.register("seq_mean")
def seq_mean(v: torch.Tensor, mask: torch.Tensor, *, num_seqs: Optional[float] = None, **_: object) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (TRL ``grpo``)."""
    per_seq = v.sum(dim=1) / mask.sum(dim=1).clamp(min=1).to(v.dtype)  # (B,)
    return per_seq.sum() / max(_num_seqs(mask, num_seqs), 1.0)


@AGGREGATIONS.register("seq_sum_norm")
def seq_sum_norm(v: torch.Tensor, mask: torch.Tensor, *, num_seqs: Optional[float] = None,
                 norm_len: Optional[float] = None, **_: object) -> torch.Tensor:
    """Sum over tokens / (sequences x a constant length ``norm_len``) (Dr. GRPO; TRL ``dr_grpo``)."""
    if not norm_len or norm_len <= 0:
        raise ValueError("aggregation 'seq_sum_norm' needs norm_len > 0 (e.g. max_new_tokens * (T + 1))")
    return v.sum() / (max(_num_seqs(mask, num_seqs), 1.0) * float(norm_len))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "abs") -> torch.Tensor:
    """Per-token KL estimate (B, L) between the policy and the reference on the sampled tokens."""
    return KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("abs")
def kl_abs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """IVT Sec. 4.1: the mean absolute log-probability difference to the reference."""
    return (logprobs - ref_logprobs).abs()


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3: exp(ref - logp) - (ref - logp) - 1 >= 0 (GRPO, DeepSeekMath Eq. 4)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def grpo_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.04,
    entropy_coef: float = 0.01,
    kl_estimator: str = "abs",
    clip_eps: Optional[float] = None,
    aggregation: str = "token_mean",
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    norm_len: Optional[float] = None,
    entropy_aggregation: str = "token_mean",
) -> LossOutput:
    """IVT Eq. 2 on a (micro-)batch of B trajectories.

    Shapes: ``logprobs``, ``mask``, ``ref_logprobs``, ``entropy``, ``old_logprobs``: (B, L), generated tokens of
    all steps concatenated (``TokenLogprobs``); ``advantages``: (B,), one per trajectory (IVT scores whole
    trajectories), or (B, L), one per token (per-step credit, ``agents.grpo.step_credit``). ``beta > 0`` needs
    ``ref_logprobs``; ``clip_eps`` needs ``old_logprobs``.
    """
    mask = mask.bool()
    B = logprobs.shape[0]
    adv = torch.as_tensor(advantages, dtype=logprobs.dtype, device=logprobs.device)
    if adv.ndim == 2 and adv.shape == logprobs.shape:
        pass  # (B, L) per token
    else:
        adv = adv.reshape(-1)
        if adv.shape[0] != B:
            raise ValueError(f"grpo_loss: {adv.shape[0]} advantages for {B} trajectories")
        adv = adv[:, None]  # (B, 1)
    agg = lambda x: aggregate(x, mask, aggregation, num_tokens=num_tokens, num_seqs=num_seqs,  # noqa: E731
                              norm_len=norm_len)

    clip_frac = 0.0
    if clip_eps is None:
        pg_tok = -logprobs * adv  # (B, L)
    else:
        if old_logprobs is None:
            raise ValueError("grpo_loss: clip_eps needs old_logprobs (the behaviour policy's log-probs)")
        ratio = torch.exp(logprobs - old_logprobs)  # (B, L)
        surr1 = ratio * adv
        surr2 = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
        pg_tok = -torch.minimum(surr1, surr2)
        with torch.no_grad():
            clipped = (surr2 < surr1) & mask
            clip_frac = float(clipped.sum()) / max(float(mask.sum()), 1.0)
    pg = agg(pg_tok)
    loss = pg

    kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if ref_logprobs is not None:
        kl = agg(kl_penalty(logprobs, ref_logprobs.detach(), kl_estimator))
        loss = loss + beta * kl
    elif beta:
        raise ValueError("grpo_loss: beta > 0 needs ref_logprobs (the reference policy's log-probs)")

    ent = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if entropy is not None:
        if entropy_aggregation not in ("token_mean", "loss"):
            raise ValueError(f"unknown entropy_aggregation {entropy_aggregation!r}; choose token_mean or loss")
        ent = agg(entropy) if entropy_aggregation == "loss" else aggregate(entropy, mask, "token_mean",
                                                                           num_tokens=num_tokens)
        loss = loss - entropy_coef * ent
    return LossOutput(loss=loss, pg=float(pg.detach()), kl=float(kl.detach()), entropy=float(ent.detach()),
                      clip_frac=clip_frac, num_tokens=int(mask.sum()))
