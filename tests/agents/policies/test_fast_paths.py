"""Issue 16: the fast paths of encoding, scoring and rollouts give the results of the plain paths.

Each test runs the new route and the old one (``agents.policies.vision.ENABLED`` False, ``PromptLayout.fast_encode``
False, ``share_prefix=False``) on the same inputs and compares them numerically."""

import contextlib
import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

import ivt_env  # noqa: F401  (registers the env ids)
from agents.policies import vision
from agents.policies.base import SamplingParams
from agents.policies.logprobs import teacher_forced
from agents.policies.vlm import VLMPolicy
from agents.policies.vlm_prompt import _numpy_pixels
from rollouts.collector import collect_groups

from .conftest import rand_image


def env_fn():
    return gym.make("IVT-Synthetic-v0", max_refine_steps=2)


@contextlib.contextmanager
def plain(policy=None):
    """The pre-issue-16 routes: processor encoding, every image through the vision tower, conv patch embedding."""
    old = vision.ENABLED
    vision.ENABLED = False
    fast = policy.layout.fast_encode if policy is not None else None
    if policy is not None:
        policy.layout.fast_encode = False
    try:
        yield
    finally:
        vision.ENABLED = old
        if policy is not None:
            policy.layout.fast_encode = fast


@pytest.fixture(scope="module")
def policy(tiny_q3):
    return VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0, full_finetune=True)


@pytest.fixture(scope="module")
def groups(policy):
    """Two groups of 4 with branching (step-0 answers shared by pairs of siblings): prompts and overlays repeat."""
    sampling = dataclasses.replace(SamplingParams(max_new_tokens=16), branch=2)
    return collect_groups(env_fn, policy, [0, 1], group_size=4, sampling=sampling, seed=0, keep_observations=True)


@pytest.mark.parametrize("shape", [(128, 128), (96, 160), (64, 64), (100, 130)])
def test_numpy_pixels_equal_image_processor(policy, shape):
    ip = policy.processor.image_processor
    image = rand_image(shape[0] + shape[1], *shape)
    got = _numpy_pixels(ip, image)
    want = ip(images=[image], return_tensors="pt")
    if shape == (100, 130):  # needs resizing: left to the processor
        assert got is None
        return
    assert torch.equal(got[0], want["pixel_values"]) and torch.equal(got[1], want["image_grid_thw"])


def test_fast_encode_equals_processor(policy):
    lay = policy.layout
    for seed, (h, w) in enumerate([(128, 128), (96, 160), (100, 130)]):
        image = rand_image(seed, h, w)
        for text in (lay.first_text("the red square on the left"), lay.refine_text()):
            (a, route), b = lay._encode_fast(text, image), lay._encode_processor(text, image)
            assert route == ("image_processor" if (h, w) == (100, 130) else "numpy")
            assert a.ids == b.ids and a.resized_hw == b.resized_hw
            assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.image_grid_thw, b.image_grid_thw)
    assert lay.fast_encode  # the self-checks of the first chunks found no difference


EXPRESSIONS = ["the red square on the left", "a small blue circle", "the {odd} one", "dots... and 'quotes'",
               "the green triangle above the red square", "x", "the second of three circles", "the big one <b>"]


def test_spliced_prompts_and_backend_ids_equal_the_rendered_ones(tiny_q3):
    """After FAST_CHECKS agreeing calls, step-0 prompts are the template's prefix + question + suffix and ids come
    from the tokenizer's backend: both equal the chat-template render and the wrapper's ids."""
    lay = VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0, full_finetune=True).layout
    for allow_stop in (False, True):
        for e in EXPRESSIONS * 2:
            text = lay.first_text(e, allow_stop)
            assert text == lay._render(lay.question_text(e, allow_stop))
            assert lay._ids(text, special=True) == lay.tokenizer(text)["input_ids"]
            assert lay.text_ids(e + " [1, 2, 3, 4]") == lay.tokenizer(e + " [1, 2, 3, 4]",
                                                                      add_special_tokens=False)["input_ids"]
    assert lay._splice and lay._splice_checks <= 0 and lay._backend is not None
    assert min(lay._backend_checks.values()) <= 0  # both routes are past their checks: the fast ones answered


def test_a_template_that_changes_the_question_is_rendered_every_time(tiny_q3):
    lay = VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0, full_finetune=True).layout
    assert "{{- c['text'] }}" in lay.tokenizer.chat_template
    lay.tokenizer.chat_template = lay.tokenizer.chat_template.replace("{{- c['text'] }}", "{{- c['text'] | upper }}")
    assert "A B" in lay._render("a b")  # the edit took effect
    for e in EXPRESSIONS:
        assert lay.first_text(e) == lay._render(lay.question_text(e)) and e.upper()[:3] in lay.first_text(e)
    assert lay._splice is False


def test_a_backend_that_disagrees_is_dropped(tiny_q3):
    lay = VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0, full_finetune=True).layout

    class Wrong:
        def encode(self, text, add_special_tokens=True):
            return type("E", (), {"ids": [0]})()

    lay._backend = Wrong()
    assert lay.text_ids("the red square") == lay.tokenizer("the red square", add_special_tokens=False)["input_ids"]
    assert lay._backend is None


def test_encoding_memo_scoped_and_exact(policy):
    lay = policy.layout
    image, other = rand_image(7), rand_image(8)
    text = lay.refine_text()
    h0 = lay.cache_hits
    lay.encode(text, image)
    lay.encode(text, image)
    assert lay.cache_hits == h0  # no memo outside caching()
    with policy.encoding_cache():
        a = lay.encode(text, image)
        a.ids.append(-1)  # callers get their own ids list
        b = lay.encode(text, image.copy())  # same bytes, another array: a hit
        c = lay.encode(text, other)
        with policy.encoding_cache():  # nested: the same memo
            d = lay.encode(text, image)
    assert lay.cache_hits == h0 + 2
    assert b.ids == lay._encode_processor(text, image).ids and torch.equal(b.pixel_values, d.pixel_values)
    assert b.image_key == d.image_key != c.image_key
    assert lay._cache is None  # dropped with the outermost block


def grads(policy):
    return [p.grad.clone() for p in policy.trainable_parameters()]


def score(policy, trajs, *, share=True):
    """Teacher-forced policy pass (with grad) and reference pass, as the GRPO update runs them."""
    policy.model.zero_grad()
    enc = [policy.encode_trajectory(t) for t in trajs]
    lp, ent, mask = teacher_forced(policy.hf_model, enc, policy.layout.pad_id, policy.logit_filter,
                                   temperature=True, share_prefix=share)
    (lp.sum() * 0.1 + ent.sum() * 0.01).backward()
    with torch.no_grad():
        ref, _, _ = teacher_forced(policy.ref_model, enc, policy.layout.pad_id, policy.logit_filter,
                                   temperature=True, share_prefix=share)
    return lp.detach(), ent.detach(), mask, ref, grads(policy)


def assert_close(a, b, atol=1e-5):
    lp_a, ent_a, mask_a, ref_a, g_a = a
    lp_b, ent_b, mask_b, ref_b, g_b = b
    assert torch.equal(mask_a, mask_b)
    for x, y in ((lp_a, lp_b), (ent_a, ent_b), (ref_a, ref_b)):
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max()
    for x, y in zip(g_a, g_b):
        assert torch.allclose(x, y, atol=atol, rtol=1e-4), (x - y).abs().max()


def test_scoring_fast_paths_equal_plain_forward(policy, groups):
    """Shared prompts, each distinct image through the tower once, the patch embedding as a matmul, and the
    encoding memo: log-probs, entropies, reference log-probs and gradients equal the plain one-pass forward."""
    with plain(policy):
        want = score(policy, groups, share=False)
    from agents.policies import logprobs

    with policy.encoding_cache():
        logprobs._ROPE_MEMO.clear()
        got = score(policy, groups, share=True)
        assert len(logprobs._ROPE_MEMO) == 1  # one batch: the policy and the reference pass share its positions
        again = score(policy, groups, share=True)  # memo hits: the same again
    assert_close(got, want)
    assert_close(again, got, atol=0)
    # deduplicated images without prompt sharing
    assert_close(score(policy, groups, share=False), want)


def test_shared_segments_levels_and_fallback(policy, groups):
    """Groups of 4 from branches of 2: the prompt is shared by 4 rows, the step-0 answer and the step-1 chunk by
    2; one trajectory per prompt shares nothing and takes the one-pass route with the same result."""
    from agents.policies.logprobs import _prefix_plan

    enc = [policy.encode_trajectory(t) for t in groups]
    levels, rest = _prefix_plan(policy.hf_model, enc)
    assert [len(first) for _, _, first, _ in levels] == [2, 4]  # 2 prompts, 4 step-0 answers, 8 rows
    assert rest == [e.injected_ends[1] for e in enc]
    assert _prefix_plan(policy.hf_model, [enc[0], enc[4]]) is None
    single = [groups[0], groups[4]]
    with plain(policy):
        want = score(policy, single, share=False)
    assert_close(score(policy, single), want)


def test_patch_embedding_matmul_equals_conv(policy):
    pe = policy.hf_model.model.visual.patch_embed
    assert type(pe).__name__.startswith("Linear")
    x = torch.randn(128, pe.proj.weight[0].numel(), requires_grad=True)
    out = {}
    for on in (False, True):
        pe.zero_grad()
        x.grad = None
        vision.ENABLED = on
        try:
            y = pe(x)
        finally:
            vision.ENABLED = True
        (y.sin().sum()).backward()
        out[on] = (y.detach(), pe.proj.weight.grad.clone(), pe.proj.bias.grad.clone(), x.grad.clone())
    for a, b in zip(out[False], out[True]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    state = policy.hf_model.state_dict()
    assert "model.visual.patch_embed.proj.weight" in state  # weights and checkpoints unchanged


def test_rollouts_equal_with_and_without_fast_paths(policy):
    """The engine with the memo, fast encoding and deduplicated vision features samples the same tokens with the
    same log-probs (branching: siblings share their overlay image)."""
    sampling = dataclasses.replace(SamplingParams(max_new_tokens=12), branch=2)
    with plain(policy):
        want = collect_groups(env_fn, policy, [2, 3], group_size=4, sampling=sampling, seed=5, keep_observations=True)
    with policy.encoding_cache():
        got = collect_groups(env_fn, policy, [2, 3], group_size=4, sampling=sampling, seed=5, keep_observations=True)
    for a, b in zip(want, got):
        for s, t in zip(a.steps, b.steps):
            assert s.token_ids == t.token_ids and s.injected_ids == t.injected_ids
            assert np.allclose(s.logprobs, t.logprobs, atol=1e-5)


def test_distinct():
    first, mapping = vision.distinct([("a",), ("b",), ("a",), None, None, ("b",)])
    assert first == [0, 1, 3, 4] and mapping == [0, 1, 0, 2, 3, 1]


def test_iteration_benchmark_prints_json(capsys):
    """benchmarks/grpo_iteration.py at a toy size: both parts, every stage, same results before and after."""
    import json

    from benchmarks.grpo_iteration import main

    assert main(["--reps", "1", "--bc-steps", "1", "--grpo-args", "--prompts-per-iter 2 --max-new-tokens 8",
                 "--before-rollout-batch", "6", "--bc-args", "--batch-size 2"]) == 0
    out = json.loads(capsys.readouterr().out)
    g = out["grpo"]
    assert {"collect", "reference_pass", "policy_forward", "backward", "optimizer", "iteration_s"} <= set(g["after"])
    assert g["rollout_batch"] == {"before": 6, "after": 12}  # after: the config's -1, prompts x N in one batch
    same = {c["mode"]: c for c in g["checks"]}["after_oldbatch"]  # the new code at the old batch: same rollouts
    assert same["same_step_tokens"] == 1.0 and same["rollout_batch"] == 6
    assert same["loss_before"] == pytest.approx(same["loss_after_oldbatch"], abs=1e-5)
    for phase in ("phase1", "phase2"):
        assert {"data", "forward", "backward", "step_s"} <= set(out["bc"][phase]["before"])
        assert out["bc"][phase]["checks"][0]["max_loss_diff"] < 1e-4


def test_length_buckets_equal_one_padded_batch(policy, groups):
    """Uneven lengths (1-step samples beside 3-step trajectories, as in behaviour cloning's mixed batches) run as
    two length buckets: the same log-probs, entropies, BC loss and gradients as one padded batch."""
    from agents.policies.base import BCLossOptions
    from agents.policies.logprobs import length_buckets

    assert length_buckets([50, 52, 160, 165]) == [[0, 1], [2, 3]]
    assert length_buckets([150, 152, 160, 165]) is None and length_buckets([50, 160]) is None
    mixed = [dataclasses.replace(t, steps=t.steps[:1]) if i % 2 else t for i, t in enumerate(groups)]
    mixed = [mixed[i] for i in (1, 0, 3, 6, 5, 2, 7)]  # shuffled lengths
    lens = [policy.encode_trajectory(t).input_ids.shape[0] for t in mixed]
    assert length_buckets(lens) is not None
    with plain(policy):
        want = score(policy, mixed, share=False)
    assert_close(score(policy, mixed, share=False), want)
    opts = BCLossOptions(number_sigma=20.0, clone_start=False)
    out = {}
    for fast in (False, True):
        policy.model.zero_grad()
        with (contextlib.nullcontext() if fast else plain(policy)):
            loss, n = policy.bc_loss(mixed, opts)
        loss.backward()
        out[fast] = (float(loss.detach()), n, grads(policy))
    assert out[True][1] == out[False][1] and abs(out[True][0] - out[False][0]) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(out[True][2], out[False][2]))


def test_fast_paths_both_architectures(tiny_any):
    """Qwen3-VL and Qwen2.5-VL alike: shared segments, deduplicated images and the matmul patch embedding give the
    plain forward's log-probs and gradients."""
    pol = VLMPolicy.from_pretrained(tiny_any, device="cpu", seed=0, full_finetune=True)
    assert any(type(m).__name__.startswith("Linear") for m in pol.hf_model.modules())
    sampling = dataclasses.replace(SamplingParams(max_new_tokens=8), branch=2)
    trajs = collect_groups(env_fn, pol, [4], group_size=4, sampling=sampling, seed=1, keep_observations=True)
    with plain(pol):
        want = score(pol, trajs, share=False)
    assert_close(score(pol, trajs), want)


@pytest.mark.parametrize("shapes", [[(128, 128)] * 3, [(128, 128), (96, 160), (128, 128), (64, 64), (96, 160)]])
def test_batched_vision_attention_equals_per_image_loop(policy, shapes):
    """Images of one patch count in one batched sdpa call (mixed sizes: gathered per size and put back in order):
    features, deepstack features and gradients equal transformers' per-image attention loop."""
    visual = policy.hf_model.model.visual
    assert type(visual.blocks[0].attn).__name__.startswith("Batched")
    chunks = [policy.layout.refine_chunk(rand_image(i, *s)) for i, s in enumerate(shapes)]
    pixels = torch.cat([c.pixel_values for c in chunks])
    grid = torch.cat([c.image_grid_thw for c in chunks])

    def run():
        policy.model.zero_grad()
        out = policy.hf_model.model.get_image_features(pixels, grid, return_dict=True)
        feats = torch.cat(list(out.pooler_output))
        deep = torch.cat([torch.cat(list(f)) if isinstance(f, (tuple, list)) else f for f in out.deepstack_features])
        (feats.square().sum() + deep.sum()).backward()
        return feats.detach(), deep.detach(), [p.grad.clone() for p in visual.parameters() if p.grad is not None]

    got = run()
    with plain():
        want = run()
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    assert len(got[2]) == len(want[2]) > 0
    for x, y in zip(got[2], want[2]):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4), (x - y).abs().max()
