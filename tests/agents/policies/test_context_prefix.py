"""A step's ``extra["context_prefix"]`` (self-distillation box anchors, issue 14): those leading generated tokens are
context, the rest of the step is the target."""

import dataclasses

import pytest

from agents.policies.vlm import VLMPolicy
from agents.synthesis.self_distill import anchor, distill
from rollouts.types import Step, Trajectory

from .conftest import rand_image

TEXT = "<think>Target at left.</think> [100, 200, 300, 400]"


@pytest.fixture(scope="module")
def policy(tiny_q3):
    return VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0)


def _traj(text, extra=None):
    st = Step(t=0, text=text, valid=True, iou=0.2, box_norm=[100.0, 200.0, 300.0, 400.0], extra=extra or {})
    st.observation = rand_image(3)
    return Trajectory(sample_id="s", dataset="synthetic", expression="the red square", gt_box=[0, 0, 10, 10],
                      width=64, height=64, steps=[st])


def test_anchor_labels_only_the_box(policy):
    tok = policy.tokenizer
    d = distill(_traj(TEXT), fit_iou=0.5)  # IoU 0.2: no fit, its own text
    a = anchor(d)
    assert a.steps[0].text == "<think>Target at left. It fits.</think> [100, 200, 300, 400]"
    assert a.steps[0].extra == {"context_prefix": "<think>Target at left. It fits.</think>"} and a.meta["anchor"]
    a.steps[0].observation = rand_image(3)
    full = policy.encode_trajectory(dataclasses.replace(a, steps=[dataclasses.replace(a.steps[0], extra={})]))
    enc = policy.encode_trajectory(a)
    box_ids = tok(" [100, 200, 300, 400]", add_special_tokens=False)["input_ids"]
    all_ids = tok(a.steps[0].text, add_special_tokens=False)["input_ids"]
    assert int((full.labels != -100).sum()) == len(all_ids)
    assert enc.labels[enc.labels != -100].tolist() == box_ids
    assert enc.input_ids.tolist() == full.input_ids.tolist()  # the same sequence: only the targets differ


def test_a_prefix_that_is_not_the_text_start_is_refused(policy):
    with pytest.raises(ValueError, match="context_prefix"):
        policy.encode_trajectory(_traj(TEXT, {"context_prefix": "<think>Target at right.</think>"}))
