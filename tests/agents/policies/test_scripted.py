"""Scripted policies: unit behaviour on hand-made infos, and the issue's checks on IVT-Synthetic-v0 with T=2."""

import json
import random

import gymnasium as gym
import pytest

import ivt_env  # noqa: F401  (registers the env ids)
from agents.evaluate.metrics import compute_metrics, metrics_from_ious
from agents.policies import make_policy
from agents.policies.base import PolicyOutput, SamplingParams
from agents.policies.scripted import (
    CopyPolicy,
    InterpolatingTeacher,
    OraclePolicy,
    RandomPolicy,
    ReplayPolicy,
    valid_int_box,
)
from ivt_env.boxes import parse_box
from rollouts.collector import collect_groups
from rollouts.storage import save_trajectories
from agents.teacher.geometric import geometric_reasoning, interpolate_boxes

GREEDY = SamplingParams(greedy=True)
N_SAMPLES = 24


def synth():
    return gym.make("IVT-Synthetic-v0", split="test", max_refine_steps=2)


def run(policy, n=N_SAMPLES, group_size=1, **kw):
    return collect_groups(synth, policy, range(n), group_size, GREEDY, seed=0, num_envs=8, **kw)


def boxes_of(traj):
    return [list(parse_box(s.text).box) if parse_box(s.text).valid else None for s in traj.steps]


def fake(step, gt=(100, 200, 300, 400), sid="s1", member=0, max_steps=2, dataset="fake"):
    obs = {"step": step, "expression": "the red ball"}
    info = {"sample_id": sid, "dataset": dataset, "gt_box_norm": gt, "group_member": member, "max_steps": max_steps}
    return obs, info


def act(policy, step, histories=None, **kw):
    obs, info = fake(step, **kw)
    return policy.act([obs], [histories or []], [info], GREEDY)[0]


def test_valid_int_box_repairs():
    assert valid_int_box([5, 5, 5, 5]) == [5, 5, 6, 6]
    assert valid_int_box([1000, 1000, 1000, 1000]) == [999, 999, 1000, 1000]
    assert valid_int_box([300.4, 20.6, 100, -7]) == [100, 0, 300, 21]
    assert valid_int_box([0, 0, 2000, 10]) == [0, 0, 1000, 10]


# ------------------------------------------------------------------------------------------------ the checks
def test_oracle_without_noise_is_perfect_and_stagnates():
    m = compute_metrics(run(OraclePolicy()))
    assert m["acc@0.5"] == 1.0
    assert m["stagnation_rate"] == 1.0 and m["improve_rate"] == 0.0 and m["degradation_rate"] == 0.0
    assert m["format_rate"] == 1.0


def test_teacher_from_perturbed_start_always_improves():
    trajs = run(InterpolatingTeacher())
    m = compute_metrics(trajs)
    assert m["improve_rate"] == 1.0
    assert m["iou_step"][0] < m["iou_step"][1] < m["iou_step"][2]
    env = synth()
    for t in trajs:
        gt = list(env.unwrapped.dataset[t.meta["index"]].gt_box)
        from ivt_env.boxes import to_norm

        gt_norm = list(to_norm(gt, t.width, t.height))
        boxes = boxes_of(t)
        assert boxes == [list(map(float, b)) for b in interpolate_boxes(boxes[0], gt_norm, 2)]
        assert t.steps[0].iou <= 0.85 + 0.02  # start IoU capped (in [0, 1000] units; pixels differ by rounding)
        # step-1 reasoning is the geometric teacher's text about box 0 against the GT (rng=None picks are fixed at
        # verbosity 0, so the text is reproducible independently)
        want = geometric_reasoning(boxes[0], boxes[1], gt_norm, 1, t.expression, None, 0)
        assert t.steps[1].text == f"<think>{want}</think> [{', '.join(str(int(v)) for v in boxes[1])}]"


def test_copy_policy_stagnates():
    trajs = run(CopyPolicy())
    m = compute_metrics(trajs)
    assert m["stagnation_rate"] == 1.0
    assert m["iou_step"][0] == m["iou_step"][1] == m["iou_step"][2]
    assert m["acc@0.9"] < 1.0  # its step 0 is a noisy oracle by default, not the GT
    for t in trajs:
        assert boxes_of(t)[1] == boxes_of(t)[0] == boxes_of(t)[2]


def _my_iou(a, b):  # independent of ivt_env.boxes.iou
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_replay_reproduces_independent_metrics(tmp_path):
    env = synth()
    ds = env.unwrapped.dataset
    rng = random.Random(3)
    path = tmp_path / "texts.jsonl"
    expected_ious, expected_valid = [], []
    with open(path, "w") as f:
        for i in range(N_SAMPLES):
            s = ds[i]
            texts, ious, valids = [], [], []
            for t in range(3):
                if rng.random() < 0.15:
                    texts.append("I am not sure.")
                    ious.append(0.0)
                    valids.append(False)
                    continue
                # near the GT so the outcomes vary (random boxes would all score about 0 on small shapes)
                g = [s.gt_box[0] * 1000 / s.width, s.gt_box[1] * 1000 / s.height,
                     s.gt_box[2] * 1000 / s.width, s.gt_box[3] * 1000 / s.height]
                box = valid_int_box([v + rng.gauss(0, 60) for v in g])
                texts.append(f"<think>look</think> [{box[0]}, {box[1]}, {box[2]}, {box[3]}]")
                px = [box[0] * s.width / 1000, box[1] * s.height / 1000, box[2] * s.width / 1000, box[3] * s.height / 1000]
                ious.append(_my_iou(px, s.gt_box))
                valids.append(True)
            f.write(json.dumps({"sample_id": s.sample_id, "steps": texts}) + "\n")
            expected_ious.append(ious)
            expected_valid.append(valids)
    got = compute_metrics(run(ReplayPolicy(str(path))))
    want = metrics_from_ious(expected_ious, expected_valid, datasets=["synthetic"] * N_SAMPLES)
    assert 0 < got["improve_rate"] < 1 and 0 < got["degradation_rate"] < 1 and got["format_rate"] < 1
    for key in ("acc@0.5", "acc@0.7", "acc@0.9", "miou", "iou_step", "delta", "improve_rate", "stagnation_rate",
                "degradation_rate", "format_rate", "strata", "best_step", "by_dataset"):
        assert_close(got[key], want[key], key)


def assert_close(a, b, where):
    if isinstance(b, dict):
        assert set(a) == set(b), where
        for k in b:
            assert_close(a[k], b[k], f"{where}/{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}/{i}")
    elif b is None:
        assert a is None, where
    else:
        assert a == pytest.approx(b, abs=1e-9), where


def test_replay_of_stored_trajectories(tmp_path):
    trajs = run(RandomPolicy(invalid_rate=0.2), n=6)
    save_trajectories(tmp_path / "t.jsonl", trajs)
    again = run(make_policy("replay", path=str(tmp_path / "t.jsonl")), n=6)
    assert [s.text for t in again for s in t.steps] == [s.text for t in trajs for s in t.steps]
    assert [s.iou for t in again for s in t.steps] == [s.iou for t in trajs for s in t.steps]


# ------------------------------------------------------------------------------------------------------- unit level
def test_oracle_noise_and_seeding():
    exact = act(OraclePolicy(), 0)
    assert parse_box(exact.text).box == (100, 200, 300, 400) and exact.text.startswith("<think>")
    p = OraclePolicy(noise=20.0, seed=1)
    a0, a1 = act(p, 0), act(p, 1)
    assert a0.text != a1.text  # fresh noise per step
    assert act(OraclePolicy(noise=20.0, seed=1), 0).text == a0.text  # reproducible
    assert act(p, 0, member=1).text != a0.text  # group members differ
    keep = OraclePolicy(noise=20.0, resample=False, seed=1)
    assert act(keep, 0).text == act(keep, 2).text
    with pytest.raises(KeyError, match="gt_box_norm"):
        OraclePolicy().act([{"step": 0}], [[]], [{"sample_id": "x"}], GREEDY)


def test_random_policy():
    p = RandomPolicy(min_side=50, seed=0)
    for step in range(20):
        b = parse_box(act(p, step).text).box
        assert b is not None and b[2] - b[0] >= 50 and b[3] - b[1] >= 50
    assert not parse_box(act(RandomPolicy(invalid_rate=1.0), 0).text).valid
    with pytest.raises(ValueError, match="invalid_rate"):
        RandomPolicy(invalid_rate=2.0)


def test_copy_policy_inner_and_invalid_first():
    p = CopyPolicy(first="random", first_kwargs={"invalid_rate": 1.0})
    first = act(p, 0)
    assert act(p, 1, histories=[first]).text == first.text  # no box at step 0: the text is repeated verbatim
    p = CopyPolicy(first=OraclePolicy())
    first = act(p, 0)
    assert parse_box(act(p, 2, histories=[first, first]).text).box == (100, 200, 300, 400)
    with pytest.raises(ValueError, match="no step-0 history"):
        act(p, 1)


def test_teacher_starts():
    given = InterpolatingTeacher(start_boxes={"s1": [0, 0, 50, 50]})
    out0 = act(given, 0)
    assert parse_box(out0.text).box == (0, 0, 50, 50)
    assert out0.extra["plan"] == interpolate_boxes([0, 0, 50, 50], [100, 200, 300, 400], 2)
    assert parse_box(act(given, 2, histories=[out0, out0]).text).box == (100, 200, 300, 400)
    student = InterpolatingTeacher(start_policy="oracle", start_policy_kwargs={"noise": 30.0, "seed": 5})
    want = act(OraclePolicy(noise=30.0, seed=5), 0)
    assert parse_box(act(student, 0).text).box == parse_box(want.text).box
    assert parse_box(act(InterpolatingTeacher(steps=4), 0, max_steps=None).text).valid
    with pytest.raises(ValueError, match="refinement steps is unknown"):
        act(InterpolatingTeacher(), 0, max_steps=None)
    with pytest.raises(ValueError, match="no plan"):
        act(InterpolatingTeacher(), 1, histories=[PolicyOutput(text="[1, 2, 3, 4]")])


def test_teacher_perturbation_caps_iou_even_for_tiny_boxes():
    from ivt_env.boxes import iou

    t = InterpolatingTeacher(max_shift=0.01, max_scale=0.01)  # draws always overlap too much: the fallback shifts
    for gt in ([10, 10, 12, 12], [990, 100, 1000, 200], [0, 0, 1000, 1000]):
        start = t.perturbed_start([float(v) for v in gt], random.Random(0))
        assert start != gt
        assert iou(start, gt) <= 0.85 or gt == [0, 0, 1000, 1000]


def test_replay_errors(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"sample_id": "a", "steps": ["[1, 2, 3, 4]"]}\n{oops\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: invalid JSON"):
        ReplayPolicy(str(p))
    p.write_text('{"sample_id": "a", "steps": ["[1, 2, 3, 4]"]}\n\n{"sample_id": "b", "steps": [3]}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:3: step 0 must be a string"):
        ReplayPolicy(str(p))
    p.write_text('{"sample_id": "a", "steps": ["[1, 2, 3, 4]"]}\n')
    r = ReplayPolicy(str(p))
    with pytest.raises(KeyError, match=r"r.jsonl has no record for sample id 'zz'"):
        act(r, 0, sid="zz")
    with pytest.raises(ValueError, match=r"r.jsonl:1: the record of sample 'a' has 1 step texts, step 1"):
        act(r, 1, sid="a")
    with pytest.raises(FileNotFoundError):
        ReplayPolicy(str(tmp_path / "missing.jsonl"))


def test_replay_groups_cycle_records(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"sample_id": "a", "steps": ["[1, 1, 5, 5]"]}\n{"sample_id": "a", "steps": ["[2, 2, 6, 6]"]}\n')
    r = ReplayPolicy(str(p))
    assert [act(r, 0, sid="a", member=j).text for j in range(3)] == ["[1, 1, 5, 5]", "[2, 2, 6, 6]", "[1, 1, 5, 5]"]
    # the same id in two datasets of a mix: the record's "dataset" picks
    p.write_text('{"sample_id": "a", "dataset": "d1", "steps": ["[1, 1, 5, 5]"]}\n'
                 '{"sample_id": "a", "dataset": "d2", "steps": ["[2, 2, 6, 6]"]}\n')
    r = ReplayPolicy(str(p))
    assert act(r, 0, sid="a", dataset="d2").text == "[2, 2, 6, 6]"
    assert act(r, 0, sid="a", dataset="d1").text == "[1, 1, 5, 5]"


def test_make_policy_names_and_errors():
    assert isinstance(make_policy("oracle", noise=3.0), OraclePolicy)
    assert isinstance(make_policy("agents.policies.scripted:CopyPolicy"), CopyPolicy)
    assert isinstance(make_policy("agents.policies.scripted.RandomPolicy"), RandomPolicy)
    assert isinstance(make_policy("Teacher"), InterpolatingTeacher)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(TypeError, match="cannot build policy 'oracle'"):
        make_policy("oracle", colour=1)
    with pytest.raises(ValueError, match="needs model=PATH"):
        make_policy("vlm")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        make_policy("no_such_pkg.mod:Cls")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        make_policy("agents.policies.scripted:Nope")
    with pytest.raises(TypeError, match="without an act"):
        make_policy("collections:OrderedDict")
