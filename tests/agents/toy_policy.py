"""A tiny trainable policy for fast learner tests (loaded by import path: ``tests.agents.toy_policy:ToyBoxPolicy``).

Per step t it picks one of K fixed candidate boxes (a 3x3 grid in [0, 1000]) from a learnable categorical
``logits[t]`` (one "token" per step: the candidate index). It records token ids and temperature-1 log-probs like
the VLM policy, and implements the TrainablePolicy interface; a frozen ``base`` tensor stands in for weights that
must not change.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from agents.policies.base import PolicyOutput, SamplingParams, TokenLogprobs, TrainablePolicy

GRID = [(x, y) for y in range(3) for x in range(3)]
CANDIDATES = [f"[{x * 333}, {y * 333}, {x * 333 + 333}, {y * 333 + 333}]" for x, y in GRID]


class ToyBoxPolicy(TrainablePolicy):
    name = "toy"

    def __init__(self, max_steps: int = 3, init_seed: int = 0, path: Optional[str] = None):
        g = torch.Generator().manual_seed(init_seed)
        self.logits = torch.nn.Parameter(0.1 * torch.randn(max_steps, len(CANDIDATES), generator=g))  # (T+1, K)
        self.ref_logits = self.logits.detach().clone()  # the frozen reference (SFT) policy
        self.base = torch.randn(4, generator=g)  # frozen, must never change
        self._gen = torch.Generator().manual_seed(0)

    def seed(self, seed: Optional[int]) -> None:
        if seed is not None:
            self._gen.manual_seed(int(seed))

    def act(self, observations, histories, infos, sampling: SamplingParams) -> list[PolicyOutput]:
        out = []
        with torch.no_grad():
            for obs in observations:
                t = int(obs["step"])
                logp = torch.log_softmax(self.logits[t], dim=-1)
                temp = sampling.temperature(t)
                if temp == 0:
                    k = int(logp.argmax())
                else:
                    k = int(torch.multinomial(torch.softmax(logp / temp, dim=-1), 1, generator=self._gen))
                out.append(PolicyOutput(text=CANDIDATES[k], token_ids=[k], logprobs=[float(logp[k])],
                                        injected_ids=[]))
        return out

    def token_logprobs(self, trajectories: Sequence[Any], *, reference: bool = False, grad: bool = True):
        W = self.ref_logits if reference else self.logits
        with torch.set_grad_enabled(grad and not reference):
            logp_all = torch.log_softmax(W, dim=-1)  # (T+1, K)
            ent_all = -(logp_all.exp() * logp_all).sum(dim=-1)  # (T+1,)
            L = max(len(t.steps) for t in trajectories)
            zero = torch.zeros(())
            lp = torch.stack([torch.stack([logp_all[t.steps[j].t, t.steps[j].token_ids[0]] if j < len(t.steps)
                                           else zero for j in range(L)]) for t in trajectories])  # (B, L)
            ent = torch.stack([torch.stack([ent_all[t.steps[j].t] if j < len(t.steps) else zero for j in range(L)])
                               for t in trajectories])  # (B, L)
            mask = torch.tensor([[j < len(t.steps) for j in range(L)] for t in trajectories])
        return TokenLogprobs(logprobs=lp, entropy=ent, mask=mask)

    def trainable_parameters(self):
        return [self.logits]

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        torch.save({"logits": self.logits.detach(), "ref_logits": self.ref_logits}, os.path.join(directory, "toy.pt"))
