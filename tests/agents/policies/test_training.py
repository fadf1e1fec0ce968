"""Training-side features: LoRA (reference = adapter disabled), save/load, full fine-tuning, gradient
checkpointing, 4-bit NF4 with the CPU AVX512-BF16 gradient guard, and Qwen2.5-VL box conversion."""

import json

import numpy as np
import pytest
import torch

from agents.policies.base import BCLossOptions, PolicyOutput, SamplingParams
from agents.policies.engine import StepResult
from agents.policies.vlm import LoraSettings, VLMPolicy
from agents.policies.vlm_prompt import abs_box_text_to_norm
from rollouts.types import Step, Trajectory

from .conftest import rand_image


def teacher_traj(sample_id="s0", seed=0):
    """A text-only teacher trajectory with the original image in meta (rendered overlays)."""
    texts = ["<think>The circle is left.</think> [100, 200, 400, 600]",
             "<think>Too far left. Move right.</think> [150, 200, 450, 600]",
             "<think>Box fits. Keep it.</think> [160, 210, 460, 610]"]
    steps = [Step(t, s, True, 0.5, box=[12.8 + t, 25.6, 51.2, 76.8]) for t, s in enumerate(texts)]
    return Trajectory(sample_id, "synthetic", "the blue circle", [20, 26, 59, 78], 128, 128, steps=steps,
                      meta={"image": rand_image(seed)})


def lora_grads(policy, trajs):
    policy.model.zero_grad()
    loss, _ = policy.bc_loss(trajs)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]).clone(), float(loss.detach())


def sgd_step(policy, lr=0.05):
    loss, _ = policy.bc_loss([teacher_traj()])
    loss.backward()
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p -= lr * p.grad.sign()
    policy.model.zero_grad()


LORA = LoraSettings(rank=4, alpha=8)


def test_lora_targets_language_model_only(tiny_q3):
    pol = VLMPolicy.from_pretrained(tiny_q3, lora=LORA, device="cpu")
    names = [n for n, p in pol.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(pol.trainable_parameters()) == len(names) == 2 * 7 * 2  # A and B, 7 projections, 2 layers


def test_lora_reference_equals_base_and_save_load(tiny_q3, tmp_path):
    trajs = [teacher_traj("a", 0), teacher_traj("b", 1)]
    base = VLMPolicy.from_pretrained(tiny_q3, device="cpu")
    want = base.token_logprobs(trajs, grad=False).logprobs
    pol = VLMPolicy.from_pretrained(tiny_q3, lora=LORA, device="cpu")
    sgd_step(pol)
    cur = pol.token_logprobs(trajs)
    assert cur.logprobs.requires_grad
    ref = pol.token_logprobs(trajs, reference=True)
    assert not ref.logprobs.requires_grad
    assert torch.allclose(ref.logprobs, want, atol=1e-6)  # adapter disabled == the base model exactly
    assert not torch.allclose(cur.logprobs.detach(), want, atol=1e-3)  # the adapter did move
    pol.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "ckpt" / "ivt_policy.json").read_text())["lora"] is True
    back = VLMPolicy.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert back.uses_lora and len(back.trainable_parameters()) == len(pol.trainable_parameters())
    assert torch.allclose(back.token_logprobs(trajs, grad=False).logprobs, cur.logprobs.detach(), atol=1e-6)
    assert not (tmp_path / "ckpt" / "reference").exists()  # only the trainable adapter is saved
    # a loaded adapter (e.g. the SFT checkpoint) is its own reference: a frozen copy of the adapter weights
    assert torch.allclose(back.token_logprobs(trajs, reference=True).logprobs, cur.logprobs.detach(), atol=1e-6)
    based = VLMPolicy.from_pretrained(tmp_path / "ckpt", device="cpu", reference="base", full_finetune=True)
    assert based.uses_lora and based.ref_model is None  # a saved adapter is continued, never fully fine-tuned
    assert torch.allclose(based.token_logprobs(trajs, reference=True).logprobs, want, atol=1e-6)
    # training the loaded adapter leaves the reference where it was, and a reference pass between forward and
    # backward does not change the gradients
    sgd_step(back)
    assert torch.allclose(back.token_logprobs(trajs, reference=True).logprobs, cur.logprobs.detach(), atol=1e-6)
    g_plain, _ = lora_grads(back, trajs)
    back.model.zero_grad()
    loss, _ = back.bc_loss(trajs)
    back.token_logprobs(trajs, reference=True)
    loss.backward()
    g_mixed = torch.cat([p.grad.flatten() for p in back.trainable_parameters()])
    assert torch.equal(g_plain, g_mixed)
    assert all(p.requires_grad == ("lora_" in n and ".default." in n) for n, p in back.model.named_parameters())


def test_full_finetune_reference_is_frozen_copy(tiny_q3, tmp_path):
    trajs = [teacher_traj()]
    pol = VLMPolicy.from_pretrained(tiny_q3, full_finetune=True, device="cpu")
    want = pol.token_logprobs(trajs, grad=False).logprobs
    assert len(pol.trainable_parameters()) == len(list(pol.hf_model.parameters()))
    sgd_step(pol, lr=0.01)
    assert torch.allclose(pol.token_logprobs(trajs, reference=True).logprobs, want, atol=1e-6)
    moved = pol.token_logprobs(trajs, grad=False).logprobs
    assert not torch.allclose(moved, want, atol=1e-3)
    pol.save(tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").is_file() and (tmp_path / "full" / "prompts.yaml").is_file()
    back = VLMPolicy.from_pretrained(tmp_path / "full", device="cpu")
    assert torch.allclose(back.token_logprobs(trajs, grad=False).logprobs, moved, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients(tiny_q3):
    trajs = [teacher_traj()]
    a = VLMPolicy.from_pretrained(tiny_q3, lora=LORA, device="cpu", seed=0).train()
    b = VLMPolicy.from_pretrained(tiny_q3, lora=LORA, device="cpu", seed=0, gradient_checkpointing=True).train()
    b.model.load_state_dict(a.model.state_dict())
    sgd_step(a)
    b.model.load_state_dict(a.model.state_dict())
    ga, la = lora_grads(a, trajs)
    gb, lb = lora_grads(b, trajs)
    assert la == pytest.approx(lb, abs=1e-6) and torch.allclose(ga, gb, atol=1e-6)
    assert getattr(b.hf_model, "is_activation_checkpointing", None) or b.hf_model.is_gradient_checkpointing


def _four_bit(tiny_q3, guard=True, monkeypatch=None):
    import agents.policies.vlm as vlm_mod

    if not guard:
        monkeypatch.setattr(vlm_mod, "disable_bnb_cpu_bf16_repack", lambda m: 0)
    pol = VLMPolicy.from_pretrained(tiny_q3, lora=LORA, load_in_4bit=True, device="cpu", seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B so that every LoRA matrix gets a gradient
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pol


def _grads_before_after_generate(pol):
    trajs = [teacher_traj()]
    g0, l0 = lora_grads(pol, trajs)
    obs = [{"image": rand_image(0), "expression": "the blue circle", "step": 0}]
    pol.act(obs, [[]], [{}], SamplingParams(max_new_tokens=6))  # a no-grad forward (generation)
    g1, l1 = lora_grads(pol, trajs)
    return g0, g1, l0, l1


def test_4bit_lora_gradients_unchanged_by_generation(tiny_q3):
    import bitsandbytes as bnb

    pol = _four_bit(tiny_q3)
    quant = [m for m in pol.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quant and all(m.support_avx512bf16_for_cpu is False for m in quant)
    g0, g1, l0, l1 = _grads_before_after_generate(pol)
    assert g0.abs().max() > 0
    assert l0 == l1 and torch.equal(g0, g1)  # DESIGN.md: without the guard, gradients after a generate differ


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the pitfall needs a CPU with AVX512-BF16")
def test_4bit_guard_is_needed_here(tiny_q3, monkeypatch):
    """The guard test above is sensitive: on this CPU, without the guard, generation corrupts LoRA gradients."""
    pol = _four_bit(tiny_q3, guard=False, monkeypatch=monkeypatch)
    g0, g1, _, _ = _grads_before_after_generate(pol)
    assert not torch.allclose(g0, g1, atol=1e-4)


def test_abs_box_conversion_by_hand():
    text = '<think>see [14, 28, 70, 140]</think> [14, 28, 70.5, 140] {"bbox_2d": [0, 7, 139, 150]}'
    assert abs_box_text_to_norm(text, 140, 140) == (
        '<think>see [100, 200, 500, 1000]</think> [100, 200, 503, 1000] {"bbox_2d": [0, 50, 992, 1071]}'
    )  # floor(x * 1000 / W'); 150 px lies outside a 140 px input and stays out of range for the env
    assert abs_box_text_to_norm("[10, 20, 30, 40]", 200, 100) == "[50, 200, 150, 400]"
    assert abs_box_text_to_norm("no box", 100, 100) == "no box"


def test_qwen25_policy_converts_boxes_at_its_edge(tiny_q25):
    pol = VLMPolicy.from_pretrained(tiny_q25, device="cpu")
    assert pol.layout.abs_boxes and "in pixels" in pol.layout.question_text("x")
    raw = "<think>ok</think> [14, 28, 70, 140]"
    ids = pol.tokenizer(raw, add_special_tokens=False)["input_ids"]
    img = rand_image(0)  # 128x128: the processor resizes it to 140x140 (patch 14, merge 2)

    def fake_start(images, exprs, *a, **k):
        chunk = pol.layout.first_chunk(images[0], exprs[0])
        return [StepResult(chunk.ids, ids, [-1.0] * len(ids), "box", chunk)]

    pol.engine.start = fake_start
    (out,) = pol.act([{"image": img, "expression": "x", "step": 0}], [[]], [{}], SamplingParams())
    assert isinstance(out, PolicyOutput)
    assert out.text == "<think>ok</think> [100, 200, 500, 1000]"
    assert out.extra["raw_text"] == raw and out.token_ids == ids  # the model's own tokens are kept
    from ivt_env.boxes import parse_box

    assert parse_box(out.text).box == (100.0, 200.0, 500.0, 1000.0)


def test_qwen25_policy_runs_an_episode(tiny_q25):
    import gymnasium as gym

    import ivt_env  # noqa: F401
    from rollouts.collector import collect_groups

    pol = VLMPolicy.from_pretrained(tiny_q25, device="cpu", seed=0)
    trs = collect_groups(lambda: gym.make("IVT-Synthetic-v0", max_refine_steps=1), pol, [0], group_size=2,
                         sampling=SamplingParams(max_new_tokens=6), keep_observations=True)
    tl = pol.token_logprobs(trs, grad=False)
    for i, tr in enumerate(trs):
        want = torch.tensor([x for st in tr.steps for x in st.logprobs])
        assert torch.allclose(tl.logprobs[i][tl.mask[i]], want, atol=1e-4)
        assert tr.steps[0].injected_ids.count(pol.layout.image_token_id) == 25
    assert np.isfinite(tl.entropy[tl.mask].numpy()).all()


# ------------------------------------------------------------------------------ BC loss options
def test_number_smoothing_targets_by_hand():
    from agents.policies.logprobs import NumberSmoothing
    from agents.policies.tiny import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    sm = NumberSmoothing(tok, sigma=2.0)
    assert len(sm) == 1001
    V = len(tok)
    n500, n501, n503 = (tok.convert_tokens_to_ids(str(n)) for n in (500, 501, 503))
    word = tok.convert_tokens_to_ids("<think>")
    target = torch.tensor([n500, n500, n500, word])
    # the soft loss is linear in the log-probs: a unit vector on token j reads off the target weight q(j)
    probe = torch.zeros(4, V)
    probe[0, n500], probe[1, n501], probe[2, n503], probe[3, word] = 1.0, 1.0, 1.0, 1.0
    q = sm(target, probe)
    z = sum(np.exp(-0.5 * (d / 2.0) ** 2) for d in range(-500, 501))  # normaliser over the values 0..1000
    assert q[0].item() == pytest.approx(1.0 / z, rel=1e-5)
    assert q[1].item() == pytest.approx(np.exp(-0.125) / z, rel=1e-5)  # one unit off: exp(-1/8)
    assert q[2].item() == pytest.approx(np.exp(-1.125) / z, rel=1e-5)  # three units off: exp(-9/8)
    assert q[3].item() == 1.0  # a word target keeps the plain log-prob
    logp = torch.log_softmax(torch.randn(4, V), dim=-1)
    exact = logp.gather(1, target[:, None]).squeeze(1)
    tight = NumberSmoothing(tok, sigma=1e-3)(target, logp)
    assert torch.allclose(tight, exact, atol=1e-6)  # a vanishing width is the one-hot cross-entropy


def test_bc_loss_options(tiny_q3):
    """clone_start=False masks step 0 of a multi-step trajectory only; number_sigma softens number targets."""
    pol = VLMPolicy.from_pretrained(tiny_q3, device="cpu")
    traj = teacher_traj()
    single = Trajectory("g", "synthetic", "the blue circle", [20, 26, 59, 78], 128, 128,
                        steps=[teacher_traj().steps[0]], meta={"image": rand_image(1)})
    enc = pol.encode_trajectory(traj)
    n_all, n_first = enc.n_generated, int(((enc.labels != -100) & (enc.step_index == 0)).sum())
    n_single = pol.encode_trajectory(single).n_generated
    with torch.no_grad():
        _, n = pol.bc_loss([traj, single])
        _, n_masked = pol.bc_loss([traj, single], BCLossOptions(clone_start=False))
        plain, _ = pol.bc_loss([traj])
        soft, _ = pol.bc_loss([traj], BCLossOptions(number_sigma=30.0))
    assert n == n_all + n_single and n_masked == n_all - n_first + n_single
    assert n_first > 0 and soft.item() != pytest.approx(plain.item(), abs=1e-3)


def test_reference_none_keeps_no_copy(tiny_q3):
    """Behaviour cloning loads with reference='none': no frozen copy of the weights, and asking for reference
    log-probs is an error instead of silently using the trained weights."""
    pol = VLMPolicy.from_pretrained(tiny_q3, device="cpu", full_finetune=True, reference="none")
    assert pol.ref_model is None and pol.trainable_parameters()
    with pytest.raises(ValueError, match="reference='none'"):
        pol.token_logprobs([teacher_traj()], reference=True)
    with pytest.raises(ValueError, match="reference must be"):
        VLMPolicy.from_pretrained(tiny_q3, device="cpu", reference="frozen")
