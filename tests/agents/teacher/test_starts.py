"""The scripted student's error modes (wrong object, close answer, broad jitter) and the teacher's keep action: a
fitting box is kept by words (no box), and the env carries that box exactly."""

import math
import random
from types import SimpleNamespace

import pytest

from agents.synthesis.synthesizer import SynthesizeConfig, Synthesizer
from agents.teacher.geometric import FIT_IOU
from agents.teacher.starts import ScriptedStudentConfig, _clip_box, scripted_student_box
from ivt_env.boxes import iou

# a 1000 x 1000 image, so pixel and normalised boxes coincide; one distractor object
SAMPLE = SimpleNamespace(gt_box=[300, 300, 500, 560], width=1000, height=1000,
                         meta={"objects": [{"box": [300, 300, 500, 560]}, {"box": [700, 100, 900, 300]}], "target": 0})


def _gt_norm(traj):
    from ivt_env.boxes import to_norm
    return list(to_norm(traj.gt_box, traj.width, traj.height))


def _old_student(sample, rng, cfg):
    """The student before close answers existed, written out: one draw picks wrong vs broad jitter."""
    def jitter(b, ss, sc):
        w, h = b[2] - b[0], b[3] - b[1]
        cx = (b[0] + b[2]) / 2 + rng.gauss(0.0, ss) * w
        cy = (b[1] + b[3]) / 2 + rng.gauss(0.0, ss) * h
        return _clip_box(cx, cy, w * math.exp(rng.gauss(0.0, sc)), h * math.exp(rng.gauss(0.0, sc)))
    if rng.random() < cfg.p_wrong:
        return jitter(rng.choice([[700, 100, 900, 300]]), cfg.shift_sigma / 2, cfg.scale_sigma / 2)
    return jitter([300, 300, 500, 560], cfg.shift_sigma, cfg.scale_sigma)


def test_without_close_answers_the_student_draws_exactly_as_before():
    cfg = ScriptedStudentConfig()
    a, b = random.Random(7), random.Random(7)
    assert [scripted_student_box(SAMPLE, a, cfg) for _ in range(300)] == [_old_student(SAMPLE, b, cfg) for _ in range(300)]


def test_close_answers_often_fit_and_broad_ones_rarely_do():
    rng = random.Random(0)
    gt = SAMPLE.gt_box
    close = [iou(scripted_student_box(SAMPLE, rng, ScriptedStudentConfig(p_wrong=0.0, p_close=1.0)), gt) for _ in range(2000)]
    broad = [iou(scripted_student_box(SAMPLE, rng, ScriptedStudentConfig(p_wrong=0.0)), gt) for _ in range(2000)]
    wrong = [iou(scripted_student_box(SAMPLE, rng, ScriptedStudentConfig(p_wrong=1.0)), gt) for _ in range(200)]
    share = lambda xs: sum(x >= FIT_IOU for x in xs) / len(xs)  # noqa: E731
    assert 0.35 < share(close) < 0.52 and min(close) > 0.5  # sigma 0.05 / 0.06: ~44% fit, none far off
    assert share(broad) < 0.02  # sigma 0.2 / 0.25: ~0.5% fit
    assert max(wrong) == 0.0  # the distractor does not overlap the target


@pytest.mark.parametrize("kw, bad", [({"p_close": 1.5}, "scripted.p_close"), ({"p_wrong": 0.6, "p_close": 0.5}, r"p_wrong \+ scripted.p_close must be at most 1")])
def test_bad_student_probabilities_are_refused(kw, bad):
    with pytest.raises(ValueError, match=bad):
        ScriptedStudentConfig(**kw)


@pytest.mark.parametrize("keep_iou", [FIT_IOU, 0.75])
def test_teacher_keeps_a_fitting_box_by_words_and_the_env_carries_it(keep_iou):
    cfg = SynthesizeConfig(split="val", steps=2, iou_max=1.0, keep_fitting=True, keep_marker="Keep it.", batch_size=8,
                           keep_iou=keep_iou, scripted=ScriptedStudentConfig(p_wrong=0.0, p_close=1.0),
                           save_images=False, progress=False)
    syn = Synthesizer(cfg)
    try:
        trajs = syn.trajectories(syn.starts(list(range(16))), keep_observations=False)
    finally:
        syn.close()
    kept = 0
    for t in trajs:
        plan = t.meta["planned_boxes"]
        if iou(plan[0], _gt_norm(t)) >= keep_iou:  # a good-enough start is held from step 1
            assert plan[1] == plan[0] and plan[2] == plan[0]
        for k in (1, 2):
            if plan[k] == plan[k - 1]:  # the teacher holds a fitting box: words, no box, the box carried exactly
                kept += 1
                assert t.steps[k].text == "<think>Box fits. Keep it.</think>"
                assert t.steps[k].box == t.steps[k - 1].box and t.steps[k].iou == t.steps[k - 1].iou
            else:
                assert t.steps[k].text.endswith("]") and "Keep it." not in t.steps[k].text
    assert kept >= (6 if keep_iou == FIT_IOU else 20)  # 44% (91%) of close starts reach 0.85 (0.75) at step 0
