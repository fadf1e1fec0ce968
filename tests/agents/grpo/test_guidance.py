"""Teacher guidance (DAgger-style targets on the policy's own refinement states) and its loss in the GRPO update."""

import doctest

import pytest
import torch

import agents.grpo.guidance as guidance
from agents.grpo.guidance import guidance_trajectories, teacher_refinement
from agents.grpo.update import policy_update
from agents.policies.base import BCLossOptions
from agents.policies.vlm import VLMPolicy
from rollouts.types import Step, Trajectory
from tests.agents.policies.conftest import rand_image, tiny_q3  # noqa: F401  (session fixture)


def test_docstring_examples():
    result = doctest.testmod(guidance)
    assert result.attempted >= 2 and result.failed == 0


def test_teacher_refinement_by_hand():
    gt = [200, 200, 400, 400]
    # IoU([200,200,400,410], gt) = 200*200 / (200*210) = 0.952 >= 0.85: kept exactly, "Box fits. Keep it."
    text, box = teacher_refinement([200, 200, 400, 410], gt, 1, 2, "the square")
    assert box == [200, 200, 400, 410] and text == "<think>Box fits. Keep it.</think> [200, 200, 400, 410]"
    # off by 100 to the left with 2 steps left: half way, (100 + 200) / 2 = 150 and (300 + 400) / 2 = 350
    _, box = teacher_refinement([100, 200, 300, 400], gt, 1, 2, "the square")
    assert box == [150, 200, 350, 400]
    # last step: straight to the GT; no valid red box: the GT, with the "No red box" reasoning
    assert teacher_refinement([100, 200, 300, 400], gt, 2, 1, "x")[1] == gt
    text, box = teacher_refinement(None, gt, 1, 2, "x")
    assert box == gt and text.startswith("<think>No red box.")
    with pytest.raises(ValueError, match="remaining"):
        teacher_refinement(None, gt, 1, 0, "x")


def _traj(first_ids, second_ids, boxes, sid="s0"):
    """128x128 image, GT [25.6, 25.6, 51.2, 51.2] px = [200, 200, 400, 400] of 1000; three steps with token ids."""
    steps = []
    for t, (ids, b) in enumerate(zip([first_ids, second_ids, [9]], boxes)):
        steps.append(Step(t, f"<think>x</think> [{b[0]}, {b[1]}, {b[2]}, {b[3]}]", True, 0.5, box_norm=list(b),
                          box=[v * 0.128 for v in b], token_ids=list(ids), logprobs=[-1.0] * len(ids), temperature=0.7,
                          observation=rand_image(t)))
    return Trajectory(sid, "synthetic", "the square", [25.6, 25.6, 51.2, 51.2], 128, 128, steps=steps)


def test_guidance_sequences_dedupe_siblings_and_keep_the_prefix():
    fit, off = [200, 200, 400, 410], [100, 200, 300, 400]
    a = _traj([1, 2], [3], [fit, off, off])
    b = _traj([1, 2], [4], [fit, fit, off])  # sibling of a: same step 0, another step 1
    out = guidance_trajectories([a, b])
    # states: (a: step 1 after step 0), (a: step 2), (b: step 2); b's step-1 state is a's (same step-0 tokens)
    assert [len(g.steps) for g in out] == [2, 3, 3]
    assert out[0].steps[0] is a.steps[0] and out[1].steps[:2] == a.steps[:2]
    assert out[0].steps[1].text == "<think>Box fits. Keep it.</think> [200, 200, 400, 410]"
    assert out[1].steps[2].text.endswith("[200, 200, 400, 400]")  # a's step 1 was off, 1 step left: the GT
    assert out[2].steps[2].text.endswith("[200, 200, 400, 410]")  # b's step 1 fits: kept
    last = out[0].steps[1]
    assert last.token_ids is None and last.logprobs is None and last.temperature is None
    assert last.observation is a.steps[1].observation and last.injected_ids == a.steps[1].injected_ids
    assert a.steps[1].text == "<think>x</think> [100, 200, 300, 400]"  # the collected trajectory is untouched
    fit_only = guidance_trajectories([a, b], states="fit")  # a's step-2 state (its step 1 is off) is left out
    assert [g.steps[-1].text for g in fit_only] == [out[0].steps[1].text, out[2].steps[2].text]
    with pytest.raises(ValueError, match="guidance states"):
        guidance_trajectories([a], states="some")
    keep = guidance_trajectories([a, b], states="fit", keep_marker="Keep it.")  # keeps answer with the marker
    assert [g.steps[-1].text for g in keep] == ["<think>Box fits. Keep it.</think>"] * 2
    assert keep[0].steps[-1].box_norm == [200.0, 200.0, 400.0, 410.0]  # the box the env carries
    moves = guidance_trajectories([a], keep_marker="Keep it.")  # a move still writes its box
    assert moves[1].steps[2].text.endswith("[200, 200, 400, 400]")


def test_last_step_only_loss_equals_the_teacher_forced_logprobs_of_the_last_step(tiny_q3):  # noqa: F811
    pol = VLMPolicy.from_pretrained(tiny_q3, device="cpu")
    a = _traj([1, 2], [3], [[200, 200, 400, 410], [100, 200, 300, 400], [100, 200, 300, 400]])
    a.meta["image"] = rand_image(0)
    for s in a.steps:
        s.observation = None  # rendered from meta["image"] and the boxes, as for teacher data
    g = guidance_trajectories([a])[1]  # steps 0, 1 (the policy's ids), 2 (the teacher's text)
    with torch.no_grad():
        loss, n = pol.bc_loss([g], BCLossOptions(last_step_only=True))
        tl = pol.token_logprobs([g], grad=False)  # independent route: every generated token, then the last step's
    n_last = len(pol.layout.text_ids(g.steps[2].text))
    assert n == n_last
    lp = tl.logprobs[0, int(tl.mask[0].sum()) - n_last: int(tl.mask[0].sum())]
    assert loss.item() == pytest.approx(float(-lp.mean()), abs=1e-5)


def test_update_with_only_guidance_moves_the_weights_by_the_guidance_gradient(tiny_q3):  # noqa: F811
    """Zero advantages, no KL, no entropy: one SGD step (lr 1, no clipping) moves the weights by exactly
    -coef * grad of the last-step cross-entropy (computed separately)."""
    a = _traj([1, 2], [3], [[200, 200, 400, 410], [100, 200, 300, 400], [100, 200, 300, 400]])
    a.meta["image"] = rand_image(0)
    for s in a.steps:
        s.observation = None
    guide = guidance_trajectories([a])
    pol = VLMPolicy.from_pretrained(tiny_q3, full_finetune=True, device="cpu", reference="none")
    params = list(pol.trainable_parameters())
    pol.hf_model.zero_grad()
    loss, _ = pol.bc_loss(guide, BCLossOptions(last_step_only=True))
    (0.5 * loss).backward()
    expected = [p.detach() - p.grad for p in params]
    pol.hf_model.zero_grad()
    opt = torch.optim.SGD(params, lr=1.0)
    stats = policy_update(pol, opt, [a], torch.zeros(1), beta=0.0, entropy_coef=0.0, max_grad_norm=0.0,
                          guide=guide, guide_coef=0.5)
    assert stats.guide_loss == pytest.approx(float(loss), rel=1e-5) and not stats.skipped
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, atol=1e-6)
