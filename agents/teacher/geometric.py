"""The offline geometric teacher: box trajectories and the reasoning text of each step (IVT Sec. 3.2).

IVT builds each SFT trajectory by linear interpolation from the student's step-0 box to the GT box over T steps and
asks a teacher for step-specific reasoning under a *forward-reasoning* framing:

- step 0 sees the original image (no overlay) and says why that region was selected;
- step t >= 1 sees the overlay of box t-1 (exactly what the student sees at inference), examines the red box, names
  what is wrong (shifted which way, too large or small, wrong object) or that it looks right, and the correction.

The geometric teacher writes those sentences from the boxes alone and needs no model. Its vocabulary is kept small
and its texts short on purpose: the CPU default clones a tiny model from scratch on them, and every extra token
costs training time. ``verbosity`` picks the length:

- ``0``: terse phrases (``"Too far left, too small. Move right, grow."``), the CPU default;
- ``1``: two short sentences (``"The red box is too far left and too small. Move it right and make it larger."``);
- ``2``: like 1, with the expression named (the paper's 2-3 sentences).

All boxes here are normalised ``[x1, y1, x2, y2]`` in [0, 1000] (text convention, DESIGN.md).
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

from ivt_env.boxes import NORM_MAX, format_box, iou

Box = Sequence[float]

# Geometry thresholds of the diagnosis (fractions of the GT box size unless stated).
SHIFT_TOL = 0.15  # centre offset beyond this fraction of the GT side (and >= SHIFT_MIN units) counts as shifted
SHIFT_MIN = 10.0  # [0, 1000] units: never call a 1% offset a shift
SIZE_TOL = 1.2  # side ratio beyond this (either way) counts as too large / too small
FIT_IOU = 0.85  # a red box with at least this IoU "fits" (IVT's filter also treats > 0.85 as near-perfect)
WRONG_IOU = 0.05  # below this IoU and ...
WRONG_DIST = 1.0  # ... a centre distance beyond this many GT sides, the red box is on the wrong object


def _round_half_up(v: float) -> int:
    # floor(v + 0.5), not Python's round(): banker's rounding maps 1.5 and 2.5 both to 2, which could collapse a
    # 1-unit-wide interpolated box to zero width.
    return int(math.floor(v + 0.5))


def _check_box(box: Box, what: str) -> None:
    if box is None or len(box) != 4:
        raise ValueError(f"{what}: expected [x1, y1, x2, y2], got {box!r}")
    if any(not math.isfinite(float(v)) for v in box):
        raise ValueError(f"{what}: non-finite coordinate in {list(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= NORM_MAX and 0 <= y1 < y2 <= NORM_MAX):
        raise ValueError(f"{what}: not a box with 0 <= x1 < x2 <= {NORM_MAX} and 0 <= y1 < y2 <= {NORM_MAX}: {list(box)}")


def interpolate_boxes(start_norm: Box, gt_norm: Box, T: int) -> list[list[int]]:
    """T+1 boxes from ``start_norm`` (step 0) to ``gt_norm`` (step T) by linear interpolation (IVT Sec. 3.2).

    ``box_t = start + (gt - start) * t / T``, rounded half up to integers in [0, 1000]; ``box_0`` is the start
    rounded, ``box_T`` the GT rounded. Rounding each coordinate half up keeps every box valid (``x2 > x1``) when
    both ends are. ``T = 0`` gives ``[start]``.
    """
    if not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be a non-negative integer, got {T!r}")
    _check_box(start_norm, "start box")
    _check_box(gt_norm, "GT box")
    out = []
    for t in range(T + 1):
        a = t / T if T > 0 else 0.0
        box = [_round_half_up(s + (g - s) * a) for s, g in zip(start_norm, gt_norm)]
        out.append([min(NORM_MAX, max(0, v)) for v in box])
    return out


def hold_fitting_boxes(boxes: Sequence[Box], gt_norm: Box, fit_iou: float = FIT_IOU) -> list[list[int]]:
    """``boxes`` (e.g. from :func:`interpolate_boxes`) with every box after the first one that FITS the GT
    (IoU >= ``fit_iou``; at ``FIT_IOU`` the geometric teacher says "Box fits. Keep it.") replaced by that box: the
    text says keep and the box is kept, instead of creeping on to the exact GT by a few units."""
    out = [list(b) for b in boxes]
    for t in range(1, len(out)):
        if iou(out[t - 1], gt_norm) >= fit_iou:
            out[t] = list(out[t - 1])
    return out


def stop_plan(boxes: Sequence[Box], gt_norm: Box, stop_iou: float = FIT_IOU) -> list[list[int]]:
    """Adaptive refinement: ``boxes`` cut after the first one that fits the GT (IoU >= ``stop_iou``), where the
    teacher stops (:func:`stop_reasoning`); unchanged when none fits (the budget ends the episode). A plan of
    ``t + 1`` boxes stops at step ``t`` (0 = the start box already fits)."""
    out = [list(b) for b in boxes]
    for t, b in enumerate(out):
        if iou(b, gt_norm) >= stop_iou:
            return out[: t + 1]
    return out


def stop_reasoning(reasoning: str, step: int) -> str:
    """The reasoning of a stopping step: why it stops, after what the step says (verbosity-independent, short on
    purpose: every character of " Stop." would be its own token for the tiny tokenizer). Step 0: ``"... It
    fits."``; a correction that reaches a fit: ``"... Now it fits."``; a red box that already fits: ``"Box
    fits."`` (instead of "Keep it.": nothing is kept for later, the episode ends)."""
    if reasoning.startswith("Box fits.") or "fits the target" in reasoning or "matches the target" in reasoning:
        return reasoning.split(" Keep it.")[0].replace("Keep it.", "").strip() or "Box fits."
    return f"{reasoning} {'It fits.' if step == 0 else 'Now it fits.'}"


def region_name(box: Box) -> str:
    """Where the box centre lies on a 3 x 3 grid: ``"top left"``, ``"top"``, ..., ``"center"``, ``"bottom right"``."""
    cx = (box[0] + box[2]) / 2
    cy = (box[1] + box[3]) / 2
    col = 0 if cx < NORM_MAX / 3 else (2 if cx >= 2 * NORM_MAX / 3 else 1)
    row = 0 if cy < NORM_MAX / 3 else (2 if cy >= 2 * NORM_MAX / 3 else 1)
    names = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
    return names[row][col]


def _direction(src: Box, dst: Box) -> str:
    """Coarse direction from ``src``'s centre to ``dst``'s centre: ``"left"``, ``"up right"``, ..., or ``""``."""
    dx = (dst[0] + dst[2] - src[0] - src[2]) / 2
    dy = (dst[1] + dst[3] - src[1] - src[3]) / 2
    big = max(abs(dx), abs(dy), 1e-9)
    parts = []
    if abs(dy) >= 0.4 * big and abs(dy) >= SHIFT_MIN:
        parts.append("down" if dy > 0 else "up")
    if abs(dx) >= 0.4 * big and abs(dx) >= SHIFT_MIN:
        parts.append("right" if dx > 0 else "left")
    return " ".join(parts)


def diagnose(prev: Box, gt: Box) -> dict:
    """What is wrong with the red box ``prev`` against ``gt``: a dict of ``kind`` (``"fit"``, ``"wrong"`` or
    ``"off"``), ``shift_x`` (``"left"``/``"right"``/None: where the red box lies relative to the target),
    ``shift_y`` (``"high"``/``"low"``/None), ``size_w`` / ``size_h`` (``"large"``/``"small"``/None), ``move``
    (direction of the correction, e.g. ``"down left"``)."""
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    pw, ph = prev[2] - prev[0], prev[3] - prev[1]
    dx = (prev[0] + prev[2] - gt[0] - gt[2]) / 2  # > 0: red box right of the target
    dy = (prev[1] + prev[3] - gt[1] - gt[3]) / 2  # > 0: red box below the target (image y grows downwards)
    overlap = iou(prev, gt)
    d = {"kind": "off", "iou": overlap, "shift_x": None, "shift_y": None, "size_w": None, "size_h": None,
         "move": _direction(prev, gt)}
    if overlap >= FIT_IOU:
        d["kind"] = "fit"
        return d
    if overlap < WRONG_IOU and math.hypot(dx, dy) > WRONG_DIST * max(gw, gh):
        d["kind"] = "wrong"
        return d
    if abs(dx) > max(SHIFT_TOL * gw, SHIFT_MIN):
        d["shift_x"] = "right" if dx > 0 else "left"
    if abs(dy) > max(SHIFT_TOL * gh, SHIFT_MIN):
        d["shift_y"] = "low" if dy > 0 else "high"
    # the correction undoes the diagnosed shifts (and nothing under the thresholds)
    d["move"] = " ".join(
        p for p in ({"low": "up", "high": "down"}.get(d["shift_y"]), {"right": "left", "left": "right"}.get(d["shift_x"])) if p
    )
    if pw > SIZE_TOL * gw:
        d["size_w"] = "large"
    elif pw * SIZE_TOL < gw:
        d["size_w"] = "small"
    if ph > SIZE_TOL * gh:
        d["size_h"] = "large"
    elif ph * SIZE_TOL < gh:
        d["size_h"] = "small"
    return d


def _size_phrase(w: Optional[str], h: Optional[str]) -> Optional[str]:
    if w is None and h is None:
        return None
    if w == h:
        return f"too {w}"  # too large / too small
    parts = []
    if w is not None:
        parts.append("too wide" if w == "large" else "too narrow")
    if h is not None:
        parts.append("too tall" if h == "large" else "too short")
    return " and ".join(parts)


def _size_fix(w: Optional[str], h: Optional[str]) -> Optional[str]:
    if w is None and h is None:
        return None
    if w == h:
        return "shrink" if w == "large" else "grow"
    parts = []
    if w is not None:
        parts.append("narrower" if w == "large" else "wider")
    if h is not None:
        parts.append("shorter" if h == "large" else "taller")
    return " and ".join(parts)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _problems(d: dict) -> list[str]:
    out = []
    if d["shift_x"]:
        out.append(f"too far {d['shift_x']}")
    if d["shift_y"]:
        out.append(f"too {d['shift_y']}")
    size = _size_phrase(d["size_w"], d["size_h"])
    if size:
        out.append(size)
    return out


def geometric_reasoning(
    prev_box_norm: Optional[Box],
    new_box_norm: Box,
    gt_box_norm: Box,
    step: int,
    expression: str,
    rng: Optional[random.Random] = None,
    verbosity: int = 0,
) -> str:
    """The reasoning text (without ``<think>`` tags) of one teacher step (IVT Sec. 3.2, forward-reasoning framing).

    ``step == 0``: why the region of ``new_box_norm`` was selected (no overlay exists yet). ``step >= 1``: examine
    the red box ``prev_box_norm`` (box ``step - 1``; ``None`` when it was invalid and nothing is drawn) against the
    GT, say what is wrong and the correction that leads to ``new_box_norm``. ``rng`` picks among equivalent
    phrasings at ``verbosity >= 1`` (``None``: always the first; verbosity 0 is deterministic).
    """
    if verbosity not in (0, 1, 2):
        raise ValueError(f"verbosity must be 0, 1 or 2, got {verbosity!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    _check_box(new_box_norm, "new box")
    _check_box(gt_box_norm, "GT box")
    pick = (lambda options: options[0]) if rng is None else rng.choice
    expr = " ".join(str(expression).split()) or "the target"
    if expr.split()[0].lower() not in ("the", "a", "an"):
        expr = "the " + expr
    where = region_name(new_box_norm)

    if step == 0 or prev_box_norm is None:
        if verbosity == 0:
            return f"Target at {where}." if step == 0 else f"No red box. Target at {where}."
        lead = "" if step == 0 else "There is no red box. "
        if verbosity == 1:
            return lead + pick([f"The target is at the {where}.", f"I see the target at the {where}."])
        return lead + f"I look for {expr}. " + pick([f"It is at the {where}.", f"I find it at the {where}."])

    _check_box(prev_box_norm, "previous box")
    d = diagnose(prev_box_norm, gt_box_norm)
    move = d["move"]
    if d["kind"] == "fit":
        if verbosity == 0:
            return "Box fits. Keep it."
        text = pick(["The red box fits the target. Keep it.", "The red box matches the target. Keep it."])
        return text if verbosity == 1 else f"The red box covers {expr}. " + text
    if d["kind"] == "wrong":
        if verbosity == 0:
            return f"Wrong object. Move {move}." if move else "Wrong object. Look again."
        lead = "The red box is on the wrong object." if verbosity == 1 else f"The red box is not on {expr}."
        return f"{lead} Move it {move}." if move else f"{lead} Look again."
    problems = _problems(d)
    size_fix = _size_fix(d["size_w"], d["size_h"])
    if not problems:  # overlaps but not yet a fit, with every offset under the thresholds: a small correction
        problems = ["a bit off"]
    fixes = []
    if move:
        fixes.append(f"move {move}")
    if size_fix:
        fixes.append(size_fix)
    if not fixes:
        fixes = ["adjust it"]
    if verbosity == 0:
        return f"{_cap(', '.join(problems))}. {_cap(', '.join(fixes))}."
    verbs = {"shrink": "make it smaller", "grow": "make it larger", "adjust it": "adjust it slightly"}
    fix_text = " and ".join(f"move it {move}" if f.startswith("move ") else verbs.get(f, f"make it {f}") for f in fixes)
    text = f"The red box is {' and '.join(problems)}. {_cap(fix_text)}."
    return text if verbosity == 1 else f"I check the red box against {expr}. " + text


def format_step(reasoning: str, box_norm: Box, stop_marker: Optional[str] = None,
                keep_marker: Optional[str] = None) -> str:
    """One step's text: ``"<think>{reasoning}</think> [x1, y1, x2, y2]"`` (IVT Sec. 3.1 answer format); a stopping
    step puts the marker between the reasoning and the box, ``"<think>...</think> <stop> [x1, y1, x2, y2]"``: the
    box still closes the step (the rollout engine stops generating right after it) and is the final box. A marker
    the reasoning already holds (a stop marker made of the model's own words, e.g. ``"fits."``) is not repeated.
    ``keep_marker`` (a refinement step that keeps ``box_norm``, the previous box): no box, the reasoning ends with
    the marker (``"<think>Box fits. Keep it.</think>"``) or the marker follows it; the env carries the previous box
    exactly (``GroundingRefineEnv``, "Keeping a box").

    >>> format_step("Box fits. Keep it.", [1, 2, 3, 4], keep_marker="Keep it.")
    '<think>Box fits. Keep it.</think>'
    >>> format_step("Box fits.", [1, 2, 3, 4], keep_marker="Keep it.")
    '<think>Box fits.</think> Keep it.'
    >>> format_step("Target at top. It fits.", [1, 2, 3, 4], stop_marker="fits.")  # a marker the reasoning holds
    '<think>Target at top. It fits.</think> [1, 2, 3, 4]'
    """
    if keep_marker:
        return f"<think>{reasoning}</think>" + ("" if reasoning.rstrip().endswith(keep_marker) else f" {keep_marker}")
    if stop_marker and stop_marker not in reasoning:
        return f"<think>{reasoning}</think> {stop_marker} {format_box(box_norm)}"
    return f"<think>{reasoning}</think> {format_box(box_norm)}"


def teacher_step_texts(
    boxes: Sequence[Box], gt_box_norm: Box, expression: str, rng: Optional[random.Random] = None, verbosity: int = 0
) -> list[str]:
    """The full step texts of one teacher trajectory over ``boxes`` (e.g. from :func:`interpolate_boxes`)."""
    texts = []
    for t, box in enumerate(boxes):
        prev = boxes[t - 1] if t > 0 else None
        texts.append(format_step(geometric_reasoning(prev, box, gt_box_norm, t, expression, rng, verbosity), box))
    return texts


def teacher_corpus(verbosity: int = 0) -> list[str]:
    """Every phrase the geometric teacher can write at ``verbosity`` (one sample sentence per case), so a tokenizer
    trained offline (the tiny model's) can give each teacher word a single token."""
    gt = [400, 400, 600, 600]
    cases = [[400, 400, 600, 600], [50, 50, 150, 150], [850, 850, 950, 950]]
    for dx in (-120, 0, 120):
        for dy in (-120, 0, 120):
            for sw, sh in ((0, 0), (60, 60), (-60, -60), (60, 0), (-60, 0), (0, 60), (0, -60), (60, -60), (-60, 60)):
                cases.append([400 + dx - sw, 400 + dy - sh, 600 + dx + sw, 600 + dy + sh])
    lines = set()
    for prev in cases:
        for t in (0, 1):
            for new in (gt, [0, 0, 100, 100], [900, 900, 1000, 1000], [0, 450, 100, 550], [450, 0, 550, 100]):
                lines.add(geometric_reasoning(prev if t else None, new, gt, t, "target", None, verbosity))
    return sorted(lines)
