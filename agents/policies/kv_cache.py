"""A KV cache that grows in amortised O(1) per token, and fast inverse-CDF sampling.

transformers' ``DynamicLayer.update`` concatenates the whole cache with each new token (``torch.cat``: O(L) copy
per token per layer, the largest single cost of tiny-model decoding on CPU). :class:`GrowingLayer` keeps a capacity
buffer that doubles when full and returns views of the filled part, so each token is one in-place write.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 256


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` with a doubling capacity buffer ``(B, heads, capacity, head_dim)``; same interface."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None
        self._len = 0

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, need: int) -> None:
        old = 0 if self._k is None else self._k.shape[-2]
        cap = max(need, 2 * old, MIN_CAPACITY)
        b, h, _, dk = key_states.shape
        k = key_states.new_empty((b, h, cap, dk))
        v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
        if self._len:
            k[:, :, : self._len] = self._k[:, :, : self._len]
            v[:, :, : self._len] = self._v[:, :, : self._len]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        need = self._len + n
        if self._k is None or need > self._k.shape[-2]:
            self._grow(key_states, value_states, need)
        self._k[:, :, self._len : need] = key_states
        self._v[:, :, self._len : need] = value_states
        self._len = need
        self.keys, self.values = self._k[:, :, :need], self._v[:, :, :need]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            idx = torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats)
            self.batch_select_indices(idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingLayer does not crop (the rollout engine never needs it)")

    def reset(self) -> None:
        self._k = self._v = None
        self._len = 0
        super().reset()


def growing_cache(config: Any) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are :class:`GrowingLayer` s."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def sample_inverse_cdf(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of ``probs`` (B, V) by inverse CDF: one uniform per row instead of V random numbers
    (``torch.multinomial`` costs ~10x more on CPU). Zero-probability ids are never drawn (``right=True``)."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1)  # (B,)
    overflow = tok >= probs.shape[-1]  # u rounded up to the total: take the most likely id instead
    if bool(overflow.any()):
        tok = torch.where(overflow, probs.argmax(-1), tok)
    return tok
