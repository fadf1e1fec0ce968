"""The multi-box geometric teacher and the scripted policies on IVT-SyntheticMulti-v0: box-set interpolation by
hand, terse reasoning, oracle / random / copy / teacher trajectories, and multi-box teacher synthesis."""

import pytest

from agents.evaluate.core import evaluate
from agents.policies import make_policy
from agents.synthesis.synthesizer import SynthesizeConfig, Synthesizer
from agents.teacher.multi import interpolate_box_sets, match_boxes, multi_reasoning, multi_teacher_texts
from ivt_env.multibox import parse_boxes

G1, G2 = [100, 100, 200, 200], [600, 600, 800, 800]


def test_interpolation_matches_boxes_adds_missing_and_drops_extra():
    start = [[620, 600, 820, 800], [0, 0, 50, 50], [100, 100, 180, 220]]  # near G2, an extra, near G1
    assert sorted(match_boxes(start, [G1, G2])) == [(0, 1), (2, 0)]
    plan = interpolate_box_sets(start, [G1, G2], 2)
    assert plan[0] == start
    assert plan[1] == [[100, 100, 190, 210], [610, 600, 810, 800]]  # midpoints, in GT order; the extra is gone
    assert plan[2] == [G1, G2]
    plan = interpolate_box_sets([[600, 600, 800, 800]], [G1, G2], 2)  # G1 missing: it appears at step 1
    assert plan[1] == [G1, G2] and plan[2] == [G1, G2]
    kept = interpolate_box_sets([[100, 100, 200, 210], [0, 0, 60, 60]], [G1, G2], 2, keep_fitting=True)
    assert kept[1][0] == [100, 100, 200, 210] and kept[2][0] == [100, 100, 200, 210]  # fits (IoU 0.91): kept


def test_reasoning_texts():
    assert multi_reasoning(None, [G1, G2], [G1, G2], 0) == "2 targets: top left, bottom right."
    assert multi_reasoning(None, [G1], [G1], 0) == "Target at top left."
    assert multi_reasoning([G1], [G1, G2], [G1, G2], 1) == "Missing 1."
    assert multi_reasoning([G1, G2, [0, 0, 9, 9]], [G1, G2], [G1, G2], 1) == "1 extra."
    assert multi_reasoning([G1, [500, 500, 700, 700]], [G1, G2], [G1, G2], 1) == "Adjust 1."
    assert multi_reasoning([G2, G1], [G1, G2], [G1, G2], 2) == "Boxes fit. Keep them."
    texts = multi_teacher_texts([[G1], [G1, G2]], [G1, G2])
    assert texts[1] == "<think>Missing 1.</think> [[100, 100, 200, 200], [600, 600, 800, 800]]"
    assert [len(parse_boxes(t).boxes) for t in texts] == [1, 2]


@pytest.mark.parametrize("policy, kwargs, lo, hi", [
    ("oracle", {}, 0.95, 1.0),
    ("teacher", {}, 0.95, 1.0),
    ("random", {}, 0.0, 0.3),
])
def test_scripted_policies_on_the_multi_env(policy, kwargs, lo, hi):
    m = evaluate(make_policy(policy, **kwargs), "IVT-SyntheticMulti-v0", split="test", limit=40, steps=2)
    assert lo <= m["acc@0.5"] <= hi and m["format_rate"] == 1.0 and m["counts"]["n"] == 40
    if policy != "random":
        assert m["counts"]["exact"] == 1.0 and m["miou"] > 0.95
    else:
        assert m["counts"]["too_many"] > 0 and m["counts"]["too_few"] > 0


def test_copy_and_single_box_oracle():
    m = evaluate(make_policy("copy"), "IVT-SyntheticMulti-v0", split="test", limit=30, steps=2)
    assert m["stagnation_rate"] == 1.0 and m["counts"]["exact"] == 1.0
    one = evaluate(make_policy("oracle", max_boxes=1), "IVT-SyntheticMulti-v0", split="test", limit=60, steps=1)
    by = one["counts"]["by_gt_count"]
    assert by["1"]["acc@0.5"] == 1.0 and by["3"]["acc@0.5"] < 0.2 and one["counts"]["too_many"] == 0.0
    assert one["counts"]["too_few"] == pytest.approx(1 - by["1"]["n"] / 60)


def test_oracle_with_depths_earns_the_depth_reward():
    from ivt_env.make import make_env

    m = evaluate(make_policy("oracle", depth=True), make_env("IVT-SyntheticMulti-v0", split="test",
                                                                  max_refine_steps=1, reward_fn="depth"), limit=20)
    assert m["return_mean"] == 1.0


def test_multi_box_synthesis():
    syn = Synthesizer(SynthesizeConfig(env="IVT-SyntheticMulti-v0", split="val", iou_max=1.0, batch_size=4,
                                       keep_fitting=True))
    recs = syn.starts(list(range(8)))
    assert all(isinstance(r["box_norm"][0], list) and 0.0 <= r["iou"] <= 1.0 for r in recs)
    trajs = syn.trajectories(recs)
    assert len(trajs) == 8
    for t in trajs:
        assert t.meta["gt_boxes"] and t.steps[-1].iou > 0.9 and all(s.valid for s in t.steps)
        assert len(t.steps[-1].boxes_norm) == len(t.meta["gt_boxes"])
