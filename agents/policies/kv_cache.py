"""Decoding helpers of the rollout engine: a KV cache that grows in amortised O(1) per token, copying cache rows
out and back (finished rows leaving the decode batch), a lean decode forward, fast inverse-CDF sampling.

transformers' ``DynamicLayer.update`` concatenates the whole cache with each new token (``torch.cat``: O(L) copy
per token per layer, the largest single cost of tiny-model decoding on CPU). :class:`GrowingLayer` keeps a capacity
buffer that doubles when full and returns views of the filled part, so each token is one in-place write.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from agents.policies.vision import cache_kwarg

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


def cache_rows(cache: DynamicCache, index: torch.Tensor) -> Optional[DynamicCache]:
    """A new cache holding copies of rows ``index`` (1-D long) of ``cache``; ``cache`` is left as it is. None when
    a layer is not a :class:`GrowingLayer` (the caller then keeps the full batch)."""
    if not all(type(layer) is GrowingLayer and layer.get_seq_length() > 0 for layer in cache.layers):
        return None
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)  # same config attributes; its buffers replaced below (the copy owns them)
        n = layer._len  # same capacity as the source: the next decode tokens need no regrowth
        new._k = layer._k.new_empty((len(index),) + tuple(layer._k.shape[1:]))
        new._v = layer._v.new_empty((len(index),) + tuple(layer._v.shape[1:]))
        new._k[:, :, :n] = layer._k[index, :, :n]
        new._v[:, :, :n] = layer._v[index, :, :n]
        new.keys, new.values = new._k[:, :, :n], new._v[:, :, :n]
        out.layers.append(new)
    return out


def write_rows(full: DynamicCache, part: DynamicCache, index: torch.Tensor, start: int) -> None:
    """Copy positions ``[start, part length)`` of ``part``'s rows into rows ``index`` of ``full`` (which holds
    ``start`` positions and grows to ``part``'s length). The new positions of the other rows of ``full`` are zeros:
    finite keys and values under attention-mask 0, which get exactly zero attention weight."""
    for lf, lp in zip(full.layers, part.layers):
        end = lp._len
        if end <= start:
            continue
        if lf._len != start:
            raise ValueError(f"write_rows: the full cache holds {lf._len} positions, expected {start}")
        if end > lf._k.shape[-2]:
            lf._grow(lf._k, lf._v, end)
        lf._k[:, :, start:end] = 0
        lf._v[:, :, start:end] = 0
        lf._k[index, :, start:end] = lp._k[:, :, start:end]
        lf._v[index, :, start:end] = lp._v[:, :, start:end]
        lf._len = end
        lf.keys, lf.values = lf._k[:, :, :end], lf._v[:, :, :end]


def sample_inverse_cdf(probs: torch.Tensor, generator: Optional[torch.Generator],
                       rows: Optional[torch.Tensor] = None, n_rows: int = 0) -> torch.Tensor:
    """One draw per row of ``probs`` (B, V) by inverse CDF: one uniform per row instead of V random numbers
    (``torch.multinomial`` costs ~10x more on CPU). Zero-probability ids are never drawn (``right=True``).

    ``rows`` (B,) / ``n_rows``: ``probs`` holds rows ``rows`` of a batch of ``n_rows`` (the rollout engine's decode
    batch without its finished rows). ``n_rows`` uniforms are drawn and row b uses uniform ``rows[b]``, so each
    row's draw does not depend on which other rows are still in the batch (same seed, same tokens)."""
    cdf = probs.cumsum(-1)  # (B, V)
    n = n_rows if rows is not None else probs.shape[0]
    u = torch.rand((n, 1), generator=generator, device=probs.device, dtype=cdf.dtype)
    if rows is not None:
        u = u[rows]
    u = u * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1)  # (B,)
    overflow = tok >= probs.shape[-1]  # u rounded up to the total: take the most likely id instead
    if bool(overflow.any()):
        tok = torch.where(overflow, probs.argmax(-1), tok)
    return tok


def lean_text_model(model: Any) -> Optional[Any]:
    """The text decoder of a Qwen-VL ``model`` for :func:`lean_decode_hidden`, or None where its assumptions fail
    (eager attention adds the mask, flash attention wants none; sliding-window layers; another module layout)."""
    lm = getattr(model.model, "language_model", None)
    cfg = getattr(lm, "config", None)
    if (cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa"
            or set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}
            or not all(hasattr(lm, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm"))):
        return None
    return lm


_CACHE_KW: dict = {}  # module class -> the name of its forward's KV-cache argument


def cache_kw(module: Any) -> str:
    """:func:`agents.policies.vision.cache_kwarg`, memoised per class (it inspects a signature: ~30 us a call)."""
    kw = _CACHE_KW.get(type(module))
    if kw is None:
        kw = _CACHE_KW[type(module)] = cache_kwarg(module)
    return kw


def lean_decode_hidden(lm: Any, ids: torch.Tensor, pos: torch.Tensor, attn: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor:
    """Hidden states (B, 1, H) of one decode token per row (``ids`` (B, 1), rope positions ``pos`` (3, B, 1),
    padding mask ``attn`` (B, L) including the new column): the text model's own layer loop without its wrappers
    (output capturing, argument checks, mask construction: about 12% of a tiny-model decode forward on CPU). The
    one query per row sees every cached key its mask allows, so the sdpa mask is the padding mask itself,
    ``(B, 1, 1, L)`` bool: what ``create_causal_mask`` builds when the query is the last position."""
    x = lm.embed_tokens(ids)  # (B, 1, H)
    mask = attn[:, None, None, :].bool()
    rope = lm.rotary_emb(x, pos)  # multimodal rope sections (text tokens: three equal rows)
    for layer in lm.layers:
        x = layer(x, attention_mask=mask, position_ids=None, use_cache=True, position_embeddings=rope,
                  **{cache_kw(layer): cache})  # cache / past_key_values: by transformers version
        x = x[0] if isinstance(x, tuple) else x  # older transformers return (hidden, ...)
    return lm.norm(x)
