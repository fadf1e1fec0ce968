"""Multimodal rope positions of a right-padded batch without the model's per-row Python loop.

Qwen3-VL's ``get_rope_index`` (transformers ``modeling_qwen3_vl.Qwen3VLModel``) walks each row's token-type runs
with ``itertools.groupby`` and a few small tensor ops per run: about 7 ms for a behaviour-cloning micro-batch of 16
rows here, ~3% of a CPU training step. :func:`mrope_positions` computes the same integers with numpy, per run:

- a text run of length n continues the count: ``(p, p + 1, ..., p + n - 1)`` on all three axes, then ``p += n``;
- an image run of grid ``(t, h, w)`` (patches; ``m`` = spatial merge size) is ``t * (h/m) * (w/m)`` tokens in
  (t, row, column) order at ``(p + t_i, p + row, p + column)``, then ``p += max(h, w) // m``;
- padding (attention mask 0) is position 0; images take the rows' grids in batch order.

It answers for the model families :data:`FAMILIES` only (``supports``); other models keep their own route.
``tests/agents/policies/test_rope.py`` checks it against the model's own ``get_rope_index`` on padded batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FAMILIES = ("Qwen3VLModel",)  # get_rope_index as above (transformers 5.x); Qwen2-VL's differs for videos


def supports(model: Any) -> bool:
    """Whether :func:`mrope_positions` equals ``model.model.get_rope_index`` for image batches of ``model``."""
    inner = getattr(model, "model", None)
    return type(inner).__name__ in FAMILIES and hasattr(getattr(model, "config", None), "vision_config")


def mrope_positions(mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor, attention_mask: torch.Tensor,
                    spatial_merge_size: int) -> torch.Tensor:
    """``(3, B, L)`` long positions of a batch whose ``mm_token_type_ids`` (B, L) hold 0 (text) and 1 (image)
    only; ``image_grid_thw`` (n_images, 3) lists every image of the batch in row order. Raises ValueError on a
    video token or an image run whose length is not its grid's token count."""
    types = mm_token_type_ids.cpu().numpy()
    keep = attention_mask.cpu().numpy().astype(bool)
    grids = image_grid_thw.cpu().numpy().astype(np.int64).reshape(-1, 3)
    m = int(spatial_merge_size)
    B, L = types.shape
    out = np.zeros((3, B, L), dtype=np.int64)
    if not np.isin(types, (0, 1)).all():
        raise ValueError("mrope_positions: token types other than text (0) and image (1)")
    g = 0
    for b in range(B):
        cols = np.flatnonzero(keep[b])
        row = types[b, cols]
        n = row.shape[0]
        pos = np.empty((3, n), dtype=np.int64)
        cuts = np.flatnonzero(row[1:] != row[:-1]) + 1  # starts of every run but the first
        p = 0
        for s, e in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [n]))):
            if row[s] == 0:
                pos[:, s:e] = np.arange(p, p + e - s)
                p += e - s
                continue
            if g >= grids.shape[0]:
                raise ValueError(f"mrope_positions: row {b} has more image runs than the {grids.shape[0]} grids")
            t, h, w = (int(v) for v in grids[g])
            g += 1
            lh, lw = h // m, w // m
            if e - s != t * lh * lw:
                raise ValueError(f"mrope_positions: row {b}: an image run of {e - s} tokens for grid {(t, h, w)}")
            ti, hi, wi = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
            pos[0, s:e] = ti.reshape(-1) + p
            pos[1, s:e] = hi.reshape(-1) + p
            pos[2, s:e] = wi.reshape(-1) + p
            p += max(h, w) // m
        out[:, b, cols] = pos
    return torch.from_numpy(out)


def rope_positions(model: Any, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
    """(3, B, L) positions of a padded batch for ``model``: :func:`mrope_positions` where it applies, else the
    model's own ``get_rope_index``."""
    if supports(model) and bool(((mm_token_type_ids == 0) | (mm_token_type_ids == 1)).all()):
        merge = int(model.config.vision_config.spatial_merge_size)
        return mrope_positions(mm_token_type_ids, image_grid_thw, attention_mask, merge).to(input_ids.device)
    return model.model.get_rope_index(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids,
                                      image_grid_thw=image_grid_thw, attention_mask=attention_mask)[0]
