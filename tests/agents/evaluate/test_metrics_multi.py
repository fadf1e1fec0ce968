"""Count errors of multi-box trajectories by hand, and the report's multi-object table."""

import pytest

from agents.evaluate.metrics import compute_metrics, count_metrics
from agents.evaluate.report import format_report
from rollouts.types import Step, Trajectory


def _traj(n_gt, finals, ious, valid_last=True):
    """``finals``: number of boxes at each step; the last step invalid when ``valid_last`` is False."""
    steps = []
    for t, (k, v) in enumerate(zip(finals, ious)):
        valid = valid_last or t < len(finals) - 1
        steps.append(Step(t=t, text="", valid=valid, iou=v if valid else 0.0,
                          boxes_norm=[[0, 0, 10, 10]] * k if valid else []))
    gt = [[0, 0, 1, 1]] * n_gt
    return Trajectory("s", "synthetic_multi", "e", gt[0], 10, 10, steps=steps, meta={"gt_boxes": gt})


def test_count_errors_by_hand():
    trajs = [
        _traj(2, [2, 1], [0.9, 0.5]),  # final: too few
        _traj(1, [1, 2], [0.8, 0.6]),  # final: too many
        _traj(3, [2, 3], [0.3, 0.95]),  # final: exact
        _traj(2, [2, 2], [0.7, 0.0], valid_last=False),  # invalid final step: 0 boxes, too few
    ]
    c = count_metrics(trajs)
    assert (c["n"], c["exact"], c["too_few"], c["too_many"]) == (4, 0.25, 0.5, 0.25)
    assert c["too_few_step"] == [0.25, 0.5] and c["too_many_step"] == [0.0, 0.25]
    assert c["mean_boxes"] == pytest.approx(6 / 4) and c["mean_gt_boxes"] == pytest.approx(2.0)
    assert c["by_gt_count"]["2"] == {"n": 2, "acc@0.5": 0.5, "miou": 0.25}
    assert c["by_gt_count"]["3"] == {"n": 1, "acc@0.5": 1.0, "miou": 0.95}
    m = compute_metrics(trajs)
    assert m["acc@0.5"] == 0.75 and m["counts"] == c  # Acc@k on the env's score (HIoU in multi episodes)
    report = format_report(m, "x")
    assert "Several objects: HIoU and count errors" in report and "| all | 4 | 25.0 | 50.0 | 25.0 |" in report


def test_single_box_trajectories_have_no_count_block():
    t = Trajectory("s", "synthetic", "e", [0, 0, 1, 1], 10, 10, steps=[Step(t=0, text="", valid=True, iou=0.7)])
    assert count_metrics([t]) is None and "counts" not in compute_metrics([t])
