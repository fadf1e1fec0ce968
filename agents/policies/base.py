"""Trainable policies: the interface behaviour cloning and GRPO need on top of the rollout contract.

:class:`Policy`, :class:`PolicyOutput` and :class:`SamplingParams` are defined in :mod:`rollouts.policy` (the
contract the collector calls) and re-exported here, so ``agents.policies.base.Policy`` keeps working for plug-ins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from rollouts.policy import Policy, PolicyOutput, SamplingParams

__all__ = ["BCLossOptions", "Policy", "PolicyOutput", "SamplingParams", "TokenLogprobs", "TrainablePolicy"]


@dataclass
class BCLossOptions:
    """How :meth:`TrainablePolicy.bc_loss` turns teacher trajectories into targets (the BC config's loss fields)."""

    number_sigma: float = 0.0
    """> 0: soft Gaussian targets of this width on tokens that are whole numbers (policies without such tokens may
    ignore it); 0: one-hot targets."""
    clone_start: bool = True
    """False: step 0 of trajectories with refinement steps is context, not a target (a scripted student wrote it)."""
    clone_start_numbers: bool = True
    """False: the number tokens of step 0 (its box coordinates) are context, not targets, while step 0's other tokens
    (reasoning, stop marker, brackets) still train: a fine-tune that teaches the model WHEN to stop, on its own
    step-0 answers, leaves its step-0 box distribution without a direct gradient (issue 14)."""
    last_step_only: bool = False
    """True: only the LAST step of each trajectory is a target, earlier steps are context (GRPO's teacher guidance:
    the policy's own steps, then the teacher's answer to the state they reached)."""


@dataclass
class TokenLogprobs:
    """Per-token quantities of the GENERATED tokens of a batch of trajectories, right-padded.

    Generated tokens of all steps of trajectory ``i`` are concatenated in order (step 0 first); injected tokens
    (prompt, overlay images, corrective instructions) never appear here.
    """

    logprobs: Any  # torch.Tensor (B, L) float, log pi(token | prefix); carries grad when asked for
    entropy: Any  # torch.Tensor (B, L) float, entropy of the full next-token distribution at each position
    mask: Any  # torch.Tensor (B, L) bool, True on real generated tokens


class TrainablePolicy(Policy):
    """A policy with parameters: what behaviour cloning and GRPO need, and nothing model-specific beyond it."""

    def token_logprobs(self, trajectories: Sequence[Any], *, reference: bool = False, grad: bool = True) -> TokenLogprobs:
        """Teacher-forced log-probs and entropies of each trajectory's generated tokens (token-in / token-out:
        the stored ``token_ids``/``injected_ids`` are used as they are). ``reference=True``: under the frozen
        reference policy (LoRA adapter disabled, or a frozen copy), never with grad (its entropies may be zeros:
        the KL term reads only the log-probs)."""
        raise NotImplementedError

    def bc_loss(self, trajectories: Sequence[Any], options: Optional[BCLossOptions] = None) -> tuple[Any, int]:
        """Mean cross-entropy over the tokens the model must generate (injected tokens labelled -100), and the
        number of such tokens. Trajectories may carry only texts (teacher data): the policy builds the
        sequence exactly as at inference. ``options``: :class:`BCLossOptions` (None: the defaults)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[Any]:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError
