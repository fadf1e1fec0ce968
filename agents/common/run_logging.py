"""Run folders and a small TensorBoard wrapper shared by GRPO, behaviour cloning and evaluation.

Run folders follow CleanRL: ``runs/{env}__{exp}__{seed}__{time}``. :class:`RunLogger` writes TensorBoard events
(scalars, images, text, the config as an hparams table) and mirrors every scalar into ``scalars.jsonl`` (one JSON
object per logging call: ``{"step": k, "tag": value, ...}``) so scripts and notes can read curves without
TensorBoard. A logger built with ``enabled=False`` (DDP ranks other than 0) does nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def run_name(env_id: str, exp: str, seed: int, when: Optional[float] = None) -> str:
    """``{env}__{exp}__{seed}__{YYYYmmdd-HHMMSS}`` with path separators in ``env``/``exp`` replaced."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if when is None else when))
    clean = lambda s: str(s).replace("/", "-").replace(os.sep, "-").replace(":", "-")  # noqa: E731
    return f"{clean(env_id)}__{clean(exp)}__{seed}__{stamp}"


def make_run_dir(root: str | os.PathLike, env_id: str, exp: str, seed: int, when: Optional[float] = None) -> Path:
    """Create and return a fresh ``root/{run_name}`` (a numeric suffix avoids clashes within one second)."""
    base = Path(root) / run_name(env_id, exp, seed, when)
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    path.mkdir(parents=True)
    return path


def prepare_run_dir(cfg: Any, env_id: str, dist: Any = None) -> Path:
    """The run folder of a training config (fields ``out``, ``resume``, ``runs_root``, ``exp_name``, ``seed``):
    ``--out DIR`` (which must hold a checkpoint exactly when resuming), else a fresh
    ``runs/{env}__{exp}__{seed}__{time}``. Writes the config as ``config.yaml`` (``config.resume.yaml`` when
    resuming). ``dist`` (:mod:`agents.common.distributed` info): rank 0 picks the folder and writes, every rank gets it."""
    from agents.common import distributed
    from agents.common.checkpoint import latest_checkpoint
    from agents.common.config import save_yaml

    is_main = dist is None or dist.is_main
    if cfg.out:
        run_dir = Path(cfg.out)
        used = previous_run_files(run_dir)
        overwrite = bool(getattr(cfg, "overwrite", False))
        if not cfg.resume and used and not overwrite:
            what = "checkpoints" if latest_checkpoint(run_dir) is not None else "the logs of an earlier run"
            raise FileExistsError(f"{run_dir} already holds {what} ({', '.join(p.name for p in used)}): pass --resume "
                                  "to continue that run, --overwrite to delete it and start clean, or choose another "
                                  "--out")
        if cfg.resume and latest_checkpoint(run_dir) is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints to continue from (pass "
                                    "--overwrite instead of --resume to start that folder clean)")
        if is_main and overwrite and used:
            remove_run_files(run_dir)
        if is_main and cfg.resume:
            from agents.common.checkpoint import clean_interrupted_saves

            for line in clean_interrupted_saves(run_dir):
                print(f"[run] {line}", file=sys.stderr)
    else:
        run_dir = make_run_dir(cfg.runs_root, env_id, cfg.exp_name, cfg.seed) if is_main else None
    if dist is not None:
        run_dir = Path(distributed.broadcast_object(str(run_dir) if run_dir else None))
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / ("config.resume.yaml" if cfg.resume else "config.yaml"))
        if cfg.resume and not (run_dir / "config.yaml").exists():
            save_yaml(cfg, run_dir / "config.yaml")
    if dist is not None:
        distributed.barrier()
    return run_dir


#: What a training run writes into its folder (a folder holding any of these is a used run folder).
RUN_FILE_PATTERNS = ("scalars.jsonl", "events.out.tfevents.*", "config.yaml", "config.resume.yaml", "summary.json",
                     "checkpoints", "best", "final", "base", ".best.*", ".final.*", ".base.*")


def previous_run_files(run_dir: str | os.PathLike) -> list[Path]:
    """The files and folders of an earlier training run in ``run_dir`` (:data:`RUN_FILE_PATTERNS`), sorted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted({p for pattern in RUN_FILE_PATTERNS for p in run_dir.glob(pattern)})


def remove_run_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete an earlier run's files (``--overwrite``); anything else in the folder is left alone."""
    import shutil

    gone = previous_run_files(run_dir)
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return gone


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``{prefix}{key}`` scalars.

    Nested dicts join with ``/`` (``strata/hard/miou``); lists of numbers get the index appended
    (``iou_step`` -> ``iou_step0``, ``iou_step1``, ...); non-numeric leaves are skipped.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if _is_number(v):
                    out[f"{name}{i}"] = float(v)
        elif _is_number(value):
            out[name] = float(value)
    return out


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, (int, float, np.integer, np.floating)):
        return True
    return hasattr(v, "numel") and v.numel() == 1


def _hparam_value(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


class RunLogger:
    """TensorBoard ``SummaryWriter`` plus a ``scalars.jsonl`` mirror; every method is a no-op when disabled."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True, flush_secs: int = 10,
                 purge_step: Optional[int] = None):
        """``purge_step`` (a resumed run: checkpoint step + 1): TensorBoard discards the events earlier files hold
        at this step and later (what a killed run logged after its last checkpoint), so a resumed run's curves
        show each step once. ``scalars.jsonl`` is trimmed by the trainers themselves."""
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.log_dir), flush_secs=flush_secs, purge_step=purge_step)
            self._jsonl = open(self.log_dir / "scalars.jsonl", "a")

    # -------------------------------------------------------------------------------------------- writing
    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Log a (nested) dict of numbers; see :func:`flatten_metrics` for naming. NaN/inf are logged as is."""
        if not self.enabled:
            return
        flat = flatten_metrics(values, prefix)
        for tag, v in flat.items():
            self._writer.add_scalar(tag, v, step)
        rec = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()}}
        self._jsonl.write(json.dumps(rec) + "\n")
        self._jsonl.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 image (e.g. a trajectory strip from ``agents.evaluate.viz``)."""
        if not self.enabled:
            return
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(f"RunLogger.image({tag!r}): expected (H, W, C) with C in 1/3/4, got {arr.shape}")
        self._writer.add_image(tag, arr, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)

    def hparams(self, config: Mapping[str, Any], metrics: Optional[Mapping[str, float]] = None) -> None:
        """The (nested) config as TensorBoard's HPARAMS table, in this run's own event file.

        Nested keys join with ``.``; lists and None become strings. ``metrics`` names scalar tags the table shows
        (their values come from the logged scalars of the same tag).
        """
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        flat = _flatten_config(config)
        exp, ssi, sei = hparams({k: _hparam_value(v) for k, v in flat.items()}, dict(metrics or {}))
        for summary in (exp, ssi, sei):  # into this run's own event file (add_hparams would open a sub-run)
            self._writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._writer is not None:
            self._writer.close()
            self._jsonl.close()
            self._writer = None
            self.enabled = False

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_scalars(log_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``scalars.jsonl`` in a run folder, in logging order."""
    p = Path(log_dir) / "scalars.jsonl"
    if not p.is_file():
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_scalars(run_dir: str | os.PathLike, step: int) -> None:
    """Drop the ``scalars.jsonl`` records after ``step`` (a resumed run logs the steps after its checkpoint again)."""
    from ivt_env.atomic import atomic_write_text

    p = Path(run_dir) / "scalars.jsonl"
    if p.is_file():
        keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(p, "".join(ln + "\n" for ln in keep))


# ------------------------------------------------------------------ evaluation logging: RunLogger or SummaryWriter
# Training runs hold a RunLogger; other callers of ``agents.evaluate`` may pass a plain SummaryWriter. Tags follow
# flatten_metrics either way (``eval/acc@0.5``, ``eval/iou_step0``, ``eval/strata/hard/miou_final``).
def _prefix(prefix: str) -> str:
    return prefix.rstrip("/") + "/" if prefix else ""


def log_metrics(writer: Any, metrics: Mapping[str, Any], step: int, prefix: str = "eval") -> None:
    """Every numeric leaf of ``metrics`` as a scalar ``{prefix}/{name}`` at ``step``."""
    if writer is None:
        return
    if not hasattr(writer, "add_scalar"):  # RunLogger
        writer.scalars(metrics, step, prefix=_prefix(prefix))
        return
    for tag, value in flatten_metrics(metrics, _prefix(prefix)).items():
        writer.add_scalar(tag, value, step)


def log_strips(writer: Any, strips: Sequence[np.ndarray], step: int, prefix: str = "eval") -> None:
    """Trajectory strips as images ``{prefix}/strip/{k}`` (HWC uint8)."""
    if writer is None:
        return
    for k, strip in enumerate(strips):
        tag = f"{_prefix(prefix)}strip/{k}"
        if hasattr(writer, "add_image"):  # SummaryWriter
            writer.add_image(tag, np.asarray(strip), step, dataformats="HWC")
        else:  # RunLogger
            writer.image(tag, strip, step)


def log_text(writer: Any, tag: str, text: str, step: int) -> None:
    if writer is None:
        return
    (writer.add_text if hasattr(writer, "add_text") else writer.text)(tag, text, step)
