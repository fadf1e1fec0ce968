"""Box text parsing, coordinate conversion and overlap measures.

Conventions (DESIGN.md):
- Inside the env, boxes are ``xyxy`` floats in pixels of the original image.
- In text, boxes are integers in [0, 1000] normalised by width / height (Qwen3-VL):
  ``x_norm = floor(x_px * 1000 / W)`` (IVT Sec. 3.1).

``parse_box`` never raises: any string gives a :class:`ParsedBox`, valid or with a reason.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

NORM_MAX = 1000

# A bracketed list of exactly four numbers: "[12, 30, 400, 512]" (ints or floats, signs allowed so we can
# report "out of range" instead of silently missing a negative coordinate).
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)"
_LIST4 = re.compile(
    r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]",
    re.IGNORECASE,
)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_THINK_TAG = re.compile(r"<think>", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>", re.IGNORECASE)
# One flat JSON object (no nested braces); ``"bbox_2d"`` is checked on the match. Putting the key inside the
# pattern (``\{[^{}]*"bbox_2d"[^{}]*\}``) backtracks quadratically on a long brace-less run of repeated keys.
_JSON_OBJ = re.compile(r"\{[^{}]*\}")
# What a usable bbox_2d looks like: checked before json.loads, so a text of many near-miss objects stays cheap.
_BBOX_KEY_LIST4 = re.compile(r'"bbox_2d"\s*:\s*' + _LIST4.pattern, re.IGNORECASE)


@dataclass(frozen=True)
class ParsedBox:
    """Result of parsing a step's text.

    ``box`` is the normalised ``[x1, y1, x2, y2]`` in [0, 1000] (floats, usually integral) when ``valid``;
    otherwise ``None`` and ``reason`` says why (``"no box found"``, ``"out of range"``, ``"x2 <= x1"``, ...).
    """

    box: Optional[tuple[float, float, float, float]]
    reason: Optional[str] = None

    @property
    def valid(self) -> bool:
        return self.box is not None


def _check(vals: Sequence[float]) -> ParsedBox:
    x1, y1, x2, y2 = vals
    for v in vals:
        if v != v:
            return ParsedBox(None, "NaN coordinate")
    for v in vals:
        if v in (math.inf, -math.inf):
            return ParsedBox(None, "infinite coordinate")
    for v in vals:
        if v < 0 or v > NORM_MAX:
            return ParsedBox(None, f"out of range [0, {NORM_MAX}]")
    if x2 <= x1:
        return ParsedBox(None, "x2 <= x1")
    if y2 <= y1:
        return ParsedBox(None, "y2 <= y1")
    return ParsedBox((float(x1), float(y1), float(x2), float(y2)))


def _json_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_box(m: "re.Match") -> Optional[list[float]]:
    """The ``bbox_2d`` of one flat JSON object match, or None when it has no usable one."""
    if not _BBOX_KEY_LIST4.search(m.group(0)):
        return None
    try:
        vals = json.loads(m.group(0)).get("bbox_2d")
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
    if not (isinstance(vals, list) and len(vals) == 4 and all(_json_number(v) for v in vals)):
        return None
    try:
        return [float(v) for v in vals]
    except OverflowError:  # an integer beyond float range
        return [math.inf] * 4


def _pick(text: str, which: str) -> Optional[list[float]]:
    """The last (or first) 4-number box in ``text``: bracketed lists and JSON ``bbox_2d`` objects.

    Only the winner is converted (a 16k-character text may hold a thousand boxes). A JSON object's bbox_2d wins
    over other lists inside the same object (``{"bbox_2d": A, "other": B}``): the object ends after them (last)
    and starts before them (first). Flat objects never nest, so only the winning object's own lists compete.
    """
    lists = list(_LIST4.finditer(text))
    last = which == "last"
    lst = (lists[-1] if last else lists[0]) if lists else None
    obj = None
    if '"bbox_2d"' in text:
        objects = list(_JSON_OBJ.finditer(text))
        for m in reversed(objects) if last else objects:
            vals = _json_box(m)
            if vals is not None:
                obj = (m, vals)
                break
    # Lists never contain braces, so a list is wholly inside or outside an object; a list inside the winning
    # object ends before it (last) and starts after it (first), and a list inside another object cannot win.
    if obj is not None and (lst is None or (obj[0].end() > lst.end() if last else obj[0].start() < lst.start())):
        return obj[1]
    return None if lst is None else [float(g) for g in lst.groups()]


#: Which box of a text counts (``parse_box(which=...)``, env kwarg ``answer_box``).
BOX_CHOICES = ("last", "first")


def parse_box(text: object, which: str = "last") -> ParsedBox:
    """Parse the LAST box in a step's text (``which="first"``: the first one, as Ref-Adv's published evaluation
    reads answers).

    Accepted forms: ``<think>...</think> [x1, y1, x2, y2]``, Qwen3-VL JSON ``{"bbox_2d": [...]}`` (also inside a
    ```json fence or a list of such objects), and ``<answer>...</answer>`` wrappers (when an answer block exists,
    only its content is searched: the last block, or the first with ``which="first"``). Boxes inside ``<think>``
    are ignored when one exists outside it. Never raises on any text (a bad ``which`` is a ValueError).
    """
    if which not in BOX_CHOICES:
        raise ValueError(f"which must be one of {BOX_CHOICES}, got {which!r}")
    try:
        if not isinstance(text, str):
            return ParsedBox(None, f"not a string: {type(text).__name__}")
        answers = _ANSWER.findall(text) if _ANSWER_TAG.search(text) else None
        scope = (answers[-1] if which == "last" else answers[0]) if answers else text
        if _THINK_TAG.search(scope):
            box = _pick(_THINK.sub(" ", scope), which)
            if box is None:
                box = _pick(scope, which)
        else:  # the common case of a bare answer: one regex pass
            box = _pick(scope, which)
        if box is None:
            return ParsedBox(None, "no box found")
        return _check(box)
    except Exception as exc:  # noqa: BLE001 - the contract is "never raise on any string"
        return ParsedBox(None, f"parse error: {type(exc).__name__}")


KEEP_MARKER = "Keep it."  # ends a refinement step that keeps its box (GroundingRefineEnv, "Keeping a box")


def ends_with_keep(text: object, marker: Optional[str]) -> bool:
    """Whether a step's text ends with the keep marker (no box to read: "keep the previous box"), either as the last
    words of its closed reasoning or after it; trailing spaces aside. An unclosed ``<think>`` is no keep.

    >>> ends_with_keep("<think>Box fits. Keep it.</think>", "Keep it.")
    True
    >>> ends_with_keep("<think>Box fits.</think> Keep it.", "Keep it.")
    True
    >>> [ends_with_keep(t, "Keep it.") for t in ["<think>Keep it.", "<think>Keep it.</think> [1, 2, 3, 4]", "Keep it"]]
    [False, False, False]
    """
    if not marker or not isinstance(text, str):
        return False
    t = text.rstrip()
    if t.endswith("</think>"):
        t = t[: -len("</think>")].rstrip()
    elif "<think>" in t and "</think>" not in t:  # the reasoning is still open: a cut-off text
        return False
    return t.endswith(marker)


def format_box(box_norm: Sequence[float]) -> str:
    """The canonical text form ``[x1, y1, x2, y2]`` with integer coordinates."""
    return "[" + ", ".join(str(int(round(v))) for v in box_norm) + "]"


def to_norm(box_px: Sequence[float], width: float, height: float) -> tuple[int, int, int, int]:
    """Pixels -> integers in [0, 1000]: ``floor(x * 1000 / W)`` (IVT Sec. 3.1), clipped to the range.

    A tolerance of 1e-9 inside the floor keeps ``to_norm(to_pixels(b)) == b`` for integer boxes despite float
    rounding (``29 * 100 / 1000 * 1000 / 100`` is ``28.999999999999996``).
    """
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got width={width!r}, height={height!r}")
    x1, y1, x2, y2 = box_px

    def f(v: float, s: float) -> int:
        return int(min(NORM_MAX, max(0, math.floor(v * NORM_MAX / s + 1e-9))))

    return f(x1, width), f(y1, height), f(x2, width), f(y2, height)


def to_pixels(box_norm: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """[0, 1000] -> pixel floats: ``x * W / 1000`` (inverse of :func:`to_norm` up to the floor)."""
    x1, y1, x2, y2 = box_norm
    return (x1 * width / NORM_MAX, y1 * height / NORM_MAX, x2 * width / NORM_MAX, y2 * height / NORM_MAX)


def area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """Continuous IoU of two ``xyxy`` boxes (any common unit). ``None`` or empty boxes give 0."""
    if a is None or b is None:
        return 0.0
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = area(a) + area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def giou(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """Generalised IoU (Rezatofighi et al. 2019): IoU - |C \\ (A u B)| / |C|, in [-1, 1]. ``None`` gives -1."""
    if a is None or b is None:
        return -1.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    if hull <= 0:
        return -1.0
    i = inter / union if union > 0 else 0.0
    return float(i - (hull - union) / hull)


# ------------------------------------------------------------------------------------------ several boxes (HIoU)
def union_iou(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """IoU of the two box SETS compared as wholes: ``|U(pred) n U(gt)| / |U(pred) u U(gt)|``, where ``U`` is the
    union region of a set's boxes (overlaps counted once). Exact (coordinate compression, no rasterising).
    An empty set gives 0.

    This is HIoU's *global* term (:func:`hiou`). SIFThinker's formula for it is garbled in the seed text and its
    released code (GRPO-SIF/.../grpo_jsonl.py) has no HIoU; the union-region IoU is the reading that "quantifies the
    spatial consistency of the predicted and GT boxes as a whole" and cannot be gamed by box order or duplicates.
    """
    pred = [b for b in pred_boxes if area(b) > 0]
    gt = [b for b in gt_boxes if area(b) > 0]
    if not pred or not gt:
        return 0.0
    import numpy as np

    boxes = pred + gt
    xs = np.unique([v for b in boxes for v in (float(b[0]), float(b[2]))])
    ys = np.unique([v for b in boxes for v in (float(b[1]), float(b[3]))])
    cell = np.outer(np.diff(xs), np.diff(ys))  # (nx-1, ny-1) cell areas

    def cover(bs) -> "np.ndarray":
        m = np.zeros(cell.shape, dtype=bool)
        for b in bs:
            i1, i2 = np.searchsorted(xs, [float(b[0]), float(b[2])])
            j1, j2 = np.searchsorted(ys, [float(b[1]), float(b[3])])
            m[i1:i2, j1:j2] = True
        return m

    p, g = cover(pred), cover(gt)
    union = float(cell[p | g].sum())
    return float(cell[p & g].sum() / union) if union > 0 else 0.0


def pairwise_iou(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """HIoU's *pairwise* term: the one-to-one matching of predicted and GT boxes that maximises the total IoU
    (Kuhn-Munkres, ``scipy.optimize.linear_sum_assignment``), its total divided by ``max(len(pred), len(gt))`` so
    that every missing and every extra box counts as a pair of IoU 0. An empty set gives 0."""
    n, m = len(pred_boxes), len(gt_boxes)
    if n == 0 or m == 0:
        return 0.0
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    mat = np.array([[iou(p, g) for g in gt_boxes] for p in pred_boxes], dtype=np.float64)
    rows, cols = linear_sum_assignment(mat, maximize=True)
    return float(mat[rows, cols].sum() / max(n, m))


def hiou(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> float:
    """SIFThinker's hierarchical IoU of two box sets: ``(global IoU + pairwise IoU) / 2`` in [0, 1].

    Global: :func:`union_iou` (IoU of the union regions of the two sets); pairwise: :func:`pairwise_iou`
    (optimal one-to-one matching, averaged over the larger count). Invariant to the order of either set; for one
    box against one box it equals :func:`iou`. Boxes ``xyxy`` in any common unit; an empty set gives 0.
    """
    return 0.5 * (union_iou(pred_boxes, gt_boxes) + pairwise_iou(pred_boxes, gt_boxes))


def clip_pixel_box(box: Any, width: int, height: int, what: str = "box") -> tuple[float, float, float, float]:
    """``box`` (4 pixel numbers ``[x1, y1, x2, y2]``, e.g. another model's proposal) clipped to the image; a
    one-line ValueError naming ``what`` when it is not 4 finite numbers or is empty inside the image."""
    try:
        v = [float(c) for c in box]
    except (TypeError, ValueError):
        v = []
    if len(v) != 4 or not all(math.isfinite(c) for c in v):
        raise ValueError(f"{what} must be 4 finite pixel numbers [x1, y1, x2, y2], got {box!r}")
    x1, x2 = (min(max(c, 0.0), float(width)) for c in (v[0], v[2]))
    y1, y2 = (min(max(c, 0.0), float(height)) for c in (v[1], v[3]))
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{what} {list(box)!r} is empty inside the {width}x{height} image")
    return (x1, y1, x2, y2)
