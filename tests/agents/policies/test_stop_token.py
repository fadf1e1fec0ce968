"""A trained stop decision (issue 14, ``PromptConfig.stop_token``): one token read past each complete step, chosen
between the stop token and the next refinement chunk's first token, checked against a full re-encode."""

import pytest
import torch

from agents.policies.vlm_prompt import PromptConfig, PromptLayout, load_prompts
from agents.policies.vlm_processor import load_processor

from .conftest import rand_image
from .test_engine import ScriptedFilter, make_engine

STOP = "<|box_end|>"


def decision_engine(path, seed=0, scale=0.5):
    """The tiny engine with ``stop_token`` set and the stop token's embedding row moved next to the go-on token's
    (tied head), so that the two logits are close and rows decide both ways."""
    eng = make_engine(path)
    eng.layout.prompts.stop_token = STOP
    stop_id, go_id = eng.layout.stop_decision()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in {id(m.weight): m.weight for m in (eng.model.get_input_embeddings(),
                                                    eng.model.get_output_embeddings())}.values():
            w[stop_id] = w[go_id] + scale * torch.randn(w.shape[1], generator=g)
    return eng, stop_id, go_id


def last_logits(eng, ids, chunk):
    """Logits (V,) after ``ids`` (one row: the step-0 chunk and the generated tokens), a full forward, no cache."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = eng.model(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=chunk.pixel_values,
                        image_grid_thw=chunk.image_grid_thw, use_cache=False,
                        mm_token_type_ids=(x == eng.layout.image_token_id).long())
    return out.logits[0, -1]


def test_stop_decision_ids_and_errors(tiny_q3):
    proc = load_processor(tiny_q3)
    layout = PromptLayout(proc, load_prompts(PromptConfig(stop_token=STOP)), "qwen3_vl")
    stop_id, go_id = layout.stop_decision()
    assert stop_id == proc.tokenizer.convert_tokens_to_ids(STOP)
    assert go_id == layout.refine_chunk(rand_image(3)).ids[0]  # what follows a step that goes on
    assert PromptLayout(proc, load_prompts(None), "qwen3_vl").stop_decision() is None
    with pytest.raises(ValueError, match="stop_token '<stop>' must be one token"):
        PromptLayout(proc, load_prompts(PromptConfig(stop_token="<stop>")), "qwen3_vl").stop_decision()


def test_decision_equals_full_reencode_and_go_on_rows_continue(tiny_q3):
    eng, stop_id, go_id = decision_engine(tiny_q3)
    enc = lambda s: eng.layout.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    box = enc("<think>left</think> [1, 2, 30, 40]")
    n = 8
    base = eng.filter
    eng.filter = ScriptedFilter(base, [box] * n, eng)  # every row writes the box; the decision is the model's
    images = [rand_image(10 + i) for i in range(n)]
    res = eng.start(images, [f"shape {i}" for i in range(n)], 0.0, 40, allow_stop=True)
    stops = []
    for b, r in enumerate(res):
        logits = last_logits(eng, r.injected_ids + box, r.chunk)
        two = torch.log_softmax(logits[[stop_id, go_id]], -1)  # the decision, independently
        stop = bool(two[0] > two[1])
        stops.append(stop)
        if stop:
            assert r.stop == "stop" and r.token_ids == box + [stop_id]
            assert r.logprobs[-1] == pytest.approx(float(two[0]), abs=1e-4)
        else:
            assert r.stop == "box" and r.token_ids == box  # going on writes nothing: the chunk's first token follows
    assert set(stops) == {True, False}, "the test needs rows deciding both ways"
    # the rows that went on: their next step equals a full re-encode (the decision fed their last box token)
    go = [b for b in range(n) if not stops[b]]
    eng.keep(go)
    eng.filter = base
    r1 = eng.refine([rand_image(40 + b) for b in go], 0.0, 6, allow_stop=False)
    from .test_engine import full_reencode
    for j, b in enumerate(go):
        lp, argmax = full_reencode(eng, [res[b], r1[j]])
        assert r1[j].token_ids == argmax[-len(r1[j].token_ids):]
        assert torch.allclose(torch.tensor(r1[j].logprobs), lp[-len(r1[j].token_ids):], atol=1e-4)


def test_no_decision_without_allow_stop_or_stop_token(tiny_q3):
    eng, stop_id, _ = decision_engine(tiny_q3)
    enc = lambda s: eng.layout.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    box = enc("<think>left</think> [1, 2, 30, 40]")
    eng.filter = ScriptedFilter(eng.filter, [box] * 2, eng)
    res = eng.start([rand_image(1), rand_image(2)], ["a", "b"], 0.0, 40)  # allow_stop False
    assert [r.token_ids for r in res] == [box, box] and {r.stop for r in res} == {"box"}


def test_policy_stops_the_env_episode_with_its_marker(tiny_q3):
    from agents.policies.base import SamplingParams
    from agents.policies.vlm import VLMPolicy
    from rollouts.collector import collect_groups

    policy = VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0)
    policy.layout.prompts.stop_token = STOP
    eng = policy.engine
    stop_id, go_id = policy.layout.stop_decision()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = policy.hf_model.get_input_embeddings().weight
        w[stop_id] = w[go_id] + 0.5 * torch.randn(w.shape[1], generator=g)
    box = policy.tokenizer("<think>a</think> [100, 200, 300, 400]", add_special_tokens=False)["input_ids"]
    base = eng.filter
    generate = eng._generate

    def scripted(*a, **kw):  # each step: every row writes the box, then the model decides
        eng.filter = ScriptedFilter(base, [box] * len(eng.rows), eng)
        try:
            return generate(*a, **kw)
        finally:
            eng.filter = base

    eng._generate = scripted
    trajs = collect_groups("IVT-Synthetic-Adaptive-v0", policy, range(8), sampling=SamplingParams(
        greedy=True, max_new_tokens=20), env_kwargs={"max_refine_steps": 2, "stop_marker": "<halt>"})
    lengths = []
    for tr in trajs:
        stopped = [s.text.endswith(" <halt>") for s in tr.steps]  # the env's own marker, from its info
        assert not any(stopped[:-1])
        assert stopped[-1] == (len(tr.steps) < 3 or tr.steps[-1].token_ids[-1] == stop_id)
        assert all(s.token_ids[:len(box)] == box for s in tr.steps)
        lengths.append(len(tr.steps))
    assert min(lengths) < 3, "no episode stopped early"


def test_go_on_decisions_are_targets_in_stop_decision_trajectories(tiny_q3):
    from agents.policies.logprobs import IGNORE, encode_trajectory
    from rollouts.types import Step, Trajectory

    layout = PromptLayout(load_processor(tiny_q3), load_prompts(PromptConfig(stop_token=STOP)), "qwen3_vl")
    texts = ["<think>a</think> [1, 2, 3, 4]", "<think>Box fits. Keep it.</think>",
             "<think>b</think> [5, 6, 7, 8]" + STOP]
    steps = [Step(t=t, text=x, valid=True, iou=0.5, observation=rand_image(t)) for t, x in enumerate(texts)]
    tr = Trajectory("s", "synthetic", "a shape", [0, 0, 9, 9], 128, 128, steps=steps, meta={})
    plain = encode_trajectory(tr, layout)
    tr.meta = {"stop_decisions": True}
    dec = encode_trajectory(tr, layout)
    stop_id, go_id = layout.stop_decision()
    changed = (plain.labels != dec.labels).nonzero().flatten().tolist()
    assert len(changed) == 2 and all(plain.labels[i] == IGNORE and dec.labels[i] == go_id for i in changed)
    assert [int(dec.step_index[i]) for i in changed] == [1, 2]  # the first token of each refinement chunk
    assert all(int(dec.input_ids[i - 1]) in (layout.text_ids("]")[-1], layout.text_ids("</think>")[-1])
               for i in changed)  # right after the step the decision follows
    assert int(dec.labels[-1]) == stop_id  # the stop token is a generated target as written
