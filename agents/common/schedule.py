"""The learning-rate schedule of every learner: linear warm-up, a constant stretch, then a decay.

>>> import torch
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
>>> s = make_scheduler(opt, total=4, warmup=2, kind="linear")
>>> [round(lr_factor(k, total=4, warmup=2, kind="linear"), 2) for k in range(5)]
[0.5, 1.0, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, total: int, warmup: int = 0, kind: str = "cosine", decay_start: int = 0,
              min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based): ``(step + 1) / warmup``
    during warm-up, 1 until ``max(warmup, decay_start)``, then a linear or cosine decay that reaches ``min_ratio``
    at step ``total``; ``kind="constant"`` never decays."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; known: {list(SCHEDULES)}")
    if warmup and step < warmup:
        return (step + 1) / warmup
    start = max(warmup, decay_start)
    if kind == "constant" or step < start:
        return 1.0
    frac = min(max((step - start) / max(total - start, 1), 0.0), 1.0)
    decay = 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return min_ratio + (1.0 - min_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, *, total: int, warmup: int = 0, kind: str = "cosine",
                   decay_start: int = 0, min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`; step it once per optimizer step (GRPO: once per iteration)."""
    kw = dict(total=max(int(total), 1), warmup=int(warmup), kind=kind, decay_start=int(decay_start),
              min_ratio=float(min_ratio))
    lr_factor(0, **kw)  # validates ``kind`` before any training
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **kw))
