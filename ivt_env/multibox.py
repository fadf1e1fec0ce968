"""Several boxes per step (multi-object grounding, SIFThinker): parsing, text form and the per-step score.

A multi-box step answers a LIST of boxes, in one of these forms (ints in [0, 1000], as for one box):

- a list of ``[x1, y1, x2, y2]`` lists: ``[[12, 30, 400, 512], [600, 40, 900, 300]]``
- a JSON list of Qwen3-VL objects: ``[{"bbox_2d": [12, 30, 400, 512]}, {"bbox_2d": [...], "depth": 0.42}]``
  (also in a ```json fence); an object may carry a ``"depth"`` (SIFThinker's box-depth pairs)
- a single box in any form :func:`ivt_env.boxes.parse_box` reads (a list of one box)

The LAST list (or lone box) in the text counts, with the same ``<answer>`` / ``<think>`` scoping as
:func:`~ivt_env.boxes.parse_box`. Every box of the list must be valid, else the whole step is invalid (with the
reason of the first bad box). :func:`parse_boxes` never raises.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ivt_env.boxes import _ANSWER, _ANSWER_TAG, _JSON_OBJ, _LIST4, _NUM, _THINK, _THINK_TAG, _check, _json_number
from ivt_env.boxes import format_box

MAX_BOXES = 32  # more boxes in one step is an invalid step ("too many boxes")

_L4 = r"\[\s*(?:" + _NUM + r")\s*,\s*(?:" + _NUM + r")\s*,\s*(?:" + _NUM + r")\s*,\s*(?:" + _NUM + r")\s*\]"
_LIST_OF_LISTS = re.compile(r"\[\s*" + _L4 + r"(?:\s*,\s*" + _L4 + r")*\s*,?\s*\]", re.IGNORECASE)
_LIST_OF_OBJS = re.compile(r"\[\s*\{[^{}]*\}(?:\s*,\s*\{[^{}]*\})*\s*,?\s*\]")

Box4 = tuple[float, float, float, float]


@dataclass(frozen=True)
class ParsedBoxes:
    """Result of parsing a multi-box step: ``boxes`` (normalised, in text order) and per-box ``depths`` (``None``
    where a box has no depth) when valid; else ``boxes`` is empty and ``reason`` says why."""

    boxes: tuple[Box4, ...] = ()
    depths: tuple[Optional[float], ...] = ()
    reason: Optional[str] = None

    @property
    def valid(self) -> bool:
        return bool(self.boxes)


def _depth_of(obj: dict) -> Optional[float]:
    d = obj.get("depth")
    if _json_number(d) and math.isfinite(float(d)):
        return float(d)
    return None


def _obj_box(obj: object) -> Optional[tuple[list[float], Optional[float]]]:
    if not isinstance(obj, dict):
        return None
    vals = obj.get("bbox_2d")
    if isinstance(vals, list) and len(vals) == 4 and all(_json_number(v) for v in vals):
        try:
            return [float(v) for v in vals], _depth_of(obj)
        except OverflowError:
            return [math.inf] * 4, None
    return None


def _candidates(text: str) -> list[tuple[int, int, list[tuple[list[float], Optional[float]]]]]:
    """``(end, -start, [(box, depth), ...])`` of every single box and every list of boxes in ``text``."""
    found = [(m.end(), -m.start(), [([float(g) for g in m.groups()], None)]) for m in _LIST4.finditer(text)]
    for m in _LIST_OF_LISTS.finditer(text):
        boxes = [([float(g) for g in b.groups()], None) for b in _LIST4.finditer(m.group(0))]
        found.append((m.end(), -m.start(), boxes))
    if '"bbox_2d"' in text:
        for m in _JSON_OBJ.finditer(text):
            if '"bbox_2d"' not in m.group(0):
                continue
            try:
                got = _obj_box(json.loads(m.group(0)))
            except (ValueError, TypeError, RecursionError):
                continue
            if got is not None:
                found.append((m.end(), -m.start(), [got]))
        for m in _LIST_OF_OBJS.finditer(text):
            try:
                items = json.loads(m.group(0))
            except (ValueError, TypeError, RecursionError):
                continue
            got = [_obj_box(o) for o in items] if isinstance(items, list) else [None]
            if got and all(g is not None for g in got):
                found.append((m.end(), -m.start(), got))
    return found


def parse_boxes(text: object) -> ParsedBoxes:
    """Parse the LAST list of boxes (or lone box) of a step's text (see the module doc). Never raises."""
    try:
        if not isinstance(text, str):
            return ParsedBoxes(reason=f"not a string: {type(text).__name__}")
        answers = _ANSWER.findall(text) if _ANSWER_TAG.search(text) else None
        scope = answers[-1] if answers else text
        if _THINK_TAG.search(scope):
            cands = _candidates(_THINK.sub(" ", scope)) or _candidates(scope)
        else:
            cands = _candidates(scope)
        if not cands:
            return ParsedBoxes(reason="no box found")
        items = max(cands, key=lambda c: (c[0], c[1]))[2]  # ends last; of those, starts first (the whole list)
        if len(items) > MAX_BOXES:
            return ParsedBoxes(reason=f"too many boxes (> {MAX_BOXES})")
        boxes, depths = [], []
        for k, (vals, depth) in enumerate(items):
            p = _check(vals)
            if not p.valid:
                return ParsedBoxes(reason=f"box {k}: {p.reason}" if len(items) > 1 else p.reason)
            boxes.append(p.box)
            depths.append(depth)
        return ParsedBoxes(tuple(boxes), tuple(depths))
    except Exception as exc:  # noqa: BLE001 - the contract is "never raise on any string"
        return ParsedBoxes(reason=f"parse error: {type(exc).__name__}")


def format_boxes(boxes_norm: Sequence[Sequence[float]], depths: Optional[Sequence[Optional[float]]] = None) -> str:
    """The canonical text of several boxes: ``[[x1, y1, x2, y2], ...]``; with ``depths`` the JSON object form
    ``[{"bbox_2d": [...], "depth": 0.42}, ...]`` (a ``None`` depth leaves the key out)."""
    if depths is None:
        return "[" + ", ".join(format_box(b) for b in boxes_norm) + "]"
    parts = []
    for b, d in zip(boxes_norm, depths):
        body = '{"bbox_2d": ' + format_box(b)
        parts.append(body + (f', "depth": {float(d):.2f}' + "}" if d is not None else "}"))
    return "[" + ", ".join(parts) + "]"


@dataclass
class MultiStep:
    """What the env measured for one multi-box step."""

    boxes_norm: list[list[float]] = field(default_factory=list)
    boxes_px: list[list[float]] = field(default_factory=list)
    depths: list[Optional[float]] = field(default_factory=list)
    valid: bool = False
    reason: Optional[str] = None
    score: float = 0.0
