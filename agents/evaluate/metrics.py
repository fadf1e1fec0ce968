"""Evaluation metrics exactly as the IVT paper defines them (Sec. 4.1 "Metrics", Table 1, Table 2, Sec. 4.3).

Per trajectory the IoU of each step's box with the GT is used, with one convention stated here once: **a step
whose text has no parseable box (invalid format) counts as IoU 0** (the env already reports 0; it is enforced
again here so hand-built trajectories follow the same rule).

- Table 1: ``acc@k`` = share of trajectories whose FINAL box has IoU >= k (k = 0.5, 0.7, 0.9) and ``miou`` = mean
  final-box IoU.
- Table 2: ``iou_step[t]`` = mean IoU at step t (t = 0..T); ``delta`` = ``iou_step[T] - iou_step[0]``; each
  trajectory is *improved* when ``IoU_T - IoU_0 > 0.01``, *degraded* when ``< -0.01``, otherwise *stagnated*
  (a difference of exactly 0.01 is stagnation: "differs by > 0.01").
- Sec. 4.3 strata by step-0 IoU: hard ``< 0.5``, medium ``[0.5, 0.75)``, easy ``>= 0.75``; per stratum the count,
  share, mean IoU at step 0 and at the final step, delta and the three outcome rates.
- ``format_rate``: share of ALL steps (every trajectory, every step) with a parseable box.

Also reported (not in the paper's tables): ``best_step`` = the same Table-1 numbers for the best box over the
steps of each trajectory. Sec. 4.1 defines mean IoU with "the best predicted box", and the paper's Table 1 IoUs of
the IVT rows (e.g. SFT+IVT 0.743) exceed every per-step mean of Table 2 (0.716 / 0.632 / 0.576), which only a
best-over-steps selection can produce; the headline numbers here use the final box (what a deployed model returns).

All rates are fractions in [0, 1]; means over an empty stratum are ``None`` (JSON ``null``).

Adaptive refinement (episodes that stop early have different lengths; :func:`compute_metrics` turns it on when a
trajectory has ``meta["allow_stop"]``, :func:`metrics_from_ious` with ``adaptive=True``): the FINAL box is each
trajectory's last step. Table 2's
``iou_step[t]`` CARRIES THE LAST BOX FORWARD: a trajectory that stopped at step k < t counts with its step-k IoU at
step t (so ``iou_step[T]`` is the mean final IoU and ``delta`` is final minus step 0 over all trajectories, as
in the fixed-T table); ``iou_step_reached[t]`` / ``reached_step[t]`` are the mean IoU over, and the number of,
trajectories that actually took step t. ``steps`` is then the longest episode's refinement steps. Added keys:
``refine_steps_mean`` (refinement steps taken, step 0 not counted; also per stratum, with ``stop_at_0_rate``,
the share of the stratum that stopped at step 0) and ``by_steps_used`` ({k: n, share, acc@0.5, miou}: accuracy
against steps used). ``format_rate`` is over the steps taken; ``format_rate_step[t]`` over those that took step t.

Multi-object grounding (``IVT-SyntheticMulti-v0``): the env's per-step score of a multi-box episode is the HIoU of
the step's boxes with the GT boxes (``ivt_env.boxes.hiou``), so every number above (Acc@k, mean, per step, strata)
is on HIoU there. :func:`compute_metrics` then adds ``counts`` (:func:`count_metrics`): how often the final step
(and each step) answers too few or too many boxes.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np

ACC_THRESHOLDS = (0.5, 0.7, 0.9)  # IVT Table 1
OUTCOME_EPS = 0.01  # IVT Table 2: improve / degrade when step-T IoU differs from step-0 IoU by > 0.01
STRATA = (("hard", -math.inf, 0.5), ("medium", 0.5, 0.75), ("easy", 0.75, math.inf))  # IVT Sec. 4.3


def trajectory_ious(traj: Any) -> list[float]:
    """Per-step IoUs of one trajectory, invalid steps forced to 0."""
    return [float(s.iou) if s.valid else 0.0 for s in traj.steps]


def outcome(first: float, last: float, eps: float = OUTCOME_EPS) -> str:
    """``"improve"``, ``"stagnate"`` or ``"degrade"`` for one trajectory (IVT Table 2)."""
    # Round away float noise so that 0.61 - 0.60 (= 0.010000000000000009) is exactly the 0.01 boundary.
    d = round(last - first, 12)
    if d > eps:
        return "improve"
    if d < -eps:
        return "degrade"
    return "stagnate"


def _mean(x: np.ndarray) -> Optional[float]:
    return float(x.mean()) if x.size else None


def _outcome_rates(first: np.ndarray, last: np.ndarray, eps: float) -> dict[str, Optional[float]]:
    n = first.size
    kinds = [outcome(a, b, eps) for a, b in zip(first.tolist(), last.tolist())]
    rate = lambda k: (kinds.count(k) / n) if n else None  # noqa: E731
    return {"improve_rate": rate("improve"), "stagnation_rate": rate("stagnate"), "degradation_rate": rate("degrade")}


def _accuracy_block(final: np.ndarray, thresholds: Sequence[float]) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {f"acc@{k:g}": (_mean((final >= k).astype(float))) for k in thresholds}
    out["miou"] = _mean(final)
    return out


def metrics_from_ious(
    ious: Sequence[Sequence[float]],
    valids: Optional[Sequence[Sequence[bool]]] = None,
    *,
    datasets: Optional[Sequence[str]] = None,
    returns: Optional[Sequence[float]] = None,
    thresholds: Sequence[float] = ACC_THRESHOLDS,
    eps: float = OUTCOME_EPS,
    adaptive: bool = False,
) -> dict[str, Any]:
    """The metric table from per-trajectory step IoUs (``ious[i][t]``; all trajectories must have T+1 steps unless
    ``adaptive``: see the module docstring; :func:`compute_metrics` turns it on for trajectories of a stopping env).

    ``valids[i][t]`` marks parseable steps (invalid steps count as IoU 0); ``datasets[i]`` adds a per-dataset
    Table-1 breakdown (``by_dataset``); ``returns[i]`` adds the mean return.
    """
    if len(ious) == 0:
        raise ValueError("compute_metrics: no trajectories to score")
    lengths = {len(r) for r in ious}
    if 0 in lengths:
        empty = next(i for i, r in enumerate(ious) if not len(r))
        raise ValueError(f"compute_metrics: trajectory {empty} has no steps")
    if len(lengths) != 1 and not adaptive:
        first_bad = next(i for i, r in enumerate(ious) if len(r) != len(ious[0]))
        raise ValueError(
            f"compute_metrics: every trajectory needs the same, non-zero number of steps; trajectory 0 has "
            f"{len(ious[0])}, trajectory {first_bad} has {len(ious[first_bad])} (adaptive=True for stopped episodes)"
        )
    used = np.asarray([len(r) for r in ious])  # steps taken, step 0 included
    width = int(used.max())
    taken = np.arange(width)[None, :] < used[:, None]  # (n, S) True where the step was taken
    if valids is not None and [len(v) for v in valids] != used.tolist():
        raise ValueError("compute_metrics: valids do not have the ious' step counts")
    # carry the last step forward (IoU and validity) so that every row has S entries
    iou = np.asarray([list(r) + [r[-1]] * (width - len(r)) for r in ious], dtype=np.float64)  # (n, S)
    if valids is None:
        valid = np.ones_like(iou, dtype=bool)
    else:
        valid = np.asarray([list(v) + [v[-1]] * (width - len(v)) for v in valids], dtype=bool)
    if not np.all(np.isfinite(iou)):
        bad = int(np.argwhere(~np.isfinite(iou))[0][0])
        raise ValueError(f"compute_metrics: trajectory {bad} has a non-finite IoU: {list(ious[bad])}")
    iou = np.where(valid, iou, 0.0)  # invalid step = IoU 0
    n, n_steps = iou.shape
    first, final = iou[:, 0], iou[:, -1]

    m: dict[str, Any] = {"n": int(n), "steps": int(n_steps - 1)}
    m.update(_accuracy_block(final, thresholds))
    m["iou_step"] = [float(v) for v in iou.mean(axis=0)]
    m["delta"] = m["iou_step"][-1] - m["iou_step"][0]
    m.update(_outcome_rates(first, final, eps))
    if adaptive:
        m["format_rate"] = float(valid[taken].mean())
        m["format_rate_step"] = [float(valid[taken[:, t], t].mean()) for t in range(width)]
        m.update(_adaptive_block(iou, taken, used - 1, thresholds))
    else:
        m["format_rate"] = float(valid.mean())
        m["format_rate_step"] = [float(v) for v in valid.mean(axis=0)]
    m["best_step"] = _accuracy_block(iou.max(axis=1), thresholds)
    if returns is not None:
        m["return_mean"] = float(np.mean(np.asarray(returns, dtype=np.float64)))

    strata: dict[str, dict[str, Any]] = {}
    for name, lo, hi in STRATA:
        sel = (first >= lo) & (first < hi)
        k = int(sel.sum())
        s: dict[str, Any] = {"count": k, "share": k / n}
        s["miou_step0"], s["miou_final"] = _mean(first[sel]), _mean(final[sel])
        s["delta"] = None if k == 0 else s["miou_final"] - s["miou_step0"]
        s.update(_outcome_rates(first[sel], final[sel], eps))
        if adaptive:
            s["refine_steps_mean"] = _mean((used[sel] - 1).astype(float))
            s["stop_at_0_rate"] = _mean((used[sel] == 1).astype(float))
        strata[name] = s
    m["strata"] = strata

    if datasets is not None:
        names = np.asarray(list(datasets), dtype=object)
        if names.shape[0] != n:
            raise ValueError(f"compute_metrics: {names.shape[0]} dataset names for {n} trajectories")
        by: dict[str, dict[str, Any]] = {}
        for name in sorted(set(names.tolist())):
            sel = names == name
            by[name] = {"n": int(sel.sum()), **_accuracy_block(final[sel], thresholds)}
        m["by_dataset"] = by
    return m


def _adaptive_block(iou: np.ndarray, taken: np.ndarray, refine: np.ndarray, thresholds) -> dict[str, Any]:
    """Adaptive-refinement keys (module docstring): ``iou`` (n, S) with the last step carried forward, ``taken``
    (n, S) the steps actually taken, ``refine`` (n,) refinement steps used."""
    final = iou[:, -1]
    out: dict[str, Any] = {"refine_steps_mean": float(refine.mean())}
    out["reached_step"] = [int(taken[:, t].sum()) for t in range(iou.shape[1])]
    out["iou_step_reached"] = [_mean(iou[taken[:, t], t]) for t in range(iou.shape[1])]
    by: dict[str, dict[str, Any]] = {}
    for k in sorted(set(refine.tolist())):
        sel = refine == k
        by[str(int(k))] = {"n": int(sel.sum()), "share": float(sel.mean()),
                           **_accuracy_block(final[sel], thresholds[:1])}
    out["by_steps_used"] = by
    return out


def _num_boxes(step: Any) -> int:
    if not step.valid:
        return 0
    boxes = getattr(step, "boxes_norm", None)
    return len(boxes) if boxes is not None else 1


def count_metrics(trajectories: Sequence[Any]) -> Optional[dict[str, Any]]:
    """Count errors of multi-box trajectories (``meta["gt_boxes"]``, set by the collector in multi-box episodes);
    ``None`` when there are none. An invalid step answers 0 boxes. Keys: ``n`` (multi-box trajectories),
    ``exact`` / ``too_few`` / ``too_many`` (share of final steps answering exactly / fewer / more boxes than the
    GT), ``too_few_step`` / ``too_many_step`` (the same per step), ``mean_boxes`` and ``mean_gt_boxes`` (final
    step), ``by_gt_count`` ({GT count: {n, acc@0.5, miou}}: the final-step HIoU by number of referred objects)."""
    trajs = [t for t in trajectories if isinstance(t.meta, dict) and t.meta.get("gt_boxes") is not None]
    if not trajs:
        return None
    n_gt = np.asarray([len(t.meta["gt_boxes"]) for t in trajs])
    n_pred = np.asarray([[_num_boxes(s) for s in t.steps] for t in trajs])  # (n, T+1)
    final = n_pred[:, -1]
    out: dict[str, Any] = {
        "n": len(trajs),
        "exact": float(np.mean(final == n_gt)),
        "too_few": float(np.mean(final < n_gt)),
        "too_many": float(np.mean(final > n_gt)),
        "too_few_step": [float(v) for v in np.mean(n_pred < n_gt[:, None], axis=0)],
        "too_many_step": [float(v) for v in np.mean(n_pred > n_gt[:, None], axis=0)],
        "mean_boxes": float(final.mean()),
        "mean_gt_boxes": float(n_gt.mean()),
    }
    finals = np.asarray([trajectory_ious(t)[-1] for t in trajs])
    out["by_gt_count"] = {str(k): {"n": int((n_gt == k).sum()), "acc@0.5": float(np.mean(finals[n_gt == k] >= 0.5)),
                                   "miou": float(np.mean(finals[n_gt == k]))} for k in sorted(set(n_gt.tolist()))}
    return out


def compute_metrics(trajectories: Iterable[Any], **kwargs: Any) -> dict[str, Any]:
    """IVT metrics of :class:`rollouts.types.Trajectory` objects (see the module docstring for definitions)."""
    trajs = list(trajectories)
    counts = count_metrics(trajs)
    if counts is not None:
        return {**_compute(trajs, **kwargs), "counts": counts}
    return _compute(trajs, **kwargs)


def _compute(trajs: list, **kwargs: Any) -> dict[str, Any]:
    if "adaptive" not in kwargs:  # the trajectories of a stopping env (the collector marks them): adaptive keys
        kwargs["adaptive"] = any(isinstance(t.meta, dict) and t.meta.get("allow_stop") for t in trajs)
    return metrics_from_ious(
        [trajectory_ious(t) for t in trajs],
        [[bool(s.valid) for s in t.steps] for t in trajs],
        # per source dataset: a mix's samples carry their sub-dataset (refcocog, refadv, refl4) as meta["source"]
        datasets=[(t.meta.get("source") if isinstance(t.meta, dict) else None) or t.dataset for t in trajs],
        returns=[t.ret for t in trajs],
        **kwargs,
    )
