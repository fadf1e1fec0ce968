"""JSONL round trips, images beside the file, and clear errors for bad records."""

import json

import numpy as np
import pytest

from rollouts.storage import TrajectoryFileError, load_trajectories, save_trajectories, trajectory_record
from rollouts.types import Step, Trajectory


def make_traj(sample_id="a/1", with_obs=False, member=0):
    rng = np.random.default_rng(0)
    steps = []
    for t in range(3):
        obs = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8) if with_obs else None
        steps.append(
            Step(t=t, text=f"<think>step {t}</think> [1, 2, 30, 40]", valid=t != 1, iou=0.25 * t, reward=float(t == 2),
                 box_norm=[1.0, 2.0, 30.0, 40.0], box=[0.1, 0.2, 3.0, 4.0], token_ids=[5, 6], logprobs=[-0.5, -1.0],
                 injected_ids=[1, 2, 3], observation=obs, extra={"k": t})
        )
    return Trajectory(sample_id=sample_id, dataset="synthetic", expression="the red ball", gt_box=[0.0, 1.0, 2.0, 3.0],
                      width=8, height=6, steps=steps, group_id=3, meta={"index": 7, "group_member": member})


def test_record_matches_to_dict():
    t = make_traj()
    assert trajectory_record(t) == t.to_dict()


def test_roundtrip(tmp_path):
    trajs = [make_traj("a"), make_traj("b", member=1)]
    p = save_trajectories(tmp_path / "sub" / "t.jsonl", trajs)
    lines = p.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["sample_id"] == "b"
    back = load_trajectories(p)
    assert back == trajs  # dataclass equality (observation excluded from compare)
    assert back[0].steps[2].logprobs == [-0.5, -1.0]
    assert not list((tmp_path / "sub").glob(".*tmp"))  # no temp files left behind


def test_images_beside(tmp_path):
    trajs = [make_traj("x/y z", with_obs=True)]
    p = save_trajectories(tmp_path / "run" / "t.jsonl", trajs, image_dir=tmp_path / "run" / "images")
    rec = json.loads(p.read_text())
    paths = [s["image_path"] for s in rec["steps"]]
    assert paths[0] == "images/000000_synthetic_x_y_z_g0_t0.png"
    assert "observation" not in rec["steps"][0]
    back = load_trajectories(p, load_images=True)
    for s_in, s_out in zip(trajs[0].steps, back[0].steps):
        np.testing.assert_array_equal(s_in.observation, s_out.observation)  # PNG is lossless
    # the folder can be moved as a whole
    (tmp_path / "run").rename(tmp_path / "moved")
    again = load_trajectories(tmp_path / "moved" / "t.jsonl", load_images=True)
    np.testing.assert_array_equal(again[0].steps[1].observation, trajs[0].steps[1].observation)


def test_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = json.dumps(make_traj().to_dict())
    p.write_text(good + "\n\n{not json\n")
    with pytest.raises(TrajectoryFileError, match=r"bad.jsonl:3: invalid JSON"):
        load_trajectories(p)
    d = make_traj().to_dict()
    del d["steps"][1]["iou"]
    p.write_text(json.dumps(d) + "\n")
    with pytest.raises(TrajectoryFileError, match=r"bad.jsonl:1: step 1 is missing field\(s\) \['iou'\]"):
        load_trajectories(p)
    d = make_traj().to_dict()
    d["colour"] = 1
    p.write_text(json.dumps(d) + "\n")
    with pytest.raises(TrajectoryFileError, match=r"bad.jsonl:1: unknown trajectory field\(s\) \['colour'\]"):
        load_trajectories(p)
    p.write_text("[1, 2]\n")
    with pytest.raises(TrajectoryFileError, match="expected a JSON object"):
        load_trajectories(p)
    with pytest.raises(TrajectoryFileError, match="no such trajectory file"):
        load_trajectories(tmp_path / "missing.jsonl")
    d = make_traj().to_dict()
    d["steps"][0]["image_path"] = "nope.png"
    p.write_text(json.dumps(d) + "\n")
    with pytest.raises(TrajectoryFileError, match="step 0 image not found"):
        load_trajectories(p, load_images=True)
