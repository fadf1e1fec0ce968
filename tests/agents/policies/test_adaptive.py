"""Adaptive refinement in the VLM policy: rows whose episode stopped leave the engine's batch (later forwards run on
the remaining rows only, with the same tokens), the step-0 question carries the stop hint only when the env allows
stopping, and episodes that start from a given box encode that box as step 0's answer."""

import gymnasium as gym
import pytest

import ivt_env  # noqa: F401
from agents.policies.base import SamplingParams
from agents.policies.vlm import VLMPolicy
from rollouts.collector import collect_groups

from .conftest import rand_image

GREEDY = SamplingParams(greedy=True, max_new_tokens=10)


@pytest.fixture(scope="module")
def policy(tiny_q3):
    return VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0)


def _obs(step, k):
    return {"image": rand_image(k), "expression": f"the shape {k}", "step": step}


def _count_rows(policy, monkeypatch):
    rows = []
    forward = policy.engine._forward

    def counting(ids, *a, **kw):
        rows.append(int(ids.shape[0]))
        return forward(ids, *a, **kw)

    monkeypatch.setattr(policy.engine, "_forward", counting)
    return rows


def test_stopped_rows_leave_the_batch(policy, monkeypatch):
    infos = [{"allow_stop": True} for _ in range(4)]
    out0 = policy.act([_obs(0, k) for k in range(4)], [[] for _ in range(4)], infos, GREEDY)
    full = policy.act([_obs(1, 10 + k) for k in range(4)], [[o] for o in out0], infos, GREEDY)  # nobody stopped
    out0 = policy.act([_obs(0, k) for k in range(4)], [[] for _ in range(4)], infos, GREEDY)
    rows = _count_rows(policy, monkeypatch)
    keep = [0, 2]  # rows 1 and 3 stopped at step 0
    part = policy.act([_obs(1, 10 + k) for k in keep], [[out0[k]] for k in keep], [infos[k] for k in keep], GREEDY)
    assert rows and set(rows) == {2}  # every forward of step 1 ran on the 2 running rows only
    assert len(policy.engine.rows) == 2
    assert [o.token_ids for o in part] == [full[k].token_ids for k in keep]  # same tokens as in the full batch
    rows.clear()
    policy.act([_obs(2, 20)], [[out0[2], part[1]]], [infos[2]], GREEDY)  # row 0 stopped at step 1
    assert set(rows) == {1}
    with pytest.raises(ValueError, match="do not continue"):
        policy.act([_obs(1, 0)], [[out0[0]]], [infos[0]], GREEDY)  # not a running row's output


def test_stop_hint_only_when_the_env_allows_stopping(policy):
    hint = policy.prompts.stop_hint
    assert hint and hint not in policy.layout.question_text("x") and policy.layout.question_text("x", True).endswith(hint)
    out = policy.act([_obs(0, 0)], [[]], [{"allow_stop": True}], GREEDY)
    plain = policy.act([_obs(0, 0)], [[]], [{}], GREEDY)
    assert len(out[0].injected_ids) > len(plain[0].injected_ids)


def test_episodes_from_a_start_box(policy):
    env_fn = lambda: gym.make("IVT-Synthetic-v0", split="val", max_refine_steps=2)  # noqa: E731
    trajs = collect_groups(env_fn, policy, [0, 1], sampling=GREEDY, num_envs=2, keep_observations=True,
                           reset_options={0: {"start_box": [10, 10, 60, 60]}, 1: {"start_box": [0, 0, 128, 128]}})
    assert [len(t.steps) for t in trajs] == [3, 3]
    first = trajs[0].steps[0]
    assert first.extra["start_box"] and first.text == "[78, 78, 468, 468]" and first.token_ids is None
    assert trajs[1].steps[0].text == "[0, 0, 1000, 1000]" and trajs[0].meta["start_box"] == [10.0, 10.0, 60.0, 60.0]
    row = policy.engine.rows[0].steps[0]  # the engine holds the given text as step 0's answer
    assert row.stop == "given" and policy.tokenizer.decode(row.token_ids) == first.text
    enc = policy.encode_trajectory(trajs[0])  # the given step 0 is context: only the refinements are labelled
    assert int((enc.labels != -100).sum()) == sum(len(s.token_ids) for s in trajs[0].steps[1:])


def test_bc_loss_on_trajectories_of_different_lengths(policy):
    """Behaviour cloning takes episodes of different lengths: the batch loss is the token-weighted mean of the
    trajectories' own losses (teacher_forced pads each sequence; nothing assumes T + 1 steps)."""
    from agents.policies.scripted import InterpolatingTeacher

    env_fn = lambda: gym.make("IVT-Synthetic-Adaptive-v0", split="val")  # noqa: E731
    trajs = collect_groups(env_fn, InterpolatingTeacher(stop_iou=0.4), range(8), keep_observations=True)
    lengths = [len(t.steps) for t in trajs]
    assert len(set(lengths)) > 1, lengths
    loss, n = policy.bc_loss(trajs)
    parts = [policy.bc_loss([t]) for t in trajs]
    assert n == sum(k for _, k in parts)
    assert float(loss) == pytest.approx(sum(float(l) * k for l, k in parts) / n, rel=1e-4)
