"""Shared test settings: one torch thread (CI has 2 cores), no hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # torch is a dependency, but keep env-only tests importable without it
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
