"""Figures of the reproduction (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from agents.reproduce.rows import PAPER, ROWS


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def iou_per_step(rows: Mapping[str, dict], path: Path) -> Path:
    """Mean IoU with the GT box at each step, one line per row (ours solid, the paper's dashed, same colour)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for k, row in enumerate(ROWS):
        if row.name not in rows:
            continue
        colour = f"C{k}"
        ours = rows[row.name]["iou_step"]
        ax.plot(range(len(ours)), ours, "o-", color=colour, lw=2, label=f"{row.label} (ours)")
        paper = PAPER[row.name].get("iou_step") or [PAPER[row.name]["miou"]]
        ax.plot(range(len(paper)), paper, "s--", color=colour, lw=1, alpha=0.5, label=f"{row.label} (paper)")
    ax.set_xticks([0, 1, 2])
    ax.set_xlabel("refinement step t (0 = first answer)")
    ax.set_ylabel("mean IoU with the ground-truth box")
    ax.set_ylim(0, 1)
    ax.set_title("IoU per step: tiny model on synthetic scenes vs the paper's Qwen3-VL-4B")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def grpo_curves(records: Sequence[dict], path: Path, title: str = "GRPO validation curves") -> Optional[Path]:
    """``eval/improve_rate``, ``stagnation_rate``, ``degradation_rate`` (%) and ``eval/delta`` over iterations,
    from a run's ``scalars.jsonl`` records; None when the records hold no ``eval/`` rates."""
    tags = {"improve": "eval/improve_rate", "stagnation": "eval/stagnation_rate", "degradation": "eval/degradation_rate"}
    pts = {k: [(r["step"], r[t]) for r in records if isinstance(r.get(t), (int, float))] for k, t in tags.items()}
    delta = [(r["step"], r["eval/delta"]) for r in records if isinstance(r.get("eval/delta"), (int, float))]
    if not any(pts.values()):
        return None
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for (name, p), colour in zip(pts.items(), ("C2", "C7", "C3")):
        if p:
            x, y = zip(*p)
            ax.plot(x, 100 * np.asarray(y), "o-", color=colour, label=name)
    ax.set_xlabel("GRPO iteration")
    ax.set_ylabel("share of validation samples (%)")
    ax.set_title("outcome of refinement (step T vs step 0, |dIoU| > 0.01)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    if delta:
        x, y = zip(*delta)
        ax2.plot(x, y, "o-", color="C0")
        ax2.axhline(0.0, color="k", lw=0.8)
    ax2.set_xlabel("GRPO iteration")
    ax2.set_ylabel("mean IoU(step T) - IoU(step 0)")
    ax2.set_title("delta")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def strip_grid(improved: Sequence[np.ndarray], degraded: Sequence[np.ndarray], path: Path,
               title: str = "") -> Optional[Path]:
    """Trajectory strips side by side: improved examples left, degraded right (each strip: step panels with the red
    predicted box and the cyan ground truth)."""
    n = max(len(improved), len(degraded))
    if n == 0:
        return None
    plt = _plt()
    fig, axes = plt.subplots(n, 2, figsize=(12, 2.2 * n), dpi=110, squeeze=False)
    for col, (strips, name) in enumerate(((improved, "improved"), (degraded, "degraded"))):
        for r in range(n):
            ax = axes[r][col]
            ax.axis("off")
            if r < len(strips):
                ax.imshow(strips[r])
            if r == 0:
                ax.set_title(f"{name} (step T IoU vs step 0 beyond 0.01)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
