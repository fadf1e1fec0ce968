"""IVT metrics on hand-built trajectories; every expected number below is worked out by hand in the comments."""

import json

import pytest

from agents.evaluate.metrics import compute_metrics, metrics_from_ious, outcome
from agents.evaluate.report import format_report
from rollouts.types import Step, Trajectory


def traj(ious, valids=None, dataset="refcocog", ret=0.0):
    valids = valids or [True] * len(ious)
    steps = [Step(t=t, text="", valid=v, iou=i) for t, (i, v) in enumerate(zip(ious, valids))]
    steps[-1].reward = ret
    return Trajectory(sample_id="s", dataset=dataset, expression="e", gt_box=[0, 0, 1, 1], width=1, height=1, steps=steps)


# Five T=2 trajectories (step-0, step-1, step-2 IoU):
#   A  0.30  0.45  0.60                 hard,   +0.30  improve
#   B  0.80  0.80  0.805                easy,   +0.005 stagnate
#   C  0.60  [0.9 invalid -> 0]  0.61   medium, +0.01 exactly -> stagnate
#   D  0.95  0.92  0.49                 easy,   -0.46  degrade
#   E  [0.2 inv -> 0]  [0 inv]  0.91    hard,   +0.91  improve
@pytest.fixture
def five():
    return [
        traj([0.30, 0.45, 0.60], ret=1.0),
        traj([0.80, 0.80, 0.805], ret=2.0),
        traj([0.60, 0.90, 0.61], [True, False, True], ret=3.0),
        traj([0.95, 0.92, 0.49], dataset="refl4", ret=4.0),
        traj([0.20, 0.00, 0.91], [False, False, True], dataset="refl4", ret=5.0),
    ]


def test_table1_and_table2_by_hand(five):
    m = compute_metrics(five)
    assert m["n"] == 5 and m["steps"] == 2
    # finals .60 .805 .61 .49 .91: >=.5 -> 4, >=.7 -> B,E, >=.9 -> E; mean 3.415 / 5
    assert m["acc@0.5"] == pytest.approx(0.8)
    assert m["acc@0.7"] == pytest.approx(0.4)
    assert m["acc@0.9"] == pytest.approx(0.2)
    assert m["miou"] == pytest.approx(0.683)
    # step 0: .30+.80+.60+.95+0 = 2.65; step 1: .45+.80+0+.92+0 = 2.17
    assert m["iou_step"] == pytest.approx([0.53, 0.434, 0.683])
    assert m["delta"] == pytest.approx(0.153)
    assert m["improve_rate"] == pytest.approx(0.4)
    assert m["stagnation_rate"] == pytest.approx(0.4)
    assert m["degradation_rate"] == pytest.approx(0.2)
    # 3 invalid steps of 15; per step 4/5, 3/5, 5/5
    assert m["format_rate"] == pytest.approx(0.8)
    assert m["format_rate_step"] == pytest.approx([0.8, 0.6, 1.0])
    # best over steps: .60 .805 .61 .95 .91
    assert m["best_step"] == pytest.approx({"acc@0.5": 1.0, "acc@0.7": 0.6, "acc@0.9": 0.4, "miou": 0.775})
    assert m["return_mean"] == pytest.approx(3.0)


def test_strata_by_hand(five):
    s = compute_metrics(five)["strata"]
    # hard: A (0.30) and E (0 after invalid): finals .60, .91
    assert s["hard"] == pytest.approx(
        {"count": 2, "share": 0.4, "miou_step0": 0.15, "miou_final": 0.755, "delta": 0.605,
         "improve_rate": 1.0, "stagnation_rate": 0.0, "degradation_rate": 0.0}
    )
    assert s["medium"] == pytest.approx(
        {"count": 1, "share": 0.2, "miou_step0": 0.60, "miou_final": 0.61, "delta": 0.01,
         "improve_rate": 0.0, "stagnation_rate": 1.0, "degradation_rate": 0.0}
    )
    # easy: B (.80 -> .805) and D (.95 -> .49)
    assert s["easy"] == pytest.approx(
        {"count": 2, "share": 0.4, "miou_step0": 0.875, "miou_final": 0.6475, "delta": -0.2275,
         "improve_rate": 0.0, "stagnation_rate": 0.5, "degradation_rate": 0.5}
    )


def test_by_dataset(five):
    five[0].dataset = "mix"  # a mix's trajectory: its source dataset counts
    five[0].meta["source"] = "refcocog"
    by = compute_metrics(five)["by_dataset"]
    assert by["refcocog"] == pytest.approx({"n": 3, "acc@0.5": 1.0, "acc@0.7": 1 / 3, "acc@0.9": 0.0, "miou": 2.015 / 3})
    assert by["refl4"] == pytest.approx({"n": 2, "acc@0.5": 0.5, "acc@0.7": 0.5, "acc@0.9": 0.5, "miou": 0.70})


def test_stratum_boundaries_and_empty_stratum():
    m = metrics_from_ious([[0.5, 0.5], [0.75, 0.75], [0.4999, 0.4999]])
    assert [m["strata"][k]["count"] for k in ("hard", "medium", "easy")] == [1, 1, 1]
    m = metrics_from_ious([[0.9, 0.9]])
    assert m["strata"]["hard"]["count"] == 0 and m["strata"]["hard"]["miou_step0"] is None
    assert m["strata"]["hard"]["improve_rate"] is None
    json.dumps(m, allow_nan=False)  # None, never NaN: valid JSON


def test_outcome_threshold():
    assert outcome(0.60, 0.61) == "stagnate"  # exactly 0.01 (float noise 0.010000000000000009)
    assert outcome(0.61, 0.60) == "stagnate"
    assert outcome(0.60, 0.6101) == "improve"
    assert outcome(0.60, 0.5899) == "degrade"


def test_single_step_and_paper_delta_rule():
    m = metrics_from_ious([[0.7], [0.2]])
    assert m["steps"] == 0 and m["delta"] == 0.0 and m["stagnation_rate"] == 1.0
    # Table 2 "Base + IVT": delta = step-2 mean minus step-0 mean
    m = metrics_from_ious([[0.377, 0.145, 0.156]])
    assert m["delta"] == pytest.approx(-0.221)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no trajectories"):
        compute_metrics([])
    with pytest.raises(ValueError, match="trajectory 1 has 2"):
        metrics_from_ious([[0.1, 0.2, 0.3], [0.1, 0.2]])
    with pytest.raises(ValueError, match="non-finite"):
        metrics_from_ious([[0.1, float("nan")]])


def test_report(five):
    m = compute_metrics(five)
    text = format_report(m, name="hand")
    assert "| hand | T=2 | 0.800 | 0.400 | 0.200 | 0.683 |" in text
    assert "| hand | 0.530 | 0.434 | 0.683 | +0.153 | 40.0 | 40.0 | 20.0 |" in text
    assert "| Hard (<0.5) | 2 | 40.0 | 0.150 | 0.755 | +0.605 | 100.0 | 0.0 | 0.0 |" in text
    assert "Valid format: 80.0% of all steps" in text


# ------------------------------------------------------------------ adaptive refinement: episodes of different lengths
def test_unequal_lengths_by_hand():
    # A stopped at step 0, B at step 1, C used the whole budget T = 2. Carried forward: A [.8 .8 .8], B [.3 .6 .6].
    ious = [[0.8], [0.3, 0.6], [0.2, 0.4, 0.1]]
    m = metrics_from_ious(ious, adaptive=True)
    assert m["steps"] == 2 and m["acc@0.5"] == pytest.approx(2 / 3) and m["miou"] == pytest.approx(0.5)
    assert m["iou_step"] == pytest.approx([1.3 / 3, 1.8 / 3, 0.5]) and m["delta"] == pytest.approx(0.5 - 1.3 / 3)
    assert (m["improve_rate"], m["stagnation_rate"], m["degradation_rate"]) == pytest.approx((1 / 3,) * 3)
    assert m["refine_steps_mean"] == pytest.approx(1.0) and m["reached_step"] == [3, 2, 1]
    assert m["iou_step_reached"] == pytest.approx([1.3 / 3, 0.5, 0.1])
    assert m["by_steps_used"] == {"0": {"n": 1, "share": pytest.approx(1 / 3), "acc@0.5": 1.0, "miou": 0.8},
                                  "1": {"n": 1, "share": pytest.approx(1 / 3), "acc@0.5": 1.0, "miou": 0.6},
                                  "2": {"n": 1, "share": pytest.approx(1 / 3), "acc@0.5": 0.0, "miou": 0.1}}
    easy, hard, medium = m["strata"]["easy"], m["strata"]["hard"], m["strata"]["medium"]
    assert (easy["refine_steps_mean"], easy["stop_at_0_rate"]) == (0.0, 1.0)
    assert (hard["refine_steps_mean"], hard["stop_at_0_rate"]) == (1.5, 0.0)
    assert medium["count"] == 0 and medium["refine_steps_mean"] is None
    assert m["format_rate"] == 1.0 and m["format_rate_step"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="same, non-zero number of steps"):
        metrics_from_ious(ious)  # without stopping, unequal lengths are an error as before


def test_fixed_length_keys_unchanged_and_allow_stop_adds_the_adaptive_keys():
    fixed = metrics_from_ious([[0.2, 0.4], [0.6, 0.5]])
    assert "refine_steps_mean" not in fixed and "by_steps_used" not in fixed
    on = metrics_from_ious([[0.2, 0.4], [0.6, 0.5]], adaptive=True)
    assert on["refine_steps_mean"] == 1.0 and {k: on[k] for k in fixed if k != "strata"} == {
        k: v for k, v in fixed.items() if k != "strata"}
    for name, stratum in fixed["strata"].items():  # the strata only gain the steps-used keys
        assert {k: on["strata"][name][k] for k in stratum} == stratum


def test_compute_metrics_on_stopped_trajectories():
    from rollouts.types import Step, Trajectory

    def traj(ious, valids, stop):
        steps = [Step(t=k, text="", valid=v, iou=i) for k, (i, v) in enumerate(zip(ious, valids))]
        return Trajectory("s", "d", "x", [0, 0, 1, 1], 1, 1, steps=steps, meta={"allow_stop": stop})

    m = compute_metrics([traj([0.9], [True], True), traj([0.1, 0.0, 0.7], [True, False, True], True)])
    # invalid step 1 of the second counts as IoU 0; format over the 4 steps taken: 3 / 4
    assert m["refine_steps_mean"] == 1.0 and m["acc@0.5"] == 1.0 and m["format_rate"] == 0.75
    assert m["format_rate_step"] == [1.0, 0.0, 1.0] and m["iou_step"] == pytest.approx([0.5, 0.45, 0.8])
    assert "refine_steps_mean" in compute_metrics([traj([0.9, 0.8], [True, True], True)])
