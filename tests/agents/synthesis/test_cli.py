"""Teacher-trajectory synthesis: stages, interpolation, the images each step saw, resume, ablation, policy students."""

import dataclasses
import json
import math

import numpy as np
import pytest

from ivt_env.datasets import load_dataset
from ivt_env.rendering import draw_box
from rollouts.storage import load_trajectories
from agents.synthesis import SynthesizeConfig, Synthesizer, main, read_jsonl, run
from agents.teacher.geometric import interpolate_boxes


def _iou_by_hand(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _gt_norm(s):
    return [math.floor(s.gt_box[0] * 1000 / s.width), math.floor(s.gt_box[1] * 1000 / s.height),
            math.floor(s.gt_box[2] * 1000 / s.width), math.floor(s.gt_box[3] * 1000 / s.height)]


def _cfg(tmp_path, **kw):
    base = dict(limit=24, batch_size=8, chunk_size=10, progress=False, out=str(tmp_path / "syn"))
    base.update(kw)
    return SynthesizeConfig(**base)


def test_stages_and_trajectories(tmp_path):
    cfg = _cfg(tmp_path, iou_max=0.5)
    summary = run(cfg)
    ds = load_dataset("synthetic", "train")
    starts = read_jsonl(tmp_path / "syn" / "starts.jsonl")
    assert [r["index"] for r in starts] == list(range(24))
    # the filter, recomputed by hand from each start box
    kept_ids = []
    for r in starts:
        s = ds[r["index"]]
        b = r["box_norm"]
        px = [b[0] * s.width / 1000, b[1] * s.height / 1000, b[2] * s.width / 1000, b[3] * s.height / 1000]
        v = _iou_by_hand(px, s.gt_box)
        assert r["iou"] == pytest.approx(v)
        want = "kept" if v <= 0.5 else "iou_above_max"
        assert r["stage"] == want
        if want == "kept":
            kept_ids.append(r["sample_id"])
    assert 0 < len(kept_ids) < 24
    assert summary["stages"] == {"answered": 24, "valid_start": 24, "iou_filter_kept": len(kept_ids),
                                 "trajectories": len(kept_ids)}
    assert summary["dropped"]["iou_above_max"] == 24 - len(kept_ids)

    trajs = load_trajectories(tmp_path / "syn" / "trajectories.jsonl", load_images=True)
    assert [t.sample_id for t in trajs] == kept_ids
    by_id = {r["sample_id"]: r for r in starts}
    for t in trajs:
        s = ds[t.meta["index"]]
        gt = _gt_norm(s)
        boxes = interpolate_boxes(by_id[t.sample_id]["box_norm"], gt, 2)
        assert [st.box_norm for st in t.steps] == boxes
        assert boxes[-1] == gt and t.steps[-1].iou > 0.9
        assert all(st.valid and st.text.startswith("<think>") for st in t.steps)
        # each step saw the image the student sees: the original, then the overlay of the previous box
        original = s.image()
        assert np.array_equal(t.steps[0].observation, original)
        for k in (1, 2):
            prev = t.steps[k - 1].box_norm
            px = (prev[0] * s.width / 1000, prev[1] * s.height / 1000, prev[2] * s.width / 1000, prev[3] * s.height / 1000)
            assert np.array_equal(t.steps[k].observation, draw_box(original, px))
    assert json.loads((tmp_path / "syn" / "summary.json").read_text())["samples"] == 24


def test_resume_skips_done_chunks_and_matches_a_clean_run(tmp_path):
    clean = _cfg(tmp_path, out=str(tmp_path / "clean"))
    run(clean)
    cfg = _cfg(tmp_path, out=str(tmp_path / "resumed"))
    run(dataclasses.replace(cfg, limit=10))  # "killed" after the first chunk
    shards = tmp_path / "resumed" / "shards"
    first = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    assert sorted(first) == ["start-000000000.jsonl", "traj-000000000.jsonl"]
    summary = run(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if p.name in first} == first  # not redone
    assert summary["samples"] == 24
    assert (tmp_path / "resumed" / "trajectories.jsonl").read_text() == (tmp_path / "clean" / "trajectories.jsonl").read_text()
    assert (tmp_path / "resumed" / "starts.jsonl").read_text() == (tmp_path / "clean" / "starts.jsonl").read_text()
    with pytest.raises(SystemExit, match="verbosity"):
        run(dataclasses.replace(cfg, verbosity=1))


def test_perturbed_start_ablation_bounds(tmp_path):
    cfg = _cfg(tmp_path, start="perturbed", iou_max=1.0, save_images=False)
    syn = Synthesizer(cfg)
    recs = syn.starts(range(30))
    ds = syn.dataset
    for r in recs:
        assert r["start"] == "perturbed" and r["stage"] == "kept"
        gt = _gt_norm(ds[r["index"]])
        w, h = gt[2] - gt[0], gt[3] - gt[1]
        b = r["box_norm"]
        # centre shift <= 0.5 side, each side scaled by [0.5, 1.5] (+1 unit of rounding; boxes near the border
        # are pushed inside the image, which can only move the centre towards it)
        assert 0.5 * w - 1 <= b[2] - b[0] <= 1.5 * w + 1 and 0.5 * h - 1 <= b[3] - b[1] <= 1.5 * h + 1
        inside = 0 < gt[0] - 0.75 * w and gt[2] + 0.75 * w < 1000 and 0 < gt[1] - 0.75 * h and gt[3] + 0.75 * h < 1000
        if inside:
            assert abs((b[0] + b[2]) / 2 - (gt[0] + gt[2]) / 2) <= 0.5 * w + 1
            assert abs((b[1] + b[3]) / 2 - (gt[1] + gt[3]) / 2) <= 0.5 * h + 1
    syn.close()


def test_policy_student_through_the_env(tmp_path):
    # an exact oracle answers every GT: IoU ~1 > 0.85, so the filter drops every sample
    cfg = _cfg(tmp_path, student="oracle", limit=8)
    summary = run(cfg)
    assert summary["stages"]["iou_filter_kept"] == 0 and summary["dropped"]["iou_above_max"] == 8
    starts = read_jsonl(tmp_path / "syn" / "starts.jsonl")
    assert all(r["start"] == "student" and r["valid"] and r["iou"] > 0.9 for r in starts)


def test_reasoner_sees_the_student_images_and_falls_back(tmp_path):
    seen = []

    def reasoner(images, expressions, prevs, news, gts, steps):
        seen.extend(zip([np.array(i) for i in images], prevs, steps))
        return ["" if t == 1 else f"vlm step {t}." for t in steps]

    cfg = _cfg(tmp_path, limit=6, save_images=False, iou_max=1.0)
    syn = Synthesizer(cfg, reasoner=reasoner)
    recs = syn.starts(range(6))
    trajs = syn.trajectories(recs)
    ds = syn.dataset
    assert len(trajs) == 6 and syn.fallbacks == 6  # every step-1 answer was empty
    for t in trajs:
        assert t.steps[0].text.startswith("<think>vlm step 0.</think>")
        assert not t.steps[1].text.startswith("<think>vlm")  # geometric fallback
        assert t.steps[2].text.startswith("<think>vlm step 2.</think>")
    for img, prev, step in seen:
        assert any(np.array_equal(img, tr.steps[step].observation) for tr in trajs)
        if step == 0:
            assert prev is None
    original = ds[0].image()
    assert any(np.array_equal(img, original) for img, _, s in seen if s == 0)
    syn.close()


def test_cli_help_and_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--iou-max" in capsys.readouterr().out
    assert main(["--limit", "5", "--out", str(tmp_path / "cli"), "--progress", "False"]) == 0
    assert (tmp_path / "cli" / "summary.json").is_file()


def test_vlm_teacher_and_student_plumbing(tmp_path):
    """A (random) tiny VLM as teacher: it is asked once per step with that step's image; its empty answers fall back
    to the geometric teacher. The same model as student answers through the env (garbage: every start invalid)."""
    from agents.policies.tiny import build_tiny_model
    from agents.synthesis.vlm_reasoner import VLMTeacher, clean_reasoning

    model = build_tiny_model(tmp_path / "tiny")
    teacher = VLMTeacher.from_config(str(model), max_new_tokens=4)
    calls = []
    orig = teacher.__call__

    def spy(images, *rest):
        calls.append(len(images))
        return orig(images, *rest)

    cfg = _cfg(tmp_path, limit=3, save_images=False, iou_max=1.0, teacher="vlm", teacher_model=str(model))
    syn = Synthesizer(cfg, reasoner=spy)
    trajs = syn.trajectories(syn.starts(range(3)))
    assert calls == [3, 3, 3]  # one batched query per step
    assert len(trajs) == 3 and all(st.valid for t in trajs for st in t.steps)
    assert syn.fallbacks == sum(1 for t in trajs for st in t.steps if st.extra["teacher"] == "geometric")
    syn.close()

    student_cfg = _cfg(tmp_path, limit=3, save_images=False, student="vlm",
                       student_kwargs={"model": str(model)}, out=str(tmp_path / "student"))
    summary = run(student_cfg)
    assert summary["samples"] == 3
    assert summary["stages"]["valid_start"] + summary["dropped"]["invalid_start"] == 3

    assert clean_reasoning("<think>The box [1, 2, 3, 4] is {\"bbox_2d\": [1,2,3,4]} too far left.</think>") == (
        "The box is too far left.")
    assert clean_reasoning("One. Two. Three is long", max_chars=10) == "One. Two."


def test_old_command_name_still_works():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-m", "rollouts.synthesize", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "python -m agents.synthesis" in out.stdout and "now `python -m agents.synthesis`" in out.stderr
