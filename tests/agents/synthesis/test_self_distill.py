"""Self-distillation stop data (issue 14): hand-made rollouts relabelled, the env stops where the data stops, and
a model folder carries its stop marker to the evaluate CLI."""

import json

import pytest

from agents.synthesis.self_distill import build, distill, main, record_stop_marker, with_phrase
from rollouts.storage import load_trajectories, save_trajectories
from rollouts.types import Step, Trajectory


def _traj(sid, iou0, texts):
    steps = [Step(t=t, text=x, valid=True, iou=iou0 if t == 0 else 0.3, box_norm=[1.0, 2.0, 3.0, 4.0],
                  token_ids=[5, 6], logprobs=[-0.1, -0.2], image_path=f"images/{sid}_{t}.png")
             for t, x in enumerate(texts)]
    return Trajectory(sample_id=sid, dataset="synthetic", expression="the red square", gt_box=[0, 0, 10, 10],
                      width=128, height=128, steps=steps, meta={"index": 3, "group_member": 0, "iou": 1})


ANSWER = "<think>Target at left.</think> [100, 200, 300, 400]"
KEEP = "<think>Box fits. Keep it.</think>"


def test_fitting_answer_gets_the_phrase_and_stops_at_step_zero():
    d = distill(_traj("a", 0.62, [ANSWER, KEEP, KEEP]), fit_iou=0.5)
    assert [s.text for s in d.steps] == ["<think>Target at left. It fits.</think> [100, 200, 300, 400]"]
    st = d.steps[0]
    assert st.token_ids is None and st.logprobs is None and st.image_path is None and st.box_norm == [1, 2, 3, 4]
    assert d.meta == {"index": 3, "group_member": 0, "allow_stop": True, "stop_marker": "fits.", "start": "self",
                      "start_iou": 0.62, "fits": True}


def test_other_answers_keep_their_own_steps_up_to_the_marker():
    d = distill(_traj("b", 0.49, [ANSWER, KEEP, KEEP]), fit_iou=0.5)
    assert [s.text for s in d.steps] == [ANSWER, KEEP]  # "Box fits." holds the marker: the env ends it at step 1
    moved = "<think>Move right.</think> [110, 200, 310, 400]"
    d2 = distill(_traj("c", 0.1, [ANSWER, moved, KEEP]), fit_iou=0.5, max_steps=1)
    assert [s.text for s in d2.steps] == [ANSWER, moved] and not d2.meta["fits"]
    assert distill(_traj("d", 0.9, ["[1, 2, 3, 4]"]), fit_iou=0.5) is None  # no reasoning to put the phrase in
    bad = _traj("e", 0.9, [ANSWER])
    bad.steps[0].valid = False
    assert distill(bad, fit_iou=0.5) is None


def test_build_counts_and_refuses_a_phrase_without_the_marker():
    trajs = [_traj("a", 0.9, [ANSWER, KEEP]), _traj("b", 0.2, [ANSWER, KEEP]), _traj("c", 0.5, [ANSWER, KEEP])]
    out, summary = build(trajs, fit_iou=0.5)
    assert [len(t.steps) for t in out] == [1, 2, 1]
    assert summary["fits"] == 2 and summary["steps_hist"] == {1: 2, 2: 1} and summary["skipped"] == 0
    anchored, s2 = build(trajs, fit_iou=0.5, anchors=True)  # one box anchor after the one answer that does not fit
    assert [t.sample_id for t in anchored] == ["a", "b", "b", "c"] and s2["anchors"] == 1 and s2["fits"] == 2
    assert anchored[2].steps[0].extra == {"context_prefix": "<think>Target at left. It fits.</think>"}
    every, s3 = build(trajs, fit_iou=0.5, anchors="all")  # and the fitting ones' boxes without the phrase
    assert [len(t.steps) for t in every] == [1, 1, 2, 1, 1, 1] and s3["anchors"] == 3 and s3["fits"] == 2
    assert every[1].steps[0].text == ANSWER and every[1].steps[0].extra == {"context_prefix": "<think>Target at "
                                                                            "left.</think>"}
    assert with_phrase("<think>x.</think> [1, 2, 3, 4]", " Done.") == "<think>x. Done.</think> [1, 2, 3, 4]"
    with pytest.raises(ValueError, match="stop marker"):
        build(trajs, fit_iou=0.5, phrase=" Done.")


def test_the_env_replays_the_data_as_the_targets_say():
    """With stop_marker "fits.": the phrase ends the episode at step 0 with the step's own box; the model's keep
    text ends it at step 1 with the step-0 box carried."""
    import gymnasium as gym
    import ivt_env  # noqa: F401

    env = gym.make("IVT-Synthetic-v0", split="val", max_refine_steps=2, allow_stop=True, stop_marker="fits.")
    env.reset(seed=0)
    _, _, done, _, info = env.step(with_phrase(ANSWER))
    assert done and info["stopped"] and tuple(info["box_norm"]) == (100.0, 200.0, 300.0, 400.0)
    env.reset(seed=0)
    _, _, done, _, info = env.step(ANSWER)
    assert not done and not info["stopped"]
    _, _, done, _, info = env.step(KEEP)
    assert done and info["stopped"] and tuple(info["box_norm"]) == (100.0, 200.0, 300.0, 400.0)


def test_cli_writes_a_bc_folder_and_marks_a_model(tmp_path):
    save_trajectories(tmp_path / "roll" / "trajectories.jsonl",
                      [_traj("a", 0.8, [ANSWER, KEEP]), _traj("b", 0.3, [ANSWER, KEEP])])
    summary = main([str(tmp_path / "roll"), "--fit-iou", "0.75", "--out", str(tmp_path / "sd")])
    assert summary["n_out"] == 2 and summary["fits"] == 1
    back = load_trajectories(tmp_path / "sd" / "trajectories.jsonl")
    assert [len(t.steps) for t in back] == [1, 2] and "steps: 1" in (tmp_path / "sd" / "config.yaml").read_text()
    model = tmp_path / "model"
    model.mkdir()
    (model / "ivt_policy.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    main(["--write-marker", str(model)])
    from agents.policies.model_dir import recorded_stop_marker, with_recorded_stop_marker

    assert recorded_stop_marker(model) == "fits." and recorded_stop_marker(tmp_path) is None
    assert with_recorded_stop_marker({"allow_stop": True}, model) == {"allow_stop": True, "stop_marker": "fits."}
    assert with_recorded_stop_marker({"allow_stop": True, "stop_marker": "<stop>"}, model)["stop_marker"] == "<stop>"
    assert with_recorded_stop_marker({}, model) == {} and with_recorded_stop_marker({"allow_stop": True}, tmp_path) \
        == {"allow_stop": True}
    with pytest.raises(FileNotFoundError):
        record_stop_marker(tmp_path / "nothing")


def test_stop_token_targets_stop_after_the_first_fitting_step():
    from agents.synthesis.self_distill import distill_token

    moved = "<think>Move right.</think> [110, 200, 310, 400]"
    late = _traj("f", 0.3, [ANSWER, moved, KEEP])
    late.steps[1].iou, late.steps[2].iou = 0.8, 0.8  # the refinement fits: stop right after it
    d = distill_token(late, 0.5, "<|box_end|>")
    assert [s.text for s in d.steps] == [ANSWER, moved + "<|box_end|>"]
    assert d.meta["stop_decisions"] and d.meta["stop_step"] == 1 and not d.meta["fits"] and d.meta["allow_stop"]
    never = distill_token(_traj("g", 0.2, [ANSWER, KEEP, KEEP]), 0.5, "<|box_end|>")
    assert [s.text for s in never.steps] == [ANSWER, KEEP, KEEP] and never.meta["stop_step"] is None
    first = distill_token(_traj("h", 0.9, [ANSWER, KEEP]), 0.5, "<|box_end|>")
    assert [s.text for s in first.steps] == [ANSWER + "<|box_end|>"] and first.meta["fits"]
    out, summary = build([late, _traj("g", 0.2, [ANSWER, KEEP, KEEP]), _traj("h", 0.9, [ANSWER, KEEP])], 0.5,
                         token="<|box_end|>")
    assert summary["stops"] == 2 and summary["fits"] == 1 and summary["stop_marker"] == "<|box_end|>"
    with pytest.raises(ValueError, match="--anchors"):
        build([late], 0.5, anchors=True, token="<|box_end|>")
