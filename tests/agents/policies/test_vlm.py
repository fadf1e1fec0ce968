"""VLMPolicy end to end: env episodes, token-in/token-out trajectories, training sequences, log-probs, BC loss."""

import copy
import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

import ivt_env  # noqa: F401  (registers the env ids)
from agents.policies.base import SamplingParams
from agents.policies.logprobs import IGNORE, trajectory_images
from agents.policies.vlm import VLMPolicy
from rollouts.collector import collect_groups
from rollouts.types import Step, Trajectory

from .conftest import rand_image


def env_fn():
    return gym.make("IVT-Synthetic-v0", max_refine_steps=2)


@pytest.fixture(scope="module")
def policy(tiny_q3):
    return VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0)


@pytest.fixture(scope="module")
def trajs(policy):
    return collect_groups(env_fn, policy, [0, 1], group_size=3, sampling=SamplingParams(max_new_tokens=24), seed=0,
                          keep_observations=True)


def test_episode_through_env(trajs, policy):
    assert len(trajs) == 6
    tok = policy.tokenizer
    for tr in trajs:
        assert len(tr.steps) == 3 and tr.has_tokens
        for st in tr.steps:
            assert len(st.token_ids) == len(st.logprobs) >= 1
            assert all(np.isfinite(st.logprobs)) and all(lp <= 0 for lp in st.logprobs)
            assert st.text == tok.decode(st.token_ids, skip_special_tokens=True)
            assert st.extra["stop"] in ("box", "eos", "length")
            assert st.injected_ids.count(policy.layout.image_token_id) == 16
        assert tok.decode(tr.steps[0].injected_ids).endswith("<|im_start|>assistant\n")
        assert tr.expression in tok.decode(tr.steps[0].injected_ids)
        assert tok.decode(tr.steps[1].injected_ids).endswith(policy.prompts.refine_instruction + "\n")
    # one group shares its prompt (same injected ids at step 0), groups differ
    assert trajs[0].steps[0].injected_ids == trajs[2].steps[0].injected_ids != trajs[3].steps[0].injected_ids


def test_token_logprobs_equal_rollout_logprobs(trajs, policy):
    tl = policy.token_logprobs(trajs, grad=False)
    for i, tr in enumerate(trajs):
        want = torch.tensor([x for st in tr.steps for x in st.logprobs])
        assert int(tl.mask[i].sum()) == len(want)
        assert torch.allclose(tl.logprobs[i][tl.mask[i]], want, atol=1e-4)
        assert bool((tl.entropy[i][tl.mask[i]] > 0).all())
    assert not tl.logprobs.requires_grad
    # entropy of a position equals the entropy computed by hand from the full distribution
    enc = policy.encode_trajectory(trajs[0])
    with torch.no_grad():
        out = policy.hf_model(
            input_ids=enc.input_ids[None], pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
            mm_token_type_ids=enc.mm_token_type_ids[None],
        )
    j = int((enc.labels != IGNORE).nonzero()[0])
    p = torch.softmax(policy.logit_filter(out.logits[0, j - 1]), -1)
    assert torch.allclose(tl.entropy[0, 0], -(p * p.clamp_min(1e-30).log()).sum(), atol=1e-4)


def test_tokens_are_scored_at_their_sampling_temperature(policy):
    """Tokens sampled at T: stored log-probs == log_softmax(logits / T) of the chosen ids (an independent full
    forward, no cache), == the teacher-forced ones (policy and reference), and the entropy is that distribution's."""
    sampling = SamplingParams(temperature_first=1.3, temperature_refine=0.5, max_new_tokens=16)
    trajs = collect_groups(env_fn, policy, [3], group_size=2, sampling=sampling, seed=1, keep_observations=True)
    tl = policy.token_logprobs(trajs, grad=False)
    ref = policy.token_logprobs(trajs, reference=True)
    for i, tr in enumerate(trajs):
        assert [st.temperature for st in tr.steps] == [1.3, 0.5, 0.5]
        enc = policy.encode_trajectory(tr)
        with torch.no_grad():
            logits = policy.hf_model(
                input_ids=enc.input_ids[None], pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
                mm_token_type_ids=enc.mm_token_type_ids[None],
            ).logits[0]
        pos = (enc.labels != IGNORE).nonzero().flatten()
        T = torch.tensor([tr.steps[int(enc.step_index[j])].temperature for j in pos])  # (n,)
        logp = torch.log_softmax(policy.logit_filter(logits[pos - 1]) / T[:, None], -1)  # (n, V)
        want = logp.gather(1, enc.input_ids[pos][:, None]).squeeze(1)
        stored = torch.tensor([x for st in tr.steps for x in st.logprobs])
        assert torch.allclose(stored, want, atol=1e-4), (stored - want).abs().max()
        assert torch.allclose(tl.logprobs[i][tl.mask[i]], want, atol=1e-4)
        assert torch.allclose(ref.logprobs[i][ref.mask[i]], want, atol=1e-4)
        assert torch.allclose(tl.entropy[i][tl.mask[i]], -(logp.exp() * logp).sum(-1), atol=1e-4)
        # the temperature-1 scores differ (the old, biased scoring)
        t1 = torch.log_softmax(policy.logit_filter(logits[pos - 1]), -1).gather(1, enc.input_ids[pos][:, None])
        assert (t1.squeeze(1) - want).abs().max() > 1e-2
    greedy = collect_groups(env_fn, policy, [3], sampling=SamplingParams(greedy=True, max_new_tokens=16))
    assert [st.temperature for st in greedy[0].steps] == [1.0, 1.0, 1.0]  # greedy decoding scores at 1


def test_encode_trajectory_labels(trajs, policy):
    for tr in trajs:
        enc = policy.encode_trajectory(tr)
        want_ids, want_labels = [], []
        for st in tr.steps:
            want_ids += st.injected_ids + st.token_ids
            want_labels += [IGNORE] * len(st.injected_ids) + st.token_ids
        assert enc.input_ids.tolist() == want_ids  # exactly the ids the policy produced at inference
        assert enc.labels.tolist() == want_labels  # every injected token -100, nothing generated masked
        assert enc.n_generated == sum(len(st.token_ids) for st in tr.steps)
        assert enc.image_grid_thw.shape == (3, 3)
        assert int(enc.mm_token_type_ids.sum()) == 3 * 16


def strip_to_texts(tr):
    """A teacher-style copy: texts only, no ids, no observations; the original image in meta."""
    t = copy.deepcopy(tr)
    t.meta = dict(t.meta, image=tr.steps[0].observation)
    for st in t.steps:
        st.token_ids = st.injected_ids = st.logprobs = None
        st.observation = None
    return t


def test_text_only_trajectory_uses_inference_layout(trajs, policy):
    for tr in trajs[:3]:
        enc = policy.encode_trajectory(strip_to_texts(tr))
        ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
        k = 0
        for st in tr.steps:
            n_inj = len(st.injected_ids)
            assert ids[k : k + n_inj] == st.injected_ids  # injected parts: the same code as at inference
            assert labels[k : k + n_inj] == [IGNORE] * n_inj
            gen = policy.tokenizer(st.text, add_special_tokens=False)["input_ids"]
            assert ids[k + n_inj : k + n_inj + len(gen)] == gen == labels[k + n_inj : k + n_inj + len(gen)]
            k += n_inj + len(gen)
        assert k == len(ids)


def test_rendered_images_match_env_observations():
    """Overlays rendered from the previous step's box equal what the env showed (scripted policy with boxes)."""
    from agents.policies import make_policy

    oracle = make_policy("oracle", noise=150.0)
    trs = collect_groups(env_fn, oracle, [0, 1, 2], group_size=2, seed=1, keep_observations=True)
    n_drawn = 0
    for tr in trs:
        stripped = strip_to_texts(tr)
        for st in stripped.steps:
            st.image_path = None
        for st, img in zip(tr.steps, trajectory_images(stripped)):
            assert np.array_equal(st.observation, img)
        n_drawn += sum(not np.array_equal(tr.steps[0].observation, s.observation) for s in tr.steps[1:])
    assert n_drawn > 0  # the test saw real overlays


def test_missing_image_is_a_clear_error(policy):
    tr = Trajectory("s7", "synthetic", "the circle", [0, 0, 5, 5], 128, 128,
                    steps=[Step(0, "<think>a</think> [1, 2, 3, 4]", True, 0.0)])
    with pytest.raises(ValueError, match="s7.*no image"):
        policy.encode_trajectory(tr)


def test_bc_loss_is_mean_generated_ce(trajs, policy):
    loss, n = policy.bc_loss(trajs)
    # behaviour cloning scores at T = 1: compare with the teacher-forced log-probs of steps marked T = 1
    at_one = copy.deepcopy(trajs)
    for tr in at_one:
        for st in tr.steps:
            st.temperature = 1.0
    tl = policy.token_logprobs(at_one, grad=False)
    assert n == int(tl.mask.sum())
    assert torch.allclose(loss.detach(), -(tl.logprobs[tl.mask]).mean(), atol=1e-5)
    assert loss.requires_grad is False  # frozen policy (no LoRA, no full fine-tune): nothing to train
    assert policy.trainable_parameters() == []


def test_act_validates_histories(policy):
    obs = [{"image": rand_image(i), "expression": "x", "step": 0} for i in range(2)]
    sp = SamplingParams(max_new_tokens=3)
    outs = policy.act(obs, [[], []], [{}, {}], sp)
    obs1 = [dict(o, step=1) for o in obs]
    with pytest.raises(ValueError, match="other token ids"):
        policy.act(obs1, [[outs[1]], [outs[0]]], [{}, {}], sp)  # rows swapped
    with pytest.raises(ValueError, match="do not continue"):  # fewer rows (stopped episodes) must be the policy's own
        policy.act(obs1[:1], [[dataclasses.replace(outs[0])]], [{}], sp)
    with pytest.raises(ValueError, match="lock-step"):
        policy.act([obs[0], obs1[1]], [[], [outs[1]]], [{}, {}], sp)
    assert len(policy.act(obs1, [[outs[0]], [outs[1]]], [{}, {}], sp)) == 2


def test_seeded_sampling_is_reproducible(policy):
    obs = [{"image": rand_image(3), "expression": "the square", "step": 0}] * 3
    sp = SamplingParams(max_new_tokens=8)
    policy.seed(5)
    a = [o.token_ids for o in policy.act(obs, [[]] * 3, [{}] * 3, sp)]
    policy.seed(5)
    b = [o.token_ids for o in policy.act(obs, [[]] * 3, [{}] * 3, sp)]
    assert a == b


def test_evaluate_accepts_policy_by_name(tiny_q3):
    from agents.evaluate import evaluate
    from agents.policies import make_policy

    pol = make_policy("vlm", model=str(tiny_q3))
    assert isinstance(pol, VLMPolicy)
    res = evaluate(pol, "IVT-Synthetic-v0", split="val", limit=2, steps=2,
                   sampling=SamplingParams(greedy=True, max_new_tokens=8), num_strips=0)
    assert res["n"] == 2 and len(res["iou_step"]) == 3


def test_step_image_paths_are_read(trajs, policy, tmp_path):
    """Trajectories written by agents.synthesis carry per-step PNGs instead of in-memory observations."""
    from PIL import Image

    tr = copy.deepcopy(trajs[0])
    want = policy.encode_trajectory(tr)
    for st in tr.steps:
        path = tmp_path / f"step{st.t}.png"
        Image.fromarray(st.observation).save(path)
        st.observation, st.image_path = None, str(path)
    got = policy.encode_trajectory(tr)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.pixel_values, want.pixel_values)
    tr.steps[1].image_path = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="step 1"):
        policy.encode_trajectory(tr)


def test_rollout_benchmark_prints_json(capsys):
    import json

    from benchmarks.rollout import main

    assert main(["--groups", "1", "--group-size", "2", "--steps", "1", "--new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"engine_s", "naive_s", "speedup", "engine_tokens_per_s", "naive_tokens_per_s"} <= set(out)
    assert out["tokens"] == 2 * 2 * 4  # 2 trajectories x (T+1) steps x 4 tokens
    assert out["speedup"] == pytest.approx(out["naive_s"] / out["engine_s"], rel=0.01)
