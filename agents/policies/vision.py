"""Vision features computed once per distinct image of a forward pass (issue 16).

A GRPO batch holds many byte-identical images: the N members of a group share the step-0 image, and with branching
groups the M siblings of a step-0 answer share the step-1 overlay (8 prompts x 6 with branch 3: 72 distinct images of
144 in the update, 64 of 112 in the rollout). Each :class:`~agents.policies.vlm_prompt.Chunk` carries a content key
of its image (:func:`~agents.policies.vlm_prompt.image_key`); :func:`vision_inputs` runs the vision tower on the
distinct images only and hands the model per-image features through ``mm_encoder_outputs`` (transformers' precomputed
multimodal features), so everything after the vision tower is unchanged. The vision tower treats every image
independently (per-image attention windows), so the features are the same up to float rounding of the batched
matmuls, and the gradient of a shared image is the sum over its uses, as before. Inside the tower, the patch
embedding runs as a matmul (:func:`linear_patch_embeddings`) and Qwen3-VL's per-image attention loop as one batched
call per patch count (:func:`batched_vision_attention`); ``ENABLED`` False restores transformers' own forwards.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch

ENABLED = True  # False: every image through the vision tower (the pre-issue-16 route; benchmarks and tests)
_SUPPORTS: dict[type, bool] = {}


def supports_precomputed(model: Any) -> bool:
    """``model`` (a Qwen-VL ``model.model``) takes ``mm_encoder_outputs`` and has ``get_image_features``."""
    cls = type(model)
    if cls not in _SUPPORTS:
        try:
            params = inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _SUPPORTS[cls] = "mm_encoder_outputs" in params and callable(getattr(model, "get_image_features", None))
    return _SUPPORTS[cls]


def cache_kwarg(model: Any) -> str:
    """The name of ``model.forward``'s KV-cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def distinct(keys: Sequence[Optional[tuple]]) -> tuple[list[int], list[int]]:
    """(index of the first image of each distinct key, per image the position of its key among the distinct
    ones); a None key is never shared."""
    first: list[int] = []
    mapping: list[int] = []
    seen: dict = {}
    for i, k in enumerate(keys):
        j = None if k is None else seen.get(k)
        if j is None:
            j = len(first)
            first.append(i)
            if k is not None:
                seen[k] = j
        mapping.append(j)
    return first, mapping


def vision_inputs(model: Any, pixel_values: Sequence[torch.Tensor], grids: Sequence[torch.Tensor],
                  keys: Optional[Sequence[Optional[tuple]]], device: Any, dedup: Optional[bool] = None) -> dict[str, Any]:
    """The image keyword arguments of one ``model`` forward for images ``pixel_values[i]`` / ``grids[i]`` (1, 3):
    ``pixel_values`` + ``image_grid_thw`` as usual, or, when some images repeat (equal ``keys``), ``image_grid_thw``
    + ``mm_encoder_outputs`` with the features of the distinct images computed once. ``{}`` without images."""
    if not pixel_values:
        return {}
    grid = torch.cat(list(grids)).to(device)
    first, mapping = distinct(keys if keys is not None else [None] * len(pixel_values))
    if not (ENABLED if dedup is None else dedup) or len(first) == len(mapping) or not supports_precomputed(model):
        return {"pixel_values": torch.cat(list(pixel_values)).to(device), "image_grid_thw": grid}
    out = model.get_image_features(torch.cat([pixel_values[i] for i in first]).to(device), grid[first],
                                   return_dict=True)
    pooled = out.pooler_output
    if not isinstance(pooled, (tuple, list)) or len(pooled) != len(first):  # unknown layout: the plain route
        return {"pixel_values": torch.cat(list(pixel_values)).to(device), "image_grid_thw": grid}
    out.pooler_output = tuple(pooled[j] for j in mapping)
    deep = getattr(out, "deepstack_features", None)
    if deep is not None:
        out.deepstack_features = [tuple(f[j] for j in mapping) for f in deep]
    return {"mm_encoder_outputs": {"image": out}, "image_grid_thw": grid}


# ------------------------------------------------------------------------------------------- patch embedding
_LINEAR_CLASSES: dict[type, type] = {}


def _linear_patch_embed(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen-VL's patch embedding as the matrix product it is: a Conv3d whose kernel equals its stride and the whole
    (C, T, P, P) input of each patch is ``x @ W.view(E, -1).T + b``. Same parameters (the Conv3d's), same result up
    to float rounding, and on CPU several times cheaper than the convolution, above all its backward."""
    if not ENABLED:
        return super(type(self), self).forward(hidden_states)
    w = self.proj.weight
    x = hidden_states.reshape(-1, w[0].numel()).to(dtype=w.dtype)
    return torch.nn.functional.linear(x, w.reshape(w.shape[0], -1), self.proj.bias).view(-1, self.embed_dim)


def _swap_forward(m: torch.nn.Module, registry: dict, prefix: str, forward: Any) -> None:
    """Give ``m`` ``forward`` through a subclass of its own class (one per class, kept in ``registry``): its
    weights, hooks and ``isinstance`` checks stay as they were, and ``copy.deepcopy`` keeps the new forward."""
    cls = type(m)
    if cls not in registry:
        registry[cls] = type(prefix + cls.__name__, (cls,), {"forward": forward})
    m.__class__ = registry[cls]


def linear_patch_embeddings(model: torch.nn.Module) -> int:
    """Give every Qwen-VL vision patch embedding of ``model`` (a ``proj`` Conv3d with kernel == stride, no padding,
    one group) the :func:`_linear_patch_embed` forward, by switching the module to a subclass of its own class (so
    ``copy.deepcopy`` keeps it); returns how many were changed. Weights and state dicts are untouched."""
    n = 0
    for m in model.modules():
        proj = getattr(m, "proj", None)
        cls = type(m)
        if cls in _LINEAR_CLASSES.values():
            continue
        if not (cls.__name__.endswith("PatchEmbed") and isinstance(proj, torch.nn.Conv3d)):
            continue
        if (tuple(proj.kernel_size) != tuple(proj.stride) or proj.padding != (0, 0, 0) or proj.groups != 1
                or tuple(proj.dilation) != (1, 1, 1) or not hasattr(m, "embed_dim")):
            continue
        _swap_forward(m, _LINEAR_CLASSES, "Linear", _linear_patch_embed)
        n += 1
    return n


# ------------------------------------------------------------------------------------------- vision attention
_BATCHED_CLASSES: dict[type, type] = {}


def _batched_vision_attention(self: torch.nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                              position_embeddings: Any = None, max_seqlen: Any = None, **kwargs: Any) -> torch.Tensor:
    """Qwen3-VL's vision attention under sdpa, which runs one attention call per image (a Python loop over the
    ``cu_seqlens`` chunks: 72 images a GRPO batch), with the images of one patch count stacked into ONE batched
    call instead: the same per-image attention (no image sees another), the same result up to float rounding."""
    if not ENABLED or self.config._attn_implementation != "sdpa" or kwargs.get("output_attentions"):
        return super(type(self), self).forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                               max_seqlen=max_seqlen, **kwargs)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, H, d)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    starts, lengths = cu_seqlens[:-1].tolist(), (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    drop = self.attention_dropout if self.training else 0.0
    parts, order = [], []
    for length in dict.fromkeys(lengths):  # one batched call per patch count, images in their order
        imgs = [s for s, m in zip(starts, lengths) if m == length]
        if len(imgs) == len(starts):  # every image alike: a view, no gather
            qg, kg, vg = (x.view(len(imgs), length, *x.shape[1:]) for x in (q, k, v))
        else:
            idx = torch.cat([torch.arange(s, s + length) for s in imgs]).to(q.device)
            qg, kg, vg = (x[idx].view(len(imgs), length, *x.shape[1:]) for x in (q, k, v))
            order.append(idx)
        o = torch.nn.functional.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2),
                                                             vg.transpose(1, 2), dropout_p=drop, scale=self.scaling)
        parts.append(o.transpose(1, 2).reshape(-1, *q.shape[1:]))  # (images x length, H, d)
    out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.argsort(torch.cat(order))]
    return self.proj(out.reshape(n, -1))


def batched_vision_attention(model: torch.nn.Module) -> int:
    """Give every Qwen3-VL vision attention module of ``model`` the :func:`_batched_vision_attention` forward (a
    subclass of its own class, as :func:`linear_patch_embeddings`); returns how many were changed."""
    n = 0
    for m in model.modules():
        cls = type(m)
        if cls.__name__ != "Qwen3VLVisionAttention" or not all(hasattr(m, a) for a in ("qkv", "proj", "scaling")):
            continue
        _swap_forward(m, _BATCHED_CLASSES, "Batched", _batched_vision_attention)
        n += 1
    return n


def fast_vision(model: torch.nn.Module) -> int:
    """:func:`linear_patch_embeddings` and :func:`batched_vision_attention` on ``model``: modules changed."""
    return linear_patch_embeddings(model) + batched_vision_attention(model)
