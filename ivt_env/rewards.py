"""Reward functions for :class:`ivt_env.env.GroundingRefineEnv`: plain callables with one contract.

Contract (TRL-style: a plain function of what the env measured, no env or model access)::

    reward_fn(ious, valids, *, step, max_steps) -> float

- ``ious``: IoU with the GT box of every step so far, ``ious[i]`` for step ``i`` (``len(ious) == step + 1``);
  a step without a valid box has IoU 0.
- ``valids``: whether each step so far produced a parseable, in-range box (same length).
- ``step``: index of the step just taken, 0..T. ``max_steps``: T (refinement steps); the episode's last step is
  ``step == max_steps``.
- Returns this step's reward. The episode return is the sum over steps; rewards that pay once pay at the last step.

Optional inputs, passed only to a reward that names them as a keyword parameter (detected once with
:func:`reward_extras` when the env or wrapper resolves the reward, so rewards written against the signature above
keep working unchanged)::

    reward_fn(ious, valids, *, step, max_steps, boxes) -> float

- ``boxes``: the box of every step so far (same length as ``ious``) as ``(x1, y1, x2, y2)`` in the [0, 1000]
  normalised frame (the whole image is ``(0, 0, 1000, 1000)``), ``None`` for a step without a valid box.
- ``depth_oks``: per step, whether every (box, depth) pair the step wrote matched the depth map (SIFThinker's
  check, :func:`ivt_env.depth.check_depths`), ``None`` for a step that wrote no depth (the ``depth`` reward).

Names for :func:`get_reward`: ``ivt`` (default, IVT Eq. 3), ``dense`` (per-step IoU improvement), ``iou`` (VLM-R1
pure IoU), ``sifthinker`` (correction-enhanced), ``shaped`` (six-component shaping), ``hiou`` (Eq. 3 on HIoU, the
default of ``IVT-SyntheticMulti-v0``), ``depth`` (SIFThinker's r_depth), ``hiou_depth`` (their sum). In a
multi-box episode the env's ``ious`` are HIoUs, so every reward scores several boxes with HIoU there. Any
``"pkg.module:attr"`` import path also works (a class there is instantiated with no arguments).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Union

from ivt_env.boxes import NORM_MAX
from ivt_env.registries import Registry

RewardFn = Callable[..., float]


def _check(ious: Sequence[float], valids: Sequence[bool], step: int, max_steps: int) -> None:
    if len(ious) != step + 1 or len(valids) != step + 1 or not 0 <= step <= max_steps:
        raise ValueError(
            f"reward contract: need len(ious) == len(valids) == step + 1 and 0 <= step <= max_steps, got "
            f"{len(ious)} ious, {len(valids)} valids, step={step}, max_steps={max_steps}"
        )


def ivt_reward(ious: Sequence[float], valids: Sequence[bool], *, step: int, max_steps: int) -> float:
    """IVT Eq. 3: 0 before the last step; then ``IoU(b_T, GT) + 0.1 * (valid steps / (T + 1))``."""
    _check(ious, valids, step, max_steps)
    if step < max_steps:
        return 0.0
    return float(ious[-1]) + 0.1 * sum(bool(v) for v in valids) / (max_steps + 1)


def dense_iou_improvement(ious: Sequence[float], valids: Sequence[bool], *, step: int, max_steps: int) -> float:
    """Per-step IoU gain ``IoU_t - IoU_{t-1}`` (``IoU_{-1} = 0``): potential-based shaping with potential IoU.

    The episode return telescopes to the final IoU, the same optimum as a final-IoU reward (Ng et al. 1999).
    """
    _check(ious, valids, step, max_steps)
    return float(ious[-1]) - (float(ious[-2]) if step > 0 else 0.0)


def vlm_r1_iou(ious: Sequence[float], valids: Sequence[bool], *, step: int, max_steps: int) -> float:
    """VLM-R1's pure IoU reward: ``IoU(b_T, GT)`` at the last step, 0 before."""
    _check(ious, valids, step, max_steps)
    return float(ious[-1]) if step == max_steps else 0.0


def covers_whole_image(box_norm: Optional[Sequence[float]]) -> bool:
    """True when a [0, 1000] normalised box spans the whole image."""
    if box_norm is None:
        return False
    x1, y1, x2, y2 = box_norm
    return x1 <= 0 and y1 <= 0 and x2 >= NORM_MAX and y2 >= NORM_MAX


def sifthinker_reward(ious: Sequence[float], valids: Sequence[bool], *, step: int, max_steps: int,
                      boxes: Optional[Sequence[Optional[Sequence[float]]]] = None) -> float:
    """SIFThinker's correction-enhanced box reward ``r_bbox = s_end + (s_end - s_init)`` with ``s`` = IoU, paid at
    the last step (Chen et al. 2025, SIFThinker, "correction-enhanced grounding reward"; SIFThinker scores boxes with
    its hierarchical IoU, one GT box here makes it the IoU).

    ``s_end`` is the final box's IoU; ``s_init`` the IoU of the FIRST box of the trajectory that does not cover the
    whole image (SIFThinker's B_ini): a step without a valid box or with a whole-image box is skipped. When no box
    qualifies before the end, ``s_init = s_end`` (no correction to pay for). Without ``boxes`` (a caller of the old
    signature) only invalid steps can be skipped. The reward is in [-1, 2].
    """
    _check(ious, valids, step, max_steps)
    if boxes is not None and len(boxes) != len(ious):
        raise ValueError(f"reward contract: {len(boxes)} boxes for {len(ious)} steps")
    if step < max_steps:
        return 0.0
    s_end = float(ious[-1])
    s_init = next((float(ious[i]) for i in range(len(ious))
                   if valids[i] and not (boxes is not None and (boxes[i] is None or covers_whole_image(boxes[i])))),
                  s_end)
    return s_end + (s_end - s_init)


@dataclass(frozen=True)
class ShapedReward:
    """The six-component shaped reward the IVT paper tried first (Sec. 3.4) and replaced by Eq. 3.

    Kept as an example of shaping; the paper found it made GRPO unstable (components cancel, group baselines move).
    Per step ``t`` with ``d = IoU_t - IoU_{t-1}`` (refinement steps only, ``t >= 1``):

    - improvement: ``+w_improve * max(d, 0)``
    - regression penalty: ``-w_regress * max(-d, 0)`` (losing IoU costs as much as gaining it pays by default)
    - stagnation penalty: ``-w_stagnate`` when ``|d| < stagnation_eps`` and ``IoU_t < good_iou`` (copying a box
      that is already good is not punished); ``stagnation_eps = 0.01`` is the paper's Table 2 threshold
    - format: ``+w_format`` for a valid box, ``-w_format`` otherwise (every step, step 0 included)

    At the last step only:

    - convergence: ``+w_converge * IoU_T``
    - efficiency: ``+w_efficiency * (T + 1 - k) / (T + 1)`` where ``k`` is the first step with
      ``IoU >= efficiency_iou`` (0 if none): reaching a good box early pays more.

    Weights: improvement, regression and convergence at 1 make IoU the main currency; format, stagnation and
    efficiency at 0.05-0.1 match the size of Eq. 3's format bonus, so they break ties without dominating.
    """

    w_improve: float = 1.0
    w_regress: float = 1.0
    w_stagnate: float = 0.05
    w_format: float = 0.05
    w_converge: float = 1.0
    w_efficiency: float = 0.1
    stagnation_eps: float = 0.01
    good_iou: float = 0.9
    efficiency_iou: float = 0.5

    def components(
        self, ious: Sequence[float], valids: Sequence[bool], *, step: int, max_steps: int
    ) -> dict[str, float]:
        """Each component's contribution to this step's reward (they sum to ``__call__``)."""
        _check(ious, valids, step, max_steps)
        c = dict(improvement=0.0, regression=0.0, stagnation=0.0, format=0.0, convergence=0.0, efficiency=0.0)
        c["format"] = self.w_format if valids[-1] else -self.w_format
        if step > 0:
            d = float(ious[-1]) - float(ious[-2])
            c["improvement"] = self.w_improve * max(d, 0.0)
            c["regression"] = -self.w_regress * max(-d, 0.0)
            if abs(d) < self.stagnation_eps and float(ious[-1]) < self.good_iou:
                c["stagnation"] = -self.w_stagnate
        if step == max_steps:
            c["convergence"] = self.w_converge * float(ious[-1])
            first = next((i for i, v in enumerate(ious) if float(v) >= self.efficiency_iou), None)
            if first is not None:
                c["efficiency"] = self.w_efficiency * (max_steps + 1 - first) / (max_steps + 1)
        return c

    def __call__(self, ious: Sequence[float], valids: Sequence[bool], *, step: int, max_steps: int) -> float:
        return float(sum(self.components(ious, valids, step=step, max_steps=max_steps).values()))

    def to_dict(self) -> dict:
        return asdict(self)


REWARDS: Registry[RewardFn] = Registry("reward")
REWARDS.register("ivt", ivt_reward)
REWARDS.register("dense", dense_iou_improvement)
REWARDS.register("iou", vlm_r1_iou)
REWARDS.register("sifthinker", sifthinker_reward)
REWARDS.register("shaped", ShapedReward())


REWARD_EXTRAS = ("boxes", "depth_oks")  # optional reward inputs, passed to a reward that names them


def reward_extras(fn: RewardFn) -> frozenset:
    """The optional inputs (:data:`REWARD_EXTRAS`) that ``fn`` names as keyword parameters; call once per reward."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: the documented contract only
        return frozenset()
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return frozenset(n for n in REWARD_EXTRAS if n in params and params[n].kind in kinds)


def call_reward(fn: RewardFn, extras: frozenset, ious: Sequence[float], valids: Sequence[bool], *, step: int,
                max_steps: int, boxes: Optional[Sequence] = None, depth_oks: Optional[Sequence] = None) -> float:
    """``fn``'s reward with the documented arguments plus the extras it asked for (``extras = reward_extras(fn)``)."""
    kw = {"boxes": list(boxes) if boxes is not None else None} if "boxes" in extras else {}
    if "depth_oks" in extras:
        kw["depth_oks"] = list(depth_oks) if depth_oks is not None else None
    return float(fn(list(ious), list(valids), step=step, max_steps=max_steps, **kw))


def register_reward(name: str, fn: Optional[RewardFn] = None):
    """Add a named reward (e.g. from a plug-in module) so envs can take ``reward_fn=name``; also a decorator:
    ``@register_reward("mine")``."""
    return REWARDS.register(name, fn)


def get_reward(spec: Union[str, RewardFn, None] = None) -> RewardFn:
    """A reward callable from ``None`` (IVT Eq. 3), a callable, a registered name or ``"pkg.module:attr"`` (a class
    there is instantiated with no arguments)."""
    if spec is None:
        return ivt_reward
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"reward_fn must be None, a callable, a name or 'pkg.module:attr', got {type(spec).__name__}")
    obj = REWARDS.get(spec)
    return obj() if isinstance(obj, type) else obj


def reward_name(fn: Optional[RewardFn]) -> str:
    """A readable name for logs: the registry name when there is one, else ``module:qualname``."""
    name = REWARDS.name_of(fn) if fn is not None else None
    if name is not None:
        return name
    if fn is None:
        return "ivt"
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{mod}:{qual}" if mod else qual


# ------------------------------------------------------------------------------ several boxes and depth (SIFThinker)
def hiou_reward(ious: Sequence[float], valids: Sequence[bool], *, step: int, max_steps: int) -> float:
    """The default of ``IVT-SyntheticMulti-v0``: IVT Eq. 3 on HIoU, ``HIoU(final boxes, GT boxes) + 0.1 * (valid
    steps / (T + 1))`` at the last step, 0 before. In a multi-box episode the env's ``ious`` ARE the step HIoUs
    (``ivt_env.boxes.hiou``); ``sifthinker`` there is SIFThinker's correction-enhanced box reward on HIoU,
    ``s_end + (s_end - s_init)``."""
    return ivt_reward(ious, valids, step=step, max_steps=max_steps)


class DepthReward:
    """SIFThinker's depth-consistency reward r_depth, at the last step: 1 when the trajectory wrote at least one
    (box, depth) pair and every written pair has ``|d - d_gt| / d_gt <= 0.1`` (``d_gt`` from the depth map inside
    the box, :func:`ivt_env.depth.depth_in_box`), else 0 (also when no depth was written: nothing earns it).

    Needs the env's per-step depth checks: naming ``depth_oks`` makes the env pass them (``info["depth_ok"]`` per
    step: True / False, ``None`` for a step without depth; see :func:`reward_extras`)."""

    def __call__(self, ious: Sequence[float], valids: Sequence[bool], *, step: int, max_steps: int,
                 depth_oks: Optional[Sequence[Optional[bool]]] = None) -> float:
        _check(ious, valids, step, max_steps)
        if step < max_steps:
            return 0.0
        written = [ok for ok in (depth_oks or []) if ok is not None]
        return 1.0 if written and all(written) else 0.0


class HIoUDepthReward(DepthReward):
    """``hiou`` + ``depth`` (SIFThinker sums its reward components): both paid at the last step."""

    def __call__(self, ious, valids, *, step: int, max_steps: int, depth_oks=None) -> float:
        return hiou_reward(ious, valids, step=step, max_steps=max_steps) + super().__call__(
            ious, valids, step=step, max_steps=max_steps, depth_oks=depth_oks)


REWARDS.register("hiou", hiou_reward)
REWARDS.register("depth", DepthReward())
REWARDS.register("hiou_depth", HIoUDepthReward())
