"""Trajectory dataclasses: what collection produces and every learner consumes.

A trajectory is one episode of T+1 steps (step 0 plus T refinements; fewer when the env allows stopping and the
policy stopped: ``len(steps) - 1`` refinement steps were used). Token-level data is optional (scripted
policies have none). Token layout of a VLM trajectory (token-in / token-out, never re-tokenised):

    steps[0].injected_ids + steps[0].token_ids + steps[1].injected_ids + steps[1].token_ids + ...

``injected_ids`` are what the policy/environment put in context before the step's generation (the prompt with the
image at step 0; the overlay image and corrective instruction at step t>0); ``token_ids`` are what the model
generated, with ``logprobs`` under the sampling policy (one per generated token), i.e. at the step's sampling
``temperature``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import numpy as np


@dataclass
class Step:
    t: int
    text: str
    valid: bool
    iou: float
    reward: float = 0.0
    box_norm: Optional[list[float]] = None  # parsed box, [0, 1000]
    box: Optional[list[float]] = None  # parsed box, xyxy pixels
    reason: Optional[str] = None  # why the box is invalid
    token_ids: Optional[list[int]] = None  # generated ids
    logprobs: Optional[list[float]] = None  # per generated token, under the behaviour policy
    injected_ids: Optional[list[int]] = None  # ids injected before this step's generation
    image_path: Optional[str] = None  # rendered observation written to disk (on request)
    observation: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # (H, W, 3) uint8, memory only
    extra: dict = field(default_factory=dict)  # policy-specific, JSON-serialisable
    boxes_norm: Optional[list[list[float]]] = None  # multi-box episodes: every parsed box, [0, 1000]
    # the temperature the tokens were sampled at: ``logprobs`` = log_softmax(logits / temperature) of the chosen
    # ids, and the learner scores the tokens at it again (1.0 for greedy; None: unknown / text-only, scored at 1)
    temperature: Optional[float] = None


@dataclass
class Trajectory:
    sample_id: str
    dataset: str
    expression: str
    gt_box: list[float]  # xyxy pixels
    width: int
    height: int
    steps: list[Step] = field(default_factory=list)
    group_id: int = 0  # trajectories of one group share the sample and the prompt
    meta: dict = field(default_factory=dict)

    @property
    def ious(self) -> list[float]:
        return [s.iou for s in self.steps]

    @property
    def valids(self) -> list[bool]:
        return [s.valid for s in self.steps]

    @property
    def final_iou(self) -> float:
        return self.steps[-1].iou if self.steps else 0.0

    @property
    def ret(self) -> float:
        """Undiscounted return: the sum of step rewards (IVT Eq. 3 puts it all on the last step)."""
        return float(sum(s.reward for s in self.steps))

    @property
    def has_tokens(self) -> bool:
        return bool(self.steps) and all(s.token_ids is not None for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; in-memory observation images are left out (never deep-copied)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "steps"}
        d["steps"] = [
            {f.name: copy.deepcopy(getattr(s, f.name)) for f in fields(s) if f.name != "observation"} for s in self.steps
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        d = dict(d)
        steps = [Step(**{k: v for k, v in s.items() if k != "observation"}) for s in d.pop("steps", [])]
        return cls(steps=steps, **d)
