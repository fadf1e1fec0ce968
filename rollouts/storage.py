"""Trajectories on disk: JSONL, one :meth:`Trajectory.to_dict` per line, step images as PNG files beside it.

- :func:`save_trajectories` writes atomically (temp file in the same folder, then ``os.replace``), so a reader never
  sees half a file. With ``image_dir``, each step's ``observation`` (the image the policy saw at that step: the
  original at step 0, the overlay of box t-1 at step t) is written as a PNG and ``Step.image_path`` is filled with
  the path RELATIVE TO THE JSONL FILE'S FOLDER, so a run directory can be moved as a whole.
- :func:`load_trajectories` raises :class:`TrajectoryFileError` naming the file, the line and what was wrong;
  ``load_images=True`` reads the PNGs back into ``Step.observation`` (what a learner needs to re-encode images).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
from PIL import Image

from ivt_env.atomic import atomic_open
from rollouts.observations import load_png
from rollouts.types import Step, Trajectory

PathLike = Union[str, os.PathLike]
_STEP_FIELDS = [f.name for f in dataclasses.fields(Step) if f.name != "observation"]
_TRAJ_FIELDS = [f.name for f in dataclasses.fields(Trajectory) if f.name != "steps"]
_REQUIRED_STEP = ("t", "text", "valid", "iou")
_REQUIRED_TRAJ = ("sample_id", "dataset", "expression", "gt_box", "width", "height", "steps")


class TrajectoryFileError(ValueError):
    """A trajectory file or one of its records is unreadable; the message names the file and line."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def trajectory_record(traj: Trajectory) -> dict[str, Any]:
    """Same dict as :meth:`Trajectory.to_dict`, without deep-copying the in-memory observation images first."""
    d = {k: getattr(traj, k) for k in _TRAJ_FIELDS}
    d["steps"] = [{k: getattr(s, k) for k in _STEP_FIELDS} for s in traj.steps]
    return d


def safe_name(name: str) -> str:
    """A file-name-safe form of an id (``refcocog/123 a`` -> ``refcocog_123_a``), at most 80 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:80] or "x"


def save_png(path: PathLike, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) image as PNG atomically."""
    with atomic_open(path, "wb") as f:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG")


def save_trajectories(path: PathLike, trajectories: Iterable[Trajectory], image_dir: Optional[PathLike] = None) -> Path:
    """Write ``trajectories`` to ``path`` (JSONL); with ``image_dir``, also each step's observation as PNG.

    Steps without an ``observation`` keep their ``image_path`` as it was. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trajs = list(trajectories)
    if image_dir is not None:
        image_dir = Path(image_dir)
        for k, traj in enumerate(trajs):
            member = traj.meta.get("group_member", 0) if isinstance(traj.meta, dict) else 0
            stem = f"{k:06d}_{safe_name(traj.dataset)}_{safe_name(traj.sample_id)}_g{member}"
            for s in traj.steps:
                if s.observation is None:
                    continue
                img_path = image_dir / f"{stem}_t{s.t}.png"
                save_png(img_path, s.observation)
                s.image_path = os.path.relpath(img_path, path.parent)
    with atomic_open(path, "w") as f:
        for traj in trajs:
            f.write(json.dumps(trajectory_record(traj), default=_json_default, ensure_ascii=False))
            f.write("\n")
    return path


def _check_record(d: Any, where: str) -> None:
    if not isinstance(d, dict):
        raise TrajectoryFileError(f"{where}: expected a JSON object (one trajectory), got {type(d).__name__}")
    missing = [k for k in _REQUIRED_TRAJ if k not in d]
    if missing:
        raise TrajectoryFileError(f"{where}: trajectory is missing field(s) {missing}")
    unknown = sorted(set(d) - set(_TRAJ_FIELDS) - {"steps"})
    if unknown:
        raise TrajectoryFileError(f"{where}: unknown trajectory field(s) {unknown}; known: {_TRAJ_FIELDS + ['steps']}")
    if not isinstance(d["steps"], list):
        raise TrajectoryFileError(f"{where}: 'steps' must be a list, got {type(d['steps']).__name__}")
    for j, s in enumerate(d["steps"]):
        if not isinstance(s, dict):
            raise TrajectoryFileError(f"{where}: step {j} must be an object, got {type(s).__name__}")
        missing = [k for k in _REQUIRED_STEP if k not in s]
        if missing:
            raise TrajectoryFileError(f"{where}: step {j} is missing field(s) {missing}")
        unknown = sorted(set(s) - set(_STEP_FIELDS) - {"observation"})
        if unknown:
            raise TrajectoryFileError(f"{where}: step {j} has unknown field(s) {unknown}; known: {_STEP_FIELDS}")
        if not isinstance(s["text"], str):
            raise TrajectoryFileError(f"{where}: step {j} 'text' must be a string, got {type(s['text']).__name__}")
        if not isinstance(s["iou"], (int, float)) or isinstance(s["iou"], bool):
            raise TrajectoryFileError(f"{where}: step {j} 'iou' must be a number, got {s['iou']!r}")


def load_trajectories(path: PathLike, load_images: bool = False) -> list[Trajectory]:
    """Read a JSONL file written by :func:`save_trajectories` (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryFileError(f"{path}: no such trajectory file")
    out: list[Trajectory] = []
    for where, d in read_jsonl(path, TrajectoryFileError):
        _check_record(d, where)
        traj = Trajectory.from_dict(d)
        if load_images:
            for s in traj.steps:
                if s.image_path is None:
                    continue
                img = path.parent / s.image_path
                if not img.is_file():
                    raise TrajectoryFileError(f"{where}: step {s.t} image not found: {img}")
                s.observation = load_png(str(img), f"{where}: step {s.t}")
        out.append(traj)
    return out


def read_jsonl(path: PathLike, error: type[Exception] = ValueError) -> Iterable[tuple[str, Any]]:
    """``("path:line", record)`` for every non-blank line of a JSONL file; a line that is not JSON raises ``error``
    naming the file and line (the records' own checks are the caller's)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            yield where, record
