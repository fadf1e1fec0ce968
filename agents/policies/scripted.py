"""Scripted policies: no model, useful as baselines, as teachers and in tests.

All of them write the IVT answer form ``<think>...</think> [x1, y1, x2, y2]`` (ints in [0, 1000]) that
:func:`ivt_env.boxes.parse_box` reads. They are stateless across calls: whatever a trajectory needs later (its
step-0 box, the teacher's plan) travels in its ``histories[i]`` (``PolicyOutput.extra``), so any batching of
trajectories gives the same texts.

Randomness is per trajectory: a ``random.Random`` seeded by ``(policy seed, dataset, sample id, group member,
step)``, with the group member read from ``infos[i]["group_member"]`` (the collector adds it; 0 when absent). The
texts therefore do not depend on the batch size or on single vs vector envs, and the N members of a group differ.

The oracle and the teacher read the GT (``infos[i]["gt_box_norm"]``): they cheat by design.

Multi-box episodes (``infos[i]["multi"]``, e.g. ``IVT-SyntheticMulti-v0``): the oracle answers every GT box, the
random policy one to three random boxes, copy repeats its step-0 list, the teacher interpolates each box
(:mod:`agents.teacher.multi`); texts are ``<think>...</think> [[x1, y1, x2, y2], ...]``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from rollouts.policy import Policy, PolicyOutput, SamplingParams
from ivt_env.boxes import NORM_MAX, iou, parse_box
from agents.teacher.geometric import (
    FIT_IOU,
    format_step,
    geometric_reasoning,
    interpolate_boxes,
    region_name,
    stop_reasoning,
)

Box = Sequence[float]
PolicySpec = Union[Policy, str, None]


def valid_int_box(box: Box, min_side: int = 1) -> list[int]:
    """Round to ints in [0, 1000] and repair the order / a zero size, so the result always parses as valid."""
    v = [int(min(NORM_MAX, max(0, math.floor(float(c) + 0.5)))) for c in box]
    x1, x2 = sorted((v[0], v[2]))
    y1, y2 = sorted((v[1], v[3]))
    if x2 - x1 < min_side:
        x1, x2 = (x1, x1 + min_side) if x1 + min_side <= NORM_MAX else (NORM_MAX - min_side, NORM_MAX)
    if y2 - y1 < min_side:
        y1, y2 = (y1, y1 + min_side) if y1 + min_side <= NORM_MAX else (NORM_MAX - min_side, NORM_MAX)
    return [x1, y1, x2, y2]


def _gt_norm(info: Mapping[str, Any], who: str) -> list[float]:
    try:
        gt = info["gt_box_norm"]
    except KeyError:
        raise KeyError(
            f"{who} needs infos[i]['gt_box_norm'] (the env's GT box in [0, 1000]); info has {sorted(info)}"
        ) from None
    return [float(v) for v in gt]


def _step_of(obs: Mapping[str, Any]) -> int:
    return int(obs["step"])


def _gt_boxes_norm(info: Mapping[str, Any]) -> Optional[list[list[int]]]:
    from agents.teacher.multi import info_gt_boxes_norm

    return info_gt_boxes_norm(info)


class ScriptedPolicy(Policy):
    """Shared seeding: one ``random.Random`` per (trajectory, step), independent of batching."""

    def __init__(self, seed: Optional[int] = 0):
        self._seed = seed if seed is not None else random.SystemRandom().randrange(2**31)

    def seed(self, seed: Optional[int]) -> None:
        self._seed = seed if seed is not None else random.SystemRandom().randrange(2**31)

    def rng(self, info: Mapping[str, Any], step: int, salt: str = "") -> random.Random:
        key = (self._seed, self.name, salt, info.get("dataset"), info.get("sample_id"), info.get("group_member", 0),
               step)
        return random.Random(repr(key))  # str seeds hash with SHA-512: stable across runs and platforms


def _resolve(spec: PolicySpec, kwargs: Optional[dict], default: Policy) -> Policy:
    if spec is None:
        return default
    if isinstance(spec, Policy):
        return spec
    from agents.policies import make_policy  # lazy: the registry imports this module

    return make_policy(spec, **(kwargs or {}))


def _first_step(inner: Policy, observations, histories, infos, sampling, idx: list[int]) -> dict[int, PolicyOutput]:
    """Run ``inner`` on the step-0 subset ``idx`` of the batch (one batched call)."""
    if not idx:
        return {}
    outs = inner.act([observations[i] for i in idx], [histories[i] for i in idx], [infos[i] for i in idx], sampling)
    return dict(zip(idx, outs))


class OraclePolicy(ScriptedPolicy):
    """The GT box, optionally with Gaussian noise of std ``noise`` (in [0, 1000] units) on each coordinate.

    ``resample=True`` draws fresh noise at every step; ``False`` keeps the step-0 box for the whole trajectory.
    Without noise, every step answers the GT (Acc@0.5 = 1, 100% stagnation).
    """

    name = "oracle"

    def __init__(self, noise: float = 0.0, resample: bool = True, depth: bool = False,
                 max_boxes: Optional[int] = None, seed: Optional[int] = 0):
        super().__init__(seed)
        if noise < 0:
            raise ValueError(f"OraclePolicy: noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self.resample = bool(resample)
        self.depth = bool(depth)  # multi-box episodes: write each box's GT depth (info["gt_depths"]) with it
        self.max_boxes = max_boxes  # multi-box episodes: answer only the first N GT boxes (1: the single-box baseline)

    def box(self, info: Mapping[str, Any], step: int) -> list[int]:
        gt = _gt_norm(info, "OraclePolicy")
        if self.noise == 0.0:
            return valid_int_box(gt)
        rng = self.rng(info, step if self.resample else 0)
        return valid_int_box([c + rng.gauss(0.0, self.noise) for c in gt])

    def boxes(self, info: Mapping[str, Any], step: int) -> list[list[int]]:
        """Every GT box of a multi-box episode, with the same noise rule as :meth:`box`."""
        gts = _gt_boxes_norm(info) or [_gt_norm(info, "OraclePolicy")]
        gts = gts[: self.max_boxes] if self.max_boxes else gts
        if self.noise == 0.0:
            return [valid_int_box(g) for g in gts]
        rng = self.rng(info, step if self.resample else 0)
        return [valid_int_box([c + rng.gauss(0.0, self.noise) for c in g]) for g in gts]

    def act(self, observations, histories, infos, sampling: SamplingParams) -> list[PolicyOutput]:
        from agents.teacher.multi import format_multi_step, multi_reasoning

        out = []
        for obs, info in zip(observations, infos):
            if info.get("multi"):
                boxes = self.boxes(info, _step_of(obs))
                text = format_multi_step(multi_reasoning(None, boxes, boxes, 0), boxes)
                if self.depth and info.get("gt_depths"):
                    from ivt_env.multibox import format_boxes

                    text = text.split("</think>")[0] + "</think> " + format_boxes(boxes, info["gt_depths"])
                out.append(PolicyOutput(text=text))
                continue
            box = self.box(info, _step_of(obs))
            out.append(PolicyOutput(text=format_step(f"Target at {region_name(box)}.", box)))
        return out


class RandomPolicy(ScriptedPolicy):
    """A uniformly random box every step (sides at least ``min_side``); with probability ``invalid_rate`` a text
    without any box instead (to exercise the format metric)."""

    name = "random"

    def __init__(self, min_side: int = 10, invalid_rate: float = 0.0, seed: Optional[int] = 0):
        super().__init__(seed)
        if not 1 <= min_side <= NORM_MAX:
            raise ValueError(f"RandomPolicy: min_side must be in [1, {NORM_MAX}], got {min_side}")
        if not 0.0 <= invalid_rate <= 1.0:
            raise ValueError(f"RandomPolicy: invalid_rate must be in [0, 1], got {invalid_rate}")
        self.min_side, self.invalid_rate = int(min_side), float(invalid_rate)

    def act(self, observations, histories, infos, sampling: SamplingParams) -> list[PolicyOutput]:
        out = []
        for obs, info in zip(observations, infos):
            rng = self.rng(info, _step_of(obs))
            if rng.random() < self.invalid_rate:
                out.append(PolicyOutput(text="<think>I cannot tell where it is.</think> no box"))
                continue
            if info.get("multi"):  # one to three random boxes
                from agents.teacher.multi import format_multi_step

                out.append(PolicyOutput(text=format_multi_step("A guess.", [self._box(rng)
                                                                            for _ in range(rng.randint(1, 3))])))
                continue
            w = rng.randint(self.min_side, NORM_MAX)
            h = rng.randint(self.min_side, NORM_MAX)
            x1, y1 = rng.randint(0, NORM_MAX - w), rng.randint(0, NORM_MAX - h)
            out.append(PolicyOutput(text=format_step("A guess.", [x1, y1, x1 + w, y1 + h])))
        return out

    def _box(self, rng: random.Random) -> list[int]:
        w = rng.randint(self.min_side, NORM_MAX)
        h = rng.randint(self.min_side, NORM_MAX)
        x1, y1 = rng.randint(0, NORM_MAX - w), rng.randint(0, NORM_MAX - h)
        return [x1, y1, x1 + w, y1 + h]


class CopyPolicy(ScriptedPolicy):
    """Repeats its step-0 answer at every refinement step (the paper's "degenerate stagnation" baseline).

    Step 0 comes from ``first``: a :class:`Policy`, a registry name or import path (built with ``first_kwargs``),
    or by default a noisy oracle (``OraclePolicy(noise=first_noise)``, so step 0 is imperfect). Steps t >= 1
    answer the step-0 box again (``<think>...</think> [same box]``), or the step-0 text verbatim when it had no
    valid box, so every step's IoU equals step 0's (100% stagnation).
    """

    name = "copy"

    def __init__(self, first: PolicySpec = None, first_kwargs: Optional[dict] = None, first_noise: float = 30.0,
                 seed: Optional[int] = 0):
        super().__init__(seed)
        self.first = _resolve(first, first_kwargs, OraclePolicy(noise=first_noise, seed=seed))

    def seed(self, seed: Optional[int]) -> None:
        super().seed(seed)
        self.first.seed(seed)

    def act(self, observations, histories, infos, sampling: SamplingParams) -> list[PolicyOutput]:
        starts = _first_step(self.first, observations, histories, infos, sampling,
                             [i for i, o in enumerate(observations) if _step_of(o) == 0])
        out = []
        for i, obs in enumerate(observations):
            if i in starts:
                out.append(starts[i])
                continue
            if not histories[i]:
                raise ValueError(f"CopyPolicy: step {_step_of(obs)} of sample {infos[i].get('sample_id')} has no "
                                 "step-0 history to copy (histories[i] is empty)")
            first_text = histories[i][0].text
            if infos[i].get("multi"):
                from agents.teacher.multi import format_multi_step
                from ivt_env.multibox import parse_boxes

                many = parse_boxes(first_text)
                out.append(PolicyOutput(text=format_multi_step("Keep the boxes.", many.boxes) if many.valid
                                        else first_text))
                continue
            parsed = parse_box(first_text)
            text = format_step("Keep the box.", parsed.box) if parsed.valid else first_text
            out.append(PolicyOutput(text=text))
        return out


class InterpolatingTeacher(ScriptedPolicy):
    """Moves from a start box to the GT by linear interpolation over T steps (IVT Sec. 3.2), with reasoning.

    Step texts are ``<think>{agents.teacher.geometric.geometric_reasoning(...)}</think> [box_t]`` for the boxes of
    ``agents.teacher.geometric.interpolate_boxes(start, gt, T)``: box 0 is the start, box T the GT.

    The start box is, in order of precedence: ``start_boxes[sample_id]`` (a mapping of given normalised boxes),
    the step-0 box of ``start_policy`` (a policy, name or import path, e.g. a student model), or by default the GT
    perturbed by a random shift (up to ``max_shift`` of each side) and per-side scale (up to ``max_scale``),
    redrawn until its IoU with the GT is at most ``max_start_iou`` (default 0.85, the paper's SFT filter: there is
    always room to improve). T is ``steps`` or else ``infos[i]["max_steps"]`` (the collector adds it).

    Adaptive refinement: in an env that allows stopping (``info["allow_stop"]``) the first step whose box fits the
    GT (IoU >= ``stop_iou``, the geometric teacher's FIT_IOU by default) says why and writes ``stop_marker`` before
    its box (``"<think>... Now it fits.</think> <stop> [x1, y1, x2, y2]"``), which ends the episode. An episode that
    starts from a given box (reset option ``start_box``) interpolates from that box.
    """

    name = "teacher"

    def __init__(
        self,
        steps: Optional[int] = None,
        start_boxes: Optional[Mapping[str, Box]] = None,
        start_policy: PolicySpec = None,
        start_policy_kwargs: Optional[dict] = None,
        max_shift: float = 0.5,
        max_scale: float = 0.5,
        max_start_iou: float = 0.85,
        verbosity: int = 0,
        seed: Optional[int] = 0,
        stop_iou: float = FIT_IOU,
        stop_marker: str = "<stop>",
    ):
        super().__init__(seed)
        self.stop_iou, self.stop_marker = float(stop_iou), str(stop_marker)
        if not 0.0 < max_start_iou <= 1.0:
            raise ValueError(f"InterpolatingTeacher: max_start_iou must be in (0, 1], got {max_start_iou}")
        self.steps, self.verbosity = steps, verbosity
        self.start_boxes = {str(k): valid_int_box(v) for k, v in (start_boxes or {}).items()}
        self.start_policy = None if start_policy is None else _resolve(start_policy, start_policy_kwargs, None)
        self.max_shift, self.max_scale, self.max_start_iou = float(max_shift), float(max_scale), float(max_start_iou)

    def seed(self, seed: Optional[int]) -> None:
        super().seed(seed)
        if self.start_policy is not None:
            self.start_policy.seed(seed)

    def perturbed_start(self, gt: list[float], rng: random.Random) -> list[int]:
        w, h = gt[2] - gt[0], gt[3] - gt[1]
        for _ in range(100):
            cx = (gt[0] + gt[2]) / 2 + rng.uniform(-self.max_shift, self.max_shift) * w
            cy = (gt[1] + gt[3]) / 2 + rng.uniform(-self.max_shift, self.max_shift) * h
            sw = w * rng.uniform(1 - self.max_scale, 1 + self.max_scale) / 2
            sh = h * rng.uniform(1 - self.max_scale, 1 + self.max_scale) / 2
            box = valid_int_box([cx - sw, cy - sh, cx + sw, cy + sh])
            if iou(box, gt) <= self.max_start_iou:
                return box
        # Tiny or border boxes where random draws keep overlapping too much: shift by one full side.
        dx = w if gt[2] + w <= NORM_MAX else -w
        return valid_int_box([gt[0] + dx, gt[1], gt[2] + dx, gt[3]])

    def _horizon(self, info: Mapping[str, Any]) -> int:
        T = self.steps if self.steps is not None else info.get("max_steps")
        if T is None:
            raise ValueError("InterpolatingTeacher: the number of refinement steps is unknown; pass steps=T or let "
                             "the collector add infos[i]['max_steps']")
        return int(T)

    def act(self, observations, histories, infos, sampling: SamplingParams) -> list[PolicyOutput]:
        first_idx = [i for i, o in enumerate(observations) if _step_of(o) == 0]
        need_policy = [i for i in first_idx if str(infos[i].get("sample_id")) not in self.start_boxes]
        starts = (_first_step(self.start_policy, observations, histories, infos, sampling, need_policy)
                  if self.start_policy is not None else {})
        out = []
        for i, (obs, info) in enumerate(zip(observations, infos)):
            t = _step_of(obs)
            gt = _gt_norm(info, "InterpolatingTeacher")
            rng = self.rng(info, t)
            if info.get("multi"):
                out.append(self._act_multi(t, info, histories[i], rng))
                continue
            if t == 0:
                sid = str(info.get("sample_id"))
                if sid in self.start_boxes:
                    start = self.start_boxes[sid]
                elif i in starts:
                    parsed = parse_box(starts[i].text)
                    start = valid_int_box(parsed.box) if parsed.valid else self.perturbed_start(gt, rng)
                else:
                    start = self.perturbed_start(gt, rng)
                plan = interpolate_boxes(start, valid_int_box(gt), self._horizon(info))
                prev = None
            elif histories[i] and (histories[i][0].extra or {}).get("start_box"):  # from a given box (reset option)
                given = parse_box(histories[i][0].text)
                plan = interpolate_boxes(valid_int_box(given.box), valid_int_box(gt), self._horizon(info))
                prev = plan[t - 1]
            else:
                if not histories[i] or "plan" not in histories[i][0].extra:
                    raise ValueError(f"InterpolatingTeacher: step {t} of sample {info.get('sample_id')} has no plan in "
                                     "its step-0 history (was step 0 produced by this teacher?)")
                plan = histories[i][0].extra["plan"]
                prev = plan[t - 1]
            box = plan[min(t, len(plan) - 1)]
            reasoning = geometric_reasoning(prev, box, gt, t, str(obs.get("expression", "")), rng, self.verbosity)
            stop = bool(info.get("allow_stop")) and iou(box, gt) >= self.stop_iou
            if stop:
                reasoning = stop_reasoning(reasoning, t)
            out.append(PolicyOutput(text=format_step(reasoning, box, self.stop_marker if stop else None),
                                    extra={"plan": plan} if t == 0 else {}))
        return out


    def _act_multi(self, t: int, info: Mapping[str, Any], history, rng: random.Random) -> PolicyOutput:
        """A multi-box episode: each GT box perturbed at step 0, then interpolated (agents.teacher.multi)."""
        from agents.teacher.multi import planned_multi_step

        text, plan = planned_multi_step(t, _gt_boxes_norm(info), history, lambda g: self.perturbed_start(g, rng),
                                        self._horizon(info), info.get("sample_id"))
        return PolicyOutput(text=text, extra={"plan": plan} if t == 0 else {})


class ReplayPolicy(ScriptedPolicy):
    """Plays step texts recorded in a JSONL file, keyed by sample id (scores any external model's outputs).

    One record per line, either ``{"sample_id": ..., "steps": ["text 0", "text 1", ...]}`` (optional
    ``"dataset"`` to disambiguate ids across the datasets of a mix) or a stored trajectory
    (:meth:`Trajectory.to_dict`, whose steps are objects with a ``"text"``). Several records of one sample form a
    group: group member j plays record ``j mod k``. Errors name the file and line (bad records) or the sample id
    (missing ids, too few steps).
    """

    name = "replay"

    def __init__(self, path: str, seed: Optional[int] = 0):
        super().__init__(seed)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ReplayPolicy: no such file: {self.path}")
        self.records: dict[tuple[Optional[str], str], list[tuple[int, list[str]]]] = {}
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    self._add(line, lineno)
        if not self.records:
            raise ValueError(f"ReplayPolicy: {self.path} holds no records")
        self.by_id: dict[str, list[tuple[int, list[str]]]] = {}  # any dataset: the fallback when names differ
        for (_, sid), recs in self.records.items():
            self.by_id.setdefault(sid, []).extend(recs)

    def _add(self, line: str, lineno: int) -> None:
        where = f"{self.path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"ReplayPolicy: {where}: invalid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or "sample_id" not in rec or "steps" not in rec:
            raise ValueError(f"ReplayPolicy: {where}: expected an object with 'sample_id' and 'steps'")
        steps = rec["steps"]
        if not isinstance(steps, list) or not steps:
            raise ValueError(f"ReplayPolicy: {where}: 'steps' must be a non-empty list")
        texts = []
        for j, s in enumerate(steps):
            text = s.get("text") if isinstance(s, dict) else s
            if not isinstance(text, str):
                raise ValueError(f"ReplayPolicy: {where}: step {j} must be a string or an object with a string 'text'")
            texts.append(text)
        key = (None if rec.get("dataset") is None else str(rec["dataset"]), str(rec["sample_id"]))
        self.records.setdefault(key, []).append((lineno, texts))

    def lookup(self, info: Mapping[str, Any]) -> tuple[int, list[str]]:
        sid = str(info.get("sample_id"))
        recs = self.records.get((str(info.get("dataset")), sid)) or self.records.get((None, sid)) or self.by_id.get(sid)
        if not recs:
            raise KeyError(f"ReplayPolicy: {self.path} has no record for sample id {sid!r} "
                           f"(dataset {info.get('dataset')!r}; the file holds {len(self.records)} ids)")
        return recs[int(info.get("group_member", 0)) % len(recs)]

    def act(self, observations, histories, infos, sampling: SamplingParams) -> list[PolicyOutput]:
        out = []
        for obs, info in zip(observations, infos):
            t = _step_of(obs)
            lineno, texts = self.lookup(info)
            if t >= len(texts):
                raise ValueError(f"ReplayPolicy: {self.path}:{lineno}: the record of sample {info.get('sample_id')!r} "
                                 f"has {len(texts)} step texts, step {t} was requested")
            out.append(PolicyOutput(text=texts[t], extra={"replay_line": lineno}))
        return out
