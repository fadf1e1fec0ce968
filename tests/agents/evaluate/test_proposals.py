"""Refining another model's boxes: the proposals JSONL (clear one-line errors naming file and line), and the
evaluation end to end on the synthetic env (each trajectory starts from its proposal; metrics compare them)."""

import json

import gymnasium as gym
import pytest

import ivt_env
from agents.evaluate import evaluate
from agents.evaluate.core import main
from agents.evaluate.proposals import ProposalError, load_proposals, reset_options_for


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, match", [
    ("{not json", "p.jsonl:2: invalid JSON"),
    ("[1, 2]", "p.jsonl:2: expected an object"),
    ('{"box": [0, 0, 5, 5]}', "p.jsonl:2: 'sample_id'"),
    ('{"sample_id": "b"}', "p.jsonl:2: no 'box'"),
    ('{"sample_id": "b", "box": [0, 0, 5]}', "p.jsonl:2: 'box' must be"),
    ('{"sample_id": "b", "box": [5, 0, 1, 5]}', "p.jsonl:2: 'box' needs x2 > x1"),
    ('{"sample_id": "a", "box": [0, 0, 5, 5]}', "p.jsonl:2: sample 'a' has a proposal already"),
])
def test_bad_records_name_file_and_line(tmp_path, line, match):
    path = _write(tmp_path / "p.jsonl", ['{"sample_id": "a", "box": [0, 0, 5, 5]}', line])
    with pytest.raises(ProposalError, match=match) as e:
        load_proposals(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_sample_ids_are_named():
    with pytest.raises(ProposalError, match=r"p.jsonl: no proposal for sample id 'c' \(and 1 more"):
        reset_options_for({"a": [0, 0, 1, 1]}, ["a", "c", "d"], "p.jsonl")
    assert reset_options_for({"a": [0, 0, 1, 1]}, ["a"]) == {0: {"start_box": [0, 0, 1, 1]}}


def _proposals(tmp_path, n, skip=()):
    ds = gym.make("IVT-Synthetic-v0", split="test").unwrapped.dataset
    lines, boxes = [], []
    for i in range(n):
        s = ds[i]
        box = [0.0, 0.0, s.width / 2, s.height / 2]  # the top-left quarter of each image
        boxes.append(ivt_env.iou(box, s.gt_box))
        if i not in skip:
            lines.append(json.dumps({"sample_id": s.sample_id, "box": box}))
    return _write(tmp_path / "proposals.jsonl", lines), boxes


def test_evaluate_refines_the_proposals(tmp_path):
    path, start_ious = _proposals(tmp_path, 4)
    m = evaluate("oracle", "IVT-Synthetic-v0", split="test", limit=4, steps=2, proposals=str(path), num_envs=2,
                 env_kwargs={"allow_stop": True}, out_dir=tmp_path / "out", num_strips=1)
    assert m["iou_step"][0] == pytest.approx(sum(start_ious) / 4)  # step 0 = the proposals
    p = m["proposals"]
    assert p["proposal"]["miou"] == pytest.approx(sum(start_ious) / 4) and p["refined"]["acc@0.5"] == 1.0
    assert m["refine_steps_mean"] == 2.0 and m["meta"]["proposals"] == str(path)  # the oracle never stops
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["proposals"]["n"] == 4 and "Proposals (step 0) -> refined" in m["report"]


def test_cli_with_teacher_stopping_and_a_missing_proposal(tmp_path):
    path, _ = _proposals(tmp_path, 3)
    out = main(["--policy", "teacher", "--limit", "3", "--proposals", str(path), "--allow-stop", "--no-progress",
                "--out", str(tmp_path / "cli"), "--strips", "0"])
    assert out["n"] == 3 and out["refine_steps_mean"] <= 2 and "by_steps_used" in out
    assert "Adaptive refinement: steps used" in (tmp_path / "cli" / "metrics.md").read_text()
    bad, _ = _proposals(tmp_path, 3, skip=(1,))
    with pytest.raises(ProposalError, match="proposals.jsonl: no proposal for sample id"):
        main(["--policy", "oracle", "--limit", "3", "--proposals", str(bad), "--no-progress"])


def test_refining_proposals_on_the_refcocog_layout(tmp_path):
    """The real-data path: a RefCOCOg folder in its upstream refer layout (test fixture), proposals by the loader's
    sample ids (a box shifted off each GT, as another model's answers), the scripted teacher refines and stops."""
    from tests.ivt_env.datasets.fixtures import write_refcocog_refer

    root = write_refcocog_refer(str(tmp_path / "data"))
    ds = gym.make("IVT-RefCOCOg-v0", data_root=root, split="val").unwrapped.dataset
    lines = []
    for i in range(len(ds)):
        s = ds[i]
        x1, y1, x2, y2 = s.gt_box
        lines.append(json.dumps({"sample_id": s.sample_id, "box": [x1 + 2, y1 + 1, x2 + 2, y2 + 1]}))
    path = _write(tmp_path / "refcocog_proposals.jsonl", lines)
    m = evaluate("teacher", "IVT-RefCOCOg-v0", split="val", steps=2, proposals=str(path), data_root=root,
                 env_kwargs={"allow_stop": True}, num_strips=0)
    assert m["n"] == len(ds) and m["proposals"]["n"] == len(ds)
    assert m["proposals"]["refined"]["miou"] >= m["proposals"]["proposal"]["miou"] - 1e-9
    assert 1.0 <= m["refine_steps_mean"] <= 2.0  # refinement starts at step 1; the teacher stops once it fits
