"""Refining another model's boxes: a JSONL of proposals, one start box per sample (``--proposals FILE``).

The setting of VG-Refiner (correct another system's box): each trajectory starts from the proposal for its sample,
which the env takes as step 0's prediction (``reset(options={"start_box": box})``, see
:class:`ivt_env.env.GroundingRefineEnv`), so the first observation already shows it and the policy starts
refining. Table 2 then reads directly as "how refinement changes the proposals": step 0 is the proposal, the final
step the refined box (``metrics.json`` adds ``proposals``: Table 1 of the proposals themselves).

File format: one JSON object per line, ``{"sample_id": "...", "box": [x1, y1, x2, y2]}`` with the box in PIXELS of
the sample's image (xyxy; it is clipped to the image). Blank lines are skipped. A detector's or a published model's
output converts with a few lines of code; e.g. for RefCOCOg the sample ids are the loader's ids (``ivt_env
.datasets``: ``f"{ref_id}_{sent_id}"``, see ``ivt_env/datasets/README.md``).

Errors are one line naming the file and line: not JSON, not an object, a missing or non-string ``sample_id``, a
``box`` that is not four finite numbers with x2 > x1 and y2 > y1, a sample id given twice; and, when the evaluated
samples are matched, the first sample without a proposal (with the count of the others).

>>> import json, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "p.jsonl")
>>> _ = open(path, "w").write(json.dumps({"sample_id": "a", "box": [1, 2, 30, 40]}) + "\\n")
>>> load_proposals(path)
{'a': [1.0, 2.0, 30.0, 40.0]}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from rollouts.storage import read_jsonl


class ProposalError(ValueError):
    """A bad proposals file (one line naming the file and line)."""


def _box(value: Any, where: str) -> list[float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 4
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise ProposalError(f"{where}: 'box' must be [x1, y1, x2, y2], four finite pixel numbers, got {value!r}")
    box = [float(v) for v in value]
    if not (box[2] > box[0] and box[3] > box[1]):
        raise ProposalError(f"{where}: 'box' needs x2 > x1 and y2 > y1 (xyxy pixels), got {value!r}")
    return box


def load_proposals(path: str | Path) -> dict[str, list[float]]:
    """``{sample_id: [x1, y1, x2, y2]}`` (pixels) from a proposals JSONL (format and errors: module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--proposals: no such file {str(path)!r}")
    out: dict[str, list[float]] = {}
    for where, rec in read_jsonl(path, ProposalError):
        if not isinstance(rec, dict):
            raise ProposalError(f"{where}: expected an object {{\"sample_id\": ..., \"box\": [...]}}, got "
                                f"{type(rec).__name__}")
        sid = rec.get("sample_id")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
            raise ProposalError(f"{where}: 'sample_id' must be a non-empty string, got {sid!r}")
        if "box" not in rec:
            raise ProposalError(f"{where}: no 'box' for sample {sid!r}")
        sid = str(sid)
        if sid in out:
            raise ProposalError(f"{where}: sample {sid!r} has a proposal already (one per sample)")
        out[sid] = _box(rec["box"], where)
    if not out:
        raise ProposalError(f"{path}: holds no proposals")
    return out


def reset_options_for(proposals: dict[str, list[float]], sample_ids: Sequence[str], path: str | Path = "proposals"
                      ) -> dict[int, dict]:
    """``{index: {"start_box": box}}`` for the evaluated samples (``sample_ids[i]`` is sample ``i``'s id); a
    ProposalError naming the file and the first sample without a proposal."""
    missing = [str(s) for s in sample_ids if str(s) not in proposals]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(sample_ids)} evaluated samples)" if len(missing) > 1 else ""
        raise ProposalError(f"{path}: no proposal for sample id {missing[0]!r}{more}")
    return {i: {"start_box": list(proposals[str(s)])} for i, s in enumerate(sample_ids)}


def proposal_block(trajectories: Sequence[Any], thresholds: Sequence[float] = (0.5, 0.7, 0.9)) -> dict[str, Any]:
    """Table 1 of the proposals themselves (step 0) next to the refined boxes (last step), and the share of
    trajectories whose refinement raised / lowered the IoU by more than 0.01."""
    first = [float(t.steps[0].iou) for t in trajectories]
    final = [float(t.steps[-1].iou) if t.steps[-1].valid else 0.0 for t in trajectories]
    n = len(first)
    block: dict[str, Any] = {"n": n}
    for name, vals in (("proposal", first), ("refined", final)):
        block[name] = {f"acc@{k:g}": sum(v >= k for v in vals) / n for k in thresholds}
        block[name]["miou"] = sum(vals) / n
    block["raised_rate"] = sum(b - a > 0.01 for a, b in zip(first, final)) / n
    block["lowered_rate"] = sum(a - b > 0.01 for a, b in zip(first, final)) / n
    return block
