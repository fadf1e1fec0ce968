"""The IVT refinement loop as a Gymnasium environment: predict a box, see it drawn, refine (IVT Sec. 3.1)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ivt_env.boxes import (BOX_CHOICES, KEEP_MARKER, NORM_MAX, clip_pixel_box, ends_with_keep, hiou, iou, parse_box,
                           to_norm, to_pixels)
from ivt_env.datasets.base import MAX_EXPRESSION_CHARS, DatasetError, GroundingDataset, Sample
from ivt_env.datasets.resolve import image_bound, resolve_dataset
from ivt_env.multibox import parse_boxes
from ivt_env.rendering import Overlay, OverlayStyle
from ivt_env.rewards import RewardFn, call_reward, get_reward, reward_extras
from ivt_env.spaces import FreeText, ImageSpace

MAX_ACTION_CHARS = 16384


class GroundingRefineEnv(gym.Env):
    """Referring-expression grounding with visual self-correction (Iterative Visual Thinking).

    ## Description
    Each episode is one dataset sample: an image and a referring expression that names one object. The agent
    answers with a box, sees that box drawn on the image as a red semi-transparent overlay, and answers again,
    ``max_refine_steps`` (T) times. The env parses each answer, scores it against the ground-truth box and renders
    the overlay; it knows nothing about models or tokens.

    ## Action Space
    :class:`~ivt_env.spaces.FreeText` of at most ``MAX_ACTION_CHARS`` (16,384) characters: the full text the policy
    produced at this step (reasoning and box). The LAST box in the text counts by default (``answer_box="first"``:
    the first, as Ref-Adv's published evaluation reads answers; ``ivt_env.boxes.parse_box``): ``[x1, y1, x2, y2]``
    integers in [0, 1000] normalised by width/height, Qwen3-VL JSON ``{"bbox_2d": [...]}`` (also in a ```json
    fence) or inside ``<answer>...</answer>``. An unparseable text is a legal action: ``info["valid"]`` is
    ``False``, IoU 0. A longer text is cut to its LAST 16,384 characters before parsing (where the final answer
    is; ``info["action_truncated"]`` is then True), so a step costs at most a few milliseconds whatever the text.

    ## Observation Space
    A ``Dict``:

    - ``image``: :class:`~ivt_env.spaces.ImageSpace`, ``uint8`` RGB ``(H, W, 3)`` at the sample's native size. At
      step 0 the original image; at step t the original with step t-1's box drawn (nothing when it was invalid).
    - ``expression``: :class:`~ivt_env.spaces.FreeText`, the referring expression.
    - ``step``: ``Discrete(T + 2)``, the index of the step about to be taken (``T + 1`` once the episode is over).
    - ``prev_box``: ``Box(0, 1000, (4,), float32)``, the previous step's box normalised to [0, 1000]; zeros at step
      0 or when the previous step had no valid box.
    - ``prev_valid``: ``Discrete(2)``, 1 when ``prev_box`` holds a valid box.

    ## Rewards
    ``reward_fn(ious, valids, *, step, max_steps)``, plus ``boxes=`` (each step's [0, 1000] box) for a reward that
    names that parameter (see :mod:`ivt_env.rewards`). Default IVT Eq. 3: 0 at
    intermediate steps and ``IoU(final box, GT) + 0.1 * (fraction of steps with a valid box)`` at the last step.
    The last step is the step that ends the episode: with stopping, a stop at step t calls the reward with
    ``step = max_steps = t``, so rewards see the steps actually taken. ``step_cost`` c > 0 subtracts c from the
    reward of every refinement step (t >= 1; a start box's step 0 is no refinement either).

    ## Starting State
    ``reset(seed=...)`` draws a sample uniformly with the env's RNG; ``options={"index": i}`` or
    ``options={"sample_id": s}`` picks one. The first observation is the original image without overlay.
    ``options={"start_box": [x1, y1, x2, y2]}`` (pixels, e.g. another model's proposal; clipped to the image):
    that box IS step 0's prediction (recorded in ``ious`` / ``valids`` / ``boxes_norm`` as step 0, reward 0,
    reported by the reset's info with ``step`` 0 and ``start_box`` True, plus ``start_image``: the original image,
    for a policy that re-reads the step-0 prompt); the first observation already shows it as the overlay
    (``step`` 1) and the policy starts refining. Needs ``max_refine_steps >= 1``.

    ## Episode End
    After T + 1 steps (step 0 plus T refinements) the episode terminates (``terminated=True``); it never truncates.
    With ``allow_stop=True`` a step whose text contains ``stop_marker`` ends the episode after that step
    (``terminated=True``; T stays the budget): its box is final, and a stopping step without a parseable box
    keeps the previous valid box (its IoU; ``valid`` True, ``box_carried`` True). Call ``reset`` before stepping
    again.

    ## Keeping a box
    A refinement step whose text has no parseable box and ENDS with ``keep_marker`` (default ``"Keep it."``), as
    the last words of its reasoning or after it (``<think>Box fits. Keep it.</think>``, ``... Keep it.``;
    :func:`ivt_env.boxes.ends_with_keep`), keeps the previous valid box exactly (its IoU; ``valid`` True,
    ``box_carried`` True, ``kept`` True) and the episode goes on. Why: "no change" is the right
    answer for a fitting box, and rewriting four numbers exactly is a skill a small model may lack (the tiny CPU
    model rewrites a kept box a median 14 units off). A text with a box is scored by its box; single-box episodes
    only; ``keep_marker=None`` turns it off (such a text is then invalid).

    ## Info
    ``sample_id, dataset, source`` (the sample's origin, e.g. within ``mix``), ``index, gt_box`` (xyxy pixels),
    ``gt_box_norm``, ``width, height, step`` (index of the step reported, -1 after reset), ``max_steps`` (T),
    ``box`` (pixels or None), ``box_norm``, ``valid``, ``reason`` (why the box is invalid, else None), ``iou``,
    ``ious``, ``valids`` and ``boxes_norm`` (all steps so far; ``None`` for a step without a valid box); after
    ``step`` also ``action_truncated`` (the text was over 16,384 characters and only its tail was read).
    ``steps_used``: refinement steps taken so far (step 0 is not one; T at the end of a fixed-length episode);
    ``stopped`` (the step carried the stop marker; always False without ``allow_stop``), ``allow_stop``,
    ``stop_marker`` and ``keep_marker`` (the env's, so that a policy knows which texts stop an episode and keep a
    box).
    Multi-box episodes add ``multi`` (True), ``gt_boxes`` (every GT box, pixels), ``boxes`` / ``step_boxes_norm``
    (every box of this step in pixels / [0, 1000], ``[]`` when invalid), ``depths`` (the depth written with each
    box, ``None`` where none), ``gt_depths`` (when the dataset gives them), ``depth_ok`` (whether every written depth
    matched the depth map, ``None`` when no depth was written or the sample has no depth map); their
    ``boxes_norm`` entry of a step is its first box (a whole-image box when one of its boxes covers the image).

    ## Several boxes (multi-object grounding)
    On for every sample of a dataset with ``multi_box = True`` (``IVT-SyntheticMulti-v0``), for a sample with
    several GT boxes (``sample.meta["gt_boxes"]``), or always / never with ``multi_box=True/False``. A step then
    answers a list of boxes (:func:`ivt_env.multibox.parse_boxes`: ``[[x1, y1, x2, y2], ...]`` or a JSON list of
    ``{"bbox_2d": [...], "depth": d}``; the last list counts whatever ``answer_box`` says), ``info["iou"]`` is the
    HIoU of the step's boxes with the GT boxes (:func:`ivt_env.boxes.hiou`; equal to the IoU for one box against
    one), the overlay draws every box and ``prev_box`` holds the first one. A reward naming ``depth_oks`` also
    receives ``info["depth_ok"]`` of every step so far (the ``depth`` reward).

    ## Arguments
    - ``dataset``: a name for :func:`ivt_env.datasets.load_dataset` (``synthetic``, ``refcocog``, ``refadv``,
      ``refl4``, ``mix``) or a dataset object with ``name``, ``__len__``, ``__getitem__`` -> ``Sample`` and
      ``sample_ids``.
    - ``split``: dataset split (``train``, ``val``, ``test``; ``refadv`` also ``all``, its 1,142 rows:
      ``ivt_env.datasets.dataset_splits(name)``); ignored for a dataset object.
    - ``max_refine_steps``: T, refinement steps after step 0 (default 2, as in the paper).
    - ``reward_fn``: ``None`` (IVT Eq. 3), a callable, a registered name or ``"pkg.module:attr"``.
    - ``data_root``: where the datasets lie; ``None`` lets the loader use ``$IVT_DATA``.
    - ``render_mode``: ``None`` or ``"rgb_array"`` (``render()`` returns a copy of the current observation image:
      the original at step 0, then the original with the last box drawn).
    - ``dataset_kwargs``: extra keyword arguments for the loader.
    - ``overlay``: an :class:`~ivt_env.rendering.OverlayStyle` or a dict of its fields.
    - ``max_image_size``: ``(max_height, max_width)`` bound of the image space; ``None`` takes the dataset's
      ``max_image_size`` attribute or scans its samples' sizes.
    - ``answer_box``: which box of a step's text counts, ``"last"`` (default) or ``"first"``.
    - ``multi_box``: ``None`` (auto, see "Several boxes"), ``True`` or ``False``.
    - ``allow_stop``: a step may end the episode early with ``stop_marker`` (default False: always T + 1 steps).
    - ``stop_marker``: the text that stops an episode (default ``"<stop>"``).
    - ``step_cost``: reward subtracted per refinement step (default 0; also :class:`ivt_env.wrappers.StepCost`).
    - ``keep_marker``: the text ending a step that keeps the previous box (default ``"Keep it."``; ``None``: off).
    - ``depth_observation``: add the observation key ``depth`` (:class:`ivt_env.depth.DepthSpace`, float32
      ``(H, W)``, larger = farther) from ``sample.meta["load_depth"]``; every sample must have one.

    ## Version History
    - v0: first version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}

    def __init__(
        self,
        dataset: Union[str, GroundingDataset] = "synthetic",
        split: str = "train",
        max_refine_steps: int = 2,
        reward_fn: Union[str, RewardFn, None] = None,
        data_root: Optional[str] = None,
        render_mode: Optional[str] = None,
        dataset_kwargs: Optional[Mapping[str, Any]] = None,
        overlay: Union[OverlayStyle, Mapping[str, Any], None] = None,
        max_image_size: Optional[Sequence[int]] = None,
        answer_box: str = "last",
        multi_box: Optional[bool] = None,
        depth_observation: bool = False,
        allow_stop: bool = False,
        stop_marker: str = "<stop>",
        step_cost: float = 0.0,
        keep_marker: Optional[str] = KEEP_MARKER,
    ):
        if answer_box not in BOX_CHOICES:
            raise ValueError(f"answer_box must be one of {BOX_CHOICES}, got {answer_box!r}")
        self.answer_box = answer_box
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        if not isinstance(max_refine_steps, (int, np.integer)) or max_refine_steps < 0:
            raise ValueError(f"max_refine_steps must be an int >= 0, got {max_refine_steps!r}")
        if not isinstance(stop_marker, str) or not stop_marker.strip():
            raise ValueError(f"stop_marker must be a non-empty string, got {stop_marker!r}")
        if not isinstance(step_cost, (int, float, np.number)) or not np.isfinite(step_cost) or step_cost < 0:
            raise ValueError(f"step_cost must be a finite number >= 0, got {step_cost!r}")
        if keep_marker is not None and (not isinstance(keep_marker, str) or not keep_marker.strip()):
            raise ValueError(f"keep_marker must be None or a non-empty string, got {keep_marker!r}")
        self.allow_stop, self.stop_marker, self.step_cost = bool(allow_stop), stop_marker, float(step_cost)
        self.keep_marker = keep_marker
        self.render_mode = render_mode
        self.max_refine_steps = int(max_refine_steps)
        self.reward_fn = get_reward(reward_fn)
        self._reward_extras = reward_extras(self.reward_fn)  # e.g. {"boxes"}: read once, not per step
        self.overlay_style = OverlayStyle.coerce(overlay)
        self.dataset = resolve_dataset(dataset, split, data_root, dataset_kwargs)
        self.dataset_name = str(getattr(self.dataset, "name", type(self.dataset).__name__))
        if len(self.dataset) == 0:
            raise DatasetError(f"dataset {self.dataset_name!r} (split {split!r}) has no samples")
        max_h, max_w = image_bound(self.dataset, max_image_size)

        T = self.max_refine_steps
        self.observation_space = spaces.Dict(
            {
                "image": ImageSpace(max_h, max_w),
                "expression": FreeText(MAX_EXPRESSION_CHARS),
                "step": spaces.Discrete(T + 2),
                "prev_box": spaces.Box(0.0, float(NORM_MAX), shape=(4,), dtype=np.float32),
                "prev_valid": spaces.Discrete(2),
            }
        )
        self.multi_box = None if multi_box is None else bool(multi_box)
        self.depth_observation = bool(depth_observation)
        if self.depth_observation:
            from ivt_env.depth import DepthSpace

            self.observation_space = spaces.Dict({**self.observation_space.spaces, "depth": DepthSpace(max_h, max_w)})
        self.action_space = FreeText(MAX_ACTION_CHARS)
        self._ids: Optional[dict[str, int]] = None
        self._sample: Optional[Sample] = None
        self._t = -1  # index of the next step; -1 before the first reset
        self._stopped = False  # the running episode ended with the stop marker

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: Optional[int] = None, options: Optional[Mapping[str, Any]] = None):
        super().reset(seed=seed)
        index = self._pick_index(options or {})
        self._sample = None  # a failed reset must not let step() continue the previous episode
        sample = self.dataset[index]
        image = sample.load_image()
        expected = (sample.height, sample.width, 3)
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == expected):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DatasetError(
                f"sample {sample.sample_id!r} of dataset {self.dataset_name!r}: image is {got}, expected uint8 "
                f"({sample.height}, {sample.width}, 3) as its record says"
            )
        if len(sample.expression) > MAX_EXPRESSION_CHARS:
            raise DatasetError(f"sample {sample.sample_id!r}: expression longer than {MAX_EXPRESSION_CHARS} chars")
        self._sample, self._index = sample, index
        self._overlay = Overlay(image, self.overlay_style)  # tints the frame once for the whole episode
        self._gt = tuple(float(v) for v in sample.gt_box)
        self._gt_norm = to_norm(self._gt, sample.width, sample.height)
        self._ious: list[float] = []
        self._valids: list[bool] = []
        self._boxes: list[Optional[tuple]] = []  # [0, 1000] box of each step, None when invalid
        self._reset_multi(sample)
        self._t = 0
        self._stopped = False
        start = (options or {}).get("start_box")
        if start is not None:
            return self._reset_from_box(start, image)
        self._frame = image.copy()  # a new array: the caller may write into observations
        obs = self._observation(None)
        return obs, self._info(-1, None, None, False, None, 0.0)

    def _reset_from_box(self, start: Any, image: np.ndarray):
        """``reset(options={"start_box": ...})``: the box becomes step 0's prediction (see "Starting State")."""
        s = self._sample
        if self._multi:
            raise ValueError("reset option start_box: not supported in multi-box episodes")
        if self.max_refine_steps < 1:
            raise ValueError("reset option start_box needs max_refine_steps >= 1 (the box is step 0)")
        box_px = clip_pixel_box(start, s.width, s.height, "reset option start_box")
        box_norm = to_norm(box_px, s.width, s.height)
        score = iou(box_px, self._gt)
        self._ious.append(score)
        self._valids.append(True)
        self._boxes.append(tuple(box_norm))
        self._depth_oks.append(None)
        self._t = 1
        self._frame = self._overlay.draw(box_px)
        info = self._info(0, box_px, box_norm, True, None, score)
        info.update(start_box=True, start_image=image)
        return self._observation(box_norm), info

    def step(self, action: str):
        if self._sample is None:
            raise RuntimeError("call reset() before step()")
        T = self.max_refine_steps
        if self._t > T or self._stopped:
            raise RuntimeError(f"the episode ended after {self._t} steps: call reset() before step()")
        t = self._t
        sample = self._sample
        truncated = isinstance(action, str) and len(action) > MAX_ACTION_CHARS
        if truncated:  # the action space's own bound; the tail holds the final answer (and the last box)
            action = action[-MAX_ACTION_CHARS:]
        if self._multi:
            parsed, box_norm, box_px, score, boxes_px = self._score_multi(action)
        else:
            parsed = parse_box(action, self.answer_box)
            box_norm = parsed.box
            box_px = to_pixels(box_norm, sample.width, sample.height) if box_norm is not None else None
            score = iou(box_px, self._gt) if box_px is not None else 0.0
        stop = self.allow_stop and isinstance(action, str) and self.stop_marker in action
        keep = t >= 1 and ends_with_keep(action, self.keep_marker)
        carried = (stop or keep) and box_px is None and not self._multi and self._last_valid() is not None
        if carried:  # a stop or a keep without a box: the previous valid box stays (final, for a stop)
            box_norm = self._last_valid()
            box_px = to_pixels(box_norm, sample.width, sample.height)
            score = iou(box_px, self._gt)
        self._stopped = stop
        self._ious.append(score)
        self._valids.append(box_px is not None)
        self._boxes.append(self._step_box(box_norm) if box_px is not None else None)
        self._depth_oks.append(self._extra["depth_ok"])
        last = stop or t == T
        reward = call_reward(self.reward_fn, self._reward_extras, self._ious, self._valids, step=t,
                             max_steps=t if stop else T, boxes=self._boxes, depth_oks=self._depth_oks)
        if t >= 1 and self.step_cost:
            reward -= self.step_cost
        self._t = t + 1
        if self._multi:
            self._frame = self._overlay.draw_many(boxes_px)
        else:
            self._frame = self._overlay.draw(box_px)  # None draws nothing: a plain copy of the original
        obs = self._observation(box_norm)
        info = self._info(t, box_px, box_norm, box_px is not None, None if carried else parsed.reason, score)
        info["action_truncated"] = truncated
        info["stopped"] = stop
        if carried:
            info["box_carried"] = True
            info["kept"] = keep
        return obs, reward, last, False, info

    def render(self) -> Optional[np.ndarray]:
        if self.render_mode != "rgb_array":
            return None
        if self._sample is None:
            raise RuntimeError("call reset() before render()")
        return self._frame.copy()

    # ------------------------------------------------------------------ helpers
    @property
    def current_sample(self) -> Optional[Sample]:
        """The sample of the running episode (``None`` before the first reset)."""
        return self._sample

    def _pick_index(self, options: Mapping[str, Any]) -> int:
        n = len(self.dataset)
        unknown = set(options) - {"index", "sample_id", "start_box"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}: use 'index', 'sample_id' or 'start_box'")
        if "index" in options and "sample_id" in options:
            raise ValueError("reset options: give 'index' or 'sample_id', not both")
        if "index" in options:
            index = options["index"]
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -n <= index < n:
                raise ValueError(f"reset option index={index!r} is not an int in [0, {n}) for {self.dataset_name!r}")
            return int(index) % n
        if "sample_id" in options:
            return self._index_of(str(options["sample_id"]))
        return int(self.np_random.integers(n))

    def _index_of(self, sid: str) -> int:
        index_of = getattr(self.dataset, "index_of", None)
        if index_of is not None:  # the datasets' own lookup (lazy ids, no table)
            try:
                return int(index_of(sid))
            except (KeyError, ValueError):
                pass
        else:
            if self._ids is None:
                self._ids = {str(s): i for i, s in enumerate(self.dataset.sample_ids)}
            if sid in self._ids:
                return self._ids[sid]
        raise ValueError(f"reset option sample_id={sid!r} is not in dataset {self.dataset_name!r}")

    def _reset_multi(self, sample: Sample) -> None:
        """Several GT boxes, multi-box mode and depth of the new episode (see "Several boxes")."""
        gt_boxes = (sample.meta or {}).get("gt_boxes") or [sample.gt_box]
        self._gt_boxes = [tuple(float(v) for v in b) for b in gt_boxes]
        auto = bool(getattr(self.dataset, "multi_box", False)) or len(self._gt_boxes) > 1
        self._multi = auto if self.multi_box is None else self.multi_box
        self._depth_map = None
        load_depth = (sample.meta or {}).get("load_depth")
        if self.depth_observation or (self._multi and load_depth is not None):
            if load_depth is None:
                raise DatasetError(f"sample {sample.sample_id!r} of dataset {self.dataset_name!r} has no depth map "
                                   "(meta['load_depth']) but the env has depth_observation=True")
            self._depth_map = np.asarray(load_depth(), dtype=np.float32)
        self._depth_oks: list[Optional[bool]] = []
        self._step_boxes: list[tuple] = []
        self._extra = {"multi": self._multi, "gt_boxes": list(self._gt_boxes), "boxes": [], "step_boxes_norm": [],
                       "depths": [], "depth_ok": None}
        if (sample.meta or {}).get("gt_depths") is not None:  # synthetic scenes: each GT object's depth
            self._extra["gt_depths"] = list(sample.meta["gt_depths"])

    def _score_multi(self, action: str):
        from ivt_env.depth import check_depths

        s = self._sample
        parsed = parse_boxes(action)
        boxes_norm = [tuple(b) for b in parsed.boxes]
        boxes_px = [to_pixels(b, s.width, s.height) for b in boxes_norm]
        score = hiou(boxes_px, self._gt_boxes) if parsed.valid else 0.0
        depth_ok = check_depths(boxes_px, parsed.depths, self._depth_map) if parsed.valid else None
        self._extra = dict(self._extra, boxes=boxes_px, step_boxes_norm=boxes_norm, depths=list(parsed.depths),
                           depth_ok=depth_ok)
        self._step_boxes = boxes_norm
        first_norm = boxes_norm[0] if boxes_norm else None
        return parsed, first_norm, (boxes_px[0] if boxes_px else None), score, boxes_px

    def _last_valid(self) -> Optional[tuple]:
        """The [0, 1000] box of the last step with a valid box (None if none)."""
        return next((b for b in reversed(self._boxes) if b is not None), None)

    def _step_box(self, box_norm) -> tuple:
        """The step's entry of ``boxes_norm`` (the rewards' ``boxes``): its box; in a multi-box episode its first
        box, or the whole image when one of its boxes covers it (SIFThinker's B_ini then skips the step)."""
        if self._multi:
            whole = (0.0, 0.0, float(NORM_MAX), float(NORM_MAX))
            if any(b[0] <= 0 and b[1] <= 0 and b[2] >= NORM_MAX and b[3] >= NORM_MAX for b in self._step_boxes):
                return whole
        return tuple(box_norm)

    def _observation(self, prev_norm) -> dict[str, Any]:
        obs = {
            "image": self._frame,
            "expression": self._sample.expression,
            "step": self._t,
            "prev_box": np.asarray(prev_norm if prev_norm is not None else (0.0,) * 4, dtype=np.float32),
            "prev_valid": int(prev_norm is not None),
        }
        if self.depth_observation:
            obs["depth"] = self._depth_map.copy()
        return obs

    def _info(self, step, box_px, box_norm, valid, reason, score) -> dict[str, Any]:
        s = self._sample
        return {
            "sample_id": s.sample_id,
            "dataset": self.dataset_name,
            "source": s.source,
            "index": self._index,
            "gt_box": self._gt,
            "gt_box_norm": self._gt_norm,
            "width": s.width,
            "height": s.height,
            "step": step,
            "max_steps": self.max_refine_steps,
            "box": box_px,
            "box_norm": box_norm,
            "valid": valid,
            "reason": reason,
            "iou": score,
            "ious": list(self._ious),
            "valids": list(self._valids),
            "boxes_norm": list(self._boxes),
            "steps_used": max(0, len(self._ious) - 1),
            "allow_stop": self.allow_stop,
            "stop_marker": self.stop_marker,
            "keep_marker": self.keep_marker,
            **(self._extra if self._multi else {}),  # single-box episodes keep exactly the keys above
        }
