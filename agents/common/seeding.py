"""Seeds: one call seeds every generator a run uses; derived seeds are stateless, so a resumed run draws exactly
what the uninterrupted run would have drawn."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers, e.g. ``(seed, rank, iteration, purpose)``; no state is consumed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)
