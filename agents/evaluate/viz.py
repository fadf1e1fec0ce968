"""Trajectory strips: one image per trajectory, every step's box drawn on the original image, side by side.

A title line gives the expression and sample id; panel t shows box t as the env draws it (red semi-transparent
fill + outline, :func:`ivt_env.rendering.draw_box`, i.e. the overlay the policy sees at step t+1), the GT as a thin
cyan outline, and a caption ``t=1 IoU 0.532`` (``t=1 invalid`` when the step had no parseable box). Panels are scaled to a common height so 128-pixel synthetic
scenes stay readable.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ivt_env.rendering import draw_box

GT_COLOR = (0, 255, 255)  # cyan: the GT outline
CAPTION_H = 22  # pixels of the caption band above each panel
GAP = 4  # white pixels between panels


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _panel(
    image: np.ndarray, box_px: Optional[Sequence[float]], gt_px: Sequence[float], caption: str, height: int
) -> Image.Image:
    drawn = draw_box(image, box_px)
    h, w = drawn.shape[:2]
    scale = height / h
    img = Image.fromarray(drawn).resize((max(1, round(w * scale)), height), Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(img)
    x1, y1, x2, y2 = (v * scale for v in gt_px)
    d.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=GT_COLOR, width=max(1, height // 200))
    out = Image.new("RGB", (img.width, height + CAPTION_H), (255, 255, 255))
    out.paste(img, (0, CAPTION_H))
    ImageDraw.Draw(out).text((3, 3), caption, fill=(0, 0, 0), font=_font(CAPTION_H - 6))
    return out


def trajectory_strip(traj, image: Optional[np.ndarray] = None, height: int = 256) -> np.ndarray:
    """(H, W, 3) uint8 strip of ``traj``; ``image`` is the ORIGINAL image (default: step 0's observation)."""
    if image is None:
        if not traj.steps or traj.steps[0].observation is None:
            raise ValueError(f"trajectory_strip: no image for sample {traj.sample_id!r}: pass image= or collect "
                             "with keep_observations=True")
        image = traj.steps[0].observation
    image = np.asarray(image, dtype=np.uint8)
    panels = []
    for s in traj.steps:
        caption = f"t={s.t} IoU {s.iou:.3f}" if s.valid else f"t={s.t} invalid"
        panels.append(_panel(image, s.box if s.valid else None, traj.gt_box, caption, height))
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    strip = Image.new("RGB", (max(1, width), height + 2 * CAPTION_H), (255, 255, 255))
    title = f'"{traj.expression}"  ({traj.sample_id})'
    font = _font(CAPTION_H - 6)
    while len(title) > 8 and ImageDraw.Draw(strip).textlength(title, font=font) > width - 6:
        title = title[: len(title) - 8] + "..."  # keep the title inside the strip
    ImageDraw.Draw(strip).text((3, 3), title, fill=(0, 0, 0), font=font)
    x = 0
    for p in panels:
        strip.paste(p, (x, CAPTION_H))
        x += p.width + GAP
    return np.asarray(strip)


def save_strip(path: str | os.PathLike, strip: np.ndarray) -> None:
    """Write a strip as PNG atomically."""
    from rollouts.storage import save_png

    save_png(path, strip)
