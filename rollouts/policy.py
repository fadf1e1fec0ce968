"""The policy contract the collector calls: observations in, one step text per observation out.

Anything implementing :class:`Policy` can be rolled out, evaluated, cloned and trained. Collection calls
``act`` once per step for a whole batch of trajectories that advance in lock-step (all episodes have T+1 steps;
with adaptive refinement an episode that stopped leaves the batch, so a later call sees fewer observations, and
an episode from a given start box begins at step 1 with that box as its step-0 history).
``histories[i]`` holds the :class:`PolicyOutput` s trajectory ``i`` produced so far (empty at step 0), so a
policy can continue a prefix (the VLM policy keeps its KV cache; scripted policies read their previous box).

It lives here, below the learners, so that ``rollouts`` depends on nothing above it (Stable-Baselines3 keeps its
``BasePolicy`` in ``common/`` for the same reason); ``agents.policies.base`` re-exports it.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence


@dataclass
class SamplingParams:
    """Per-step sampling settings (IVT Sec. 4.1 defaults)."""

    temperature_first: float = 1.0
    """Temperature at step 0."""
    temperature_refine: float = 0.7
    """Temperature at refinement steps t >= 1."""
    max_new_tokens: int = 160
    """Generation budget per step."""
    greedy: bool = False
    """Argmax decoding (evaluation); overrides the temperatures."""
    stop_at_box: bool = True
    """Stop a step's generation once a complete box has been emitted."""
    branch: int = 1
    """Branching groups (GRPO): members of a group whose ``group_member // branch`` are equal share ONE sampled
    step-0 answer (same tokens; the VLM engine computes it once and forks its KV cache), then refine on their own.
    1: every member samples its own step 0. Policies without support ignore it (GRPO checks)."""

    @classmethod
    def from_config(cls, cfg: Any, greedy: bool = False) -> "SamplingParams":
        """From any config holding ``temperature_first``, ``temperature_refine`` and ``max_new_tokens`` fields."""
        return cls(temperature_first=cfg.temperature_first, temperature_refine=cfg.temperature_refine,
                   max_new_tokens=cfg.max_new_tokens, greedy=greedy)

    def temperature(self, step: int) -> float:
        return 0.0 if self.greedy else (self.temperature_first if step == 0 else self.temperature_refine)


@dataclass
class PolicyOutput:
    """One step's action. ``text`` is the env action; token fields are filled by model policies."""

    text: str
    token_ids: Optional[list[int]] = None
    logprobs: Optional[list[float]] = None
    injected_ids: Optional[list[int]] = None
    extra: dict = field(default_factory=dict)
    temperature: Optional[float] = None
    """Temperature the ``logprobs`` are scored at (the sampling temperature; 1.0 for greedy; None: no tokens)."""


class Policy:
    """Base class. Subclasses implement :meth:`act`; ``seed`` makes sampling reproducible."""

    name: str = "policy"

    def act(
        self,
        observations: Sequence[Mapping[str, Any]],
        histories: Sequence[Sequence[PolicyOutput]],
        infos: Sequence[Mapping[str, Any]],
        sampling: SamplingParams,
    ) -> list[PolicyOutput]:
        """Return one :class:`PolicyOutput` per observation.

        ``observations[i]`` is the env observation (``image``, ``expression``, ``step``, ``prev_box``,
        ``prev_valid``); ``infos[i]`` the env info of the last reset/step (scripted policies that cheat, such as
        the oracle and teacher, read ``gt_box_norm`` there; model policies must not).
        """
        raise NotImplementedError

    def seed(self, seed: Optional[int]) -> None:  # pragma: no cover - default: nothing random
        pass
