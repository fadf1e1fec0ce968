"""The images a trajectory's steps saw, recovered after the fact: from memory, from the PNGs a synthesis or an
evaluation wrote, by re-rendering the overlays, or by replaying the step texts through the env. Training needs
them to score tokens (the VLM policy re-encodes each step's image); one loader serves every caller.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from rollouts.types import Trajectory

ImageResolver = Callable[[Any], np.ndarray]  # traj -> its original image (H, W, 3) uint8


def load_png(path: str, what: str = "image") -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; a missing or unreadable file raises naming ``what`` and the path."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as exc:
        raise FileNotFoundError(f"{what}: cannot read image {path!r}: {exc}") from exc


def original_image(traj: Any, resolver: Optional[ImageResolver]) -> np.ndarray:
    """The trajectory's image before any overlay: meta['image'], meta['image_path'], step 0's, or the resolver's."""
    meta = traj.meta or {}
    first = traj.steps[0] if traj.steps else None
    if isinstance(meta.get("image"), np.ndarray):
        return meta["image"]
    if meta.get("image_path"):
        return load_png(meta["image_path"], f"trajectory {traj.sample_id} meta['image_path']")
    if first is not None and first.observation is not None:
        return first.observation
    if first is not None and first.image_path:
        return load_png(first.image_path, f"trajectory {traj.sample_id} step 0 image_path")
    if resolver is not None:
        return np.asarray(resolver(traj), dtype=np.uint8)
    raise ValueError(
        f"trajectory {traj.sample_id!r} ({traj.dataset}): no image to encode it with. Keep observations "
        "(collect_groups(..., keep_observations=True)), set Step.image_path or meta['image_path'], or give the "
        "policy an image_resolver(traj) callable"
    )


def trajectory_images(traj: Any, resolver: Optional[ImageResolver] = None) -> list[np.ndarray]:
    """The image each step saw: step 0 the original, step t the original with box t-1 drawn (if it was valid)."""
    from ivt_env.boxes import to_pixels
    from ivt_env.rendering import draw_box

    images: list[np.ndarray] = []
    original = None
    for t, st in enumerate(traj.steps):
        if st.observation is not None:
            images.append(np.asarray(st.observation))
            continue
        if st.image_path:
            images.append(load_png(st.image_path, f"trajectory {traj.sample_id} step {t} image_path"))
            continue
        if original is None:
            original = original_image(traj, resolver)
        if t == 0:
            images.append(original)
            continue
        prev = traj.steps[t - 1]
        box = prev.box
        if box is None and prev.box_norm is not None:
            box = to_pixels(prev.box_norm, original.shape[1], original.shape[0])
        images.append(draw_box(original, box if prev.valid else None))
    return images


def replay_observations(traj: Trajectory, env: Any) -> None:
    """Fill every step's ``observation`` by playing the step texts through ``env`` (the env renders each overlay
    from the previous step's parsed box, exactly as at inference)."""
    obs, _ = env.reset(options={"sample_id": traj.sample_id})
    for st in traj.steps:
        st.observation = obs["image"]
        obs, _, terminated, _, _ = env.step(st.text)
        if terminated and st is not traj.steps[-1]:
            raise ValueError(
                f"trajectory {traj.sample_id!r} has {len(traj.steps)} steps but the env ended after step {st.t}: "
                "its max_refine_steps must be len(steps) - 1"
            )
