"""Box coordinates as values in the behaviour-cloning loss: the number tokens of a tokenizer and Gaussian soft
targets over them (:class:`NumberSmoothing`, ``BCConfig.number_sigma``); used by :mod:`agents.policies.vlm`."""

from __future__ import annotations

from typing import Any

import torch

_NUMBER_IDS: dict = {}  # id(tokenizer) -> (tokenizer, ids): one vocabulary scan per tokenizer (151k ids for Qwen)


def number_token_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of the tokens whose text is digits only, surrounding spaces aside (the tiny tokenizer's whole numbers
    "0".."1000"; a digit-by-digit tokenizer's digits), ascending: the tokens that spell box coordinates."""
    hit = _NUMBER_IDS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().isdigit()]
        hit = _NUMBER_IDS[id(tokenizer)] = (tokenizer, torch.tensor(ids, dtype=torch.long))
    return hit[1]


class NumberSmoothing:
    """Soft targets for whole-number tokens in the BC loss: a target number ``n*`` becomes a Gaussian over the
    number tokens, ``q(n) ∝ exp(-(n - n*)^2 / (2 sigma^2))``, and the token's loss is the cross-entropy
    ``-sum_n q(n) log p(n)`` instead of ``-log p(n*)``. A box coordinate one unit off then costs almost nothing
    and one 300 units off costs a lot: the loss knows that coordinates are values (Pix2Seq-style quantised
    coordinates trained with a distance-aware target). Only tokens that ARE a whole number (the tiny tokenizer's
    "0".."1000") are smoothed; other tokens, and tokenizers that spell numbers digit by digit, keep the plain loss.
    """

    def __init__(self, tokenizer: Any, sigma: float, max_value: int = 1000):
        if sigma <= 0:
            raise ValueError(f"NumberSmoothing: sigma must be > 0, got {sigma}")
        ids, values = [], []
        for n in range(max_value + 1):
            i = tokenizer.convert_tokens_to_ids(str(n))
            if isinstance(i, int) and i != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(i) == str(n):
                ids.append(i)
                values.append(n)
        self.sigma = float(sigma)
        self.ids = torch.tensor(ids, dtype=torch.long)  # (K,) token ids of the numbers
        self.values = torch.tensor(values, dtype=torch.float32)  # (K,)
        size = max(ids) + 1 if ids else 0
        self.value_of = torch.full((size,), -1.0)  # token id -> its value, -1 for other tokens
        if ids:
            self.value_of[self.ids] = self.values

    def __len__(self) -> int:
        return int(self.ids.numel())

    def __call__(self, target: torch.Tensor, logp_all: torch.Tensor) -> torch.Tensor:
        """``target`` (N,) token ids, ``logp_all`` (N, V) log-probs -> (N,) ``sum_v q(v) log p(v)`` (= log p(target)
        on rows whose target is not a number)."""
        lp = logp_all.gather(1, target[:, None]).squeeze(1)  # (N,)
        if not len(self):
            return lp
        t = target.cpu()
        val = torch.where(t < self.value_of.numel(), self.value_of[t.clamp_max(self.value_of.numel() - 1)], -1.0)
        rows = (val >= 0).nonzero(as_tuple=True)[0]  # (M,) rows with a number target
        if rows.numel() == 0:
            return lp
        dev = logp_all.device
        q = torch.softmax(-0.5 * ((self.values[None, :] - val[rows, None]) / self.sigma) ** 2, dim=1)  # (M, K)
        soft = (q.to(dev, logp_all.dtype) * logp_all[rows.to(dev)][:, self.ids.to(dev)]).sum(1)  # (M,)
        return lp.index_put((rows.to(dev),), soft)
