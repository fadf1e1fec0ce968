"""Evaluation logging to TensorBoard: scalars and trajectory strips, to a RunLogger or a plain SummaryWriter.

Training runs hold an :class:`agents.run_logging.RunLogger` (engineer F's wrapper, which mirrors scalars to
``scalars.jsonl``); other callers may pass a ``torch.utils.tensorboard.SummaryWriter``. Both are accepted here, and
tags follow :func:`agents.run_logging.flatten_metrics` in both cases (``eval/acc@0.5``, ``eval/iou_step0``,
``eval/strata/hard/miou_final``), so curves from either writer line up.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from agents.run_logging import flatten_metrics


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
