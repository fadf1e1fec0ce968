"""The rollout engine: the cached, batched path equals a plain full re-encode of each trajectory alone."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from agents.policies.engine import LogitFilter, RolloutEngine
from agents.policies.kv_cache import lean_text_model, sample_inverse_cdf
from agents.policies.vlm_processor import load_processor
from agents.policies.vlm_prompt import PromptLayout, load_prompts, mm_token_types

from .conftest import rand_image


def make_engine(path):
    model = AutoModelForImageTextToText.from_pretrained(str(path)).eval()
    proc = load_processor(path)
    layout = PromptLayout(proc, load_prompts(None), model.config.model_type)
    return RolloutEngine(model, layout, LogitFilter(len(proc.tokenizer), layout.placeholder_ids))


def full_reencode(engine, steps):
    """One trajectory alone, no cache, positions computed by the model itself: per generated token its log-prob
    under log_softmax(logits / T) at its step's recorded temperature, and the argmax of the next-token
    distribution (same LogitFilter)."""
    ids, gen_pos, pixels, grids, temps = [], [], [], [], []
    for r in steps:
        ids += r.injected_ids
        gen_pos += list(range(len(ids), len(ids) + len(r.token_ids)))
        temps += [r.temperature] * len(r.token_ids)
        ids += r.token_ids
        pixels.append(r.chunk.pixel_values)
        grids.append(r.chunk.image_grid_thw)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = engine.model(
            input_ids=x, attention_mask=torch.ones_like(x), pixel_values=torch.cat(pixels),
            image_grid_thw=torch.cat(grids), mm_token_type_ids=mm_token_types(x, engine.layout.image_token_id),
            use_cache=False,
        ).logits[0]
    logits = engine.filter(logits)
    lp = torch.stack([torch.log_softmax(logits[j - 1] / T, -1)[ids[j]] for j, T in zip(gen_pos, temps)])
    argmax = [int(logits[j - 1].argmax()) for j in gen_pos]
    return lp, argmax


def batch_inputs():
    """Two groups of 3 and 2 sharing a prompt, plus a single row with another image size (ragged lengths)."""
    im = [rand_image(0), rand_image(1), rand_image(2, 96, 160)]
    ex = ["the blue circle", "the large green square left of the white triangle", "the shape"]
    sel = [0, 0, 0, 1, 1, 2]
    return [im[i] for i in sel], [ex[i] for i in sel]


def test_cached_batched_equals_full_reencode(tiny_any):
    eng = make_engine(tiny_any)
    eng.seed(0)
    images, exprs = batch_inputs()
    r0 = eng.start(images, exprs, temperature=1.0, max_new_tokens=14)
    r1 = eng.refine([rand_image(10 + i, *im.shape[:2]) for i, im in enumerate(images)], 0.7, 9)
    r2 = eng.refine([rand_image(20 + i, *im.shape[:2]) for i, im in enumerate(images)], 0.0, 8)  # greedy
    assert len({tuple(r.token_ids) for r in r0}) > 1  # sampling differs across the rows of a group
    assert [r0[0].temperature, r1[0].temperature, r2[0].temperature] == [1.0, 0.7, 1.0]  # greedy scores at 1
    for b in range(len(images)):
        lp, argmax = full_reencode(eng, [r0[b], r1[b], r2[b]])
        mine = torch.tensor(r0[b].logprobs + r1[b].logprobs + r2[b].logprobs)
        assert torch.allclose(mine, lp, atol=1e-4), (b, (mine - lp).abs().max())
        n2 = len(r2[b].token_ids)
        assert r2[b].token_ids == argmax[-n2:]  # greedy tokens == greedy of the full re-encode
        assert r0[b].injected_ids == eng.layout.first_chunk(images[b], exprs[b]).ids


def test_greedy_equals_hf_generate(tiny_q3):
    """An independent implementation: transformers' own generate, re-encoding the whole prefix at step 1."""
    eng = make_engine(tiny_q3)
    images, exprs = batch_inputs()
    r0 = eng.start(images[:4], exprs[:4], 0.0, 12, stop_at_eos=False)
    overlays = [rand_image(30 + i) for i in range(4)]
    r1 = eng.refine(overlays, 0.0, 10, stop_at_eos=False)
    lay = eng.layout
    for b in (0, 3):
        ids = r0[b].injected_ids + r0[b].token_ids + r1[b].injected_ids
        x = torch.tensor([ids])
        out = eng.model.generate(
            input_ids=x, attention_mask=torch.ones_like(x),
            pixel_values=torch.cat([r0[b].chunk.pixel_values, r1[b].chunk.pixel_values]),
            image_grid_thw=torch.cat([r0[b].chunk.image_grid_thw, r1[b].chunk.image_grid_thw]),
            mm_token_type_ids=mm_token_types(x, lay.image_token_id), do_sample=False, max_new_tokens=10,
            min_new_tokens=10, suppress_tokens=lay.placeholder_ids, pad_token_id=lay.pad_id,
        )
        assert out[0, x.shape[1]:].tolist() == r1[b].token_ids


def record_forward_shapes(eng) -> list:
    """Wrap ``eng._forward`` so every call appends its input ids' shape (batch rows, new tokens) to the returned list."""
    shapes = []
    orig = eng._forward

    def spy(ids, *a, **k):
        shapes.append(tuple(ids.shape))
        return orig(ids, *a, **k)

    eng._forward = spy
    return shapes


def test_shared_prompt_is_encoded_once(tiny_q3):
    eng = make_engine(tiny_q3)
    widths = record_forward_shapes(eng)
    images, exprs = batch_inputs()
    eng.start(images, exprs, 1.0, 3)
    assert widths[0][0] == 3  # 3 unique prompts for 6 rows
    assert all(w == (6, 1) for w in widths[1:])  # decode steps run the whole batch


class ScriptedFilter(LogitFilter):
    """Forces row b to emit script[b][k] at its k-th token of a step (None: the model's own argmax). With
    ``engine``, logits row j is the engine's batch row ``engine.live[j]`` (finished rows leave the decode batch)."""

    def __init__(self, base, scripts, engine=None):
        super().__init__(base.n_valid, base.banned)
        self.scripts, self.k, self.engine = scripts, 0, engine

    def __call__(self, logits):
        out = super().__call__(logits).clone()
        rows = self.engine.live if self.engine is not None else range(out.shape[0])
        for j, b in enumerate(rows):
            s = self.scripts[b] if b < len(self.scripts) else None
            if s is not None and self.k < len(s):
                out[j, s[self.k]] = 1e4
        self.k += 1
        return out


def test_stop_rules_and_holes(tiny_q3):
    eng = make_engine(tiny_q3)
    tok = eng.layout.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    box_after_think = enc("<think>left</think> [1, 2, 30, 40] and more")
    box_in_think = enc("<think>[1, 2, 3, 4]</think> ok<|im_end|> tail")
    box_no_think = enc("[5, 6, 70, 80] then <think>x</think> [1, 2, 3, 4]")
    base = eng.filter
    eng.filter = ScriptedFilter(base, [box_after_think, box_in_think, box_no_think, None], eng)
    images = [rand_image(i) for i in range(4)]
    res = eng.start(images, ["a", "b", "c", "d"], 0.0, 40)
    n1 = len(enc("<think>left</think> [1, 2, 30, 40]"))
    assert res[0].stop == "box" and res[0].token_ids == box_after_think[:n1]
    assert tok.decode(res[0].token_ids) == "<think>left</think> [1, 2, 30, 40]"
    n2 = len(enc("<think>[1, 2, 3, 4]</think> ok<|im_end|>"))
    assert res[1].stop == "eos" and res[1].token_ids == box_in_think[:n2]  # a box inside <think> does not stop
    assert res[2].stop == "box" and tok.decode(res[2].token_ids).endswith("</think> [1, 2, 3, 4]")
    assert res[3].stop == "length" and len(res[3].token_ids) == 40
    # Rows that stopped early left masked holes in the cache; the next step must still equal a full re-encode.
    eng.filter = base
    r1 = eng.refine([rand_image(40 + i) for i in range(4)], 0.0, 6)
    for b in range(4):
        lp, argmax = full_reencode(eng, [res[b], r1[b]])
        assert torch.allclose(torch.tensor(r1[b].logprobs), lp[-len(r1[b].token_ids):], atol=1e-4)
        assert r1[b].token_ids == argmax[-len(r1[b].token_ids):]


def test_the_keep_marker_ends_refinement_steps_only(tiny_q3):
    eng = make_engine(tiny_q3)
    enc = lambda s: eng.layout.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    keep = enc("<think>Box fits. Keep it.</think> [1, 2, 3, 4] more")
    eng.filter = ScriptedFilter(eng.filter, [keep])
    (r0,) = eng.start([rand_image(0)], ["a"], 0.0, 30)  # step 0 has no box to keep: the box ends it
    assert r0.stop == "box" and eng.layout.tokenizer.decode(r0.token_ids).endswith("Keep it.</think> [1, 2, 3, 4]")
    eng.filter.k = 0
    (r1,) = eng.refine([rand_image(1)], 0.0, 30)
    assert r1.stop == "box" and eng.layout.tokenizer.decode(r1.token_ids).endswith("Box fits. Keep it.</think>")
    eng.filter.k = 0
    (r2,) = eng.refine([rand_image(2)], 0.0, 30, keep_marker="")  # the env has keeping off: the box ends the step
    assert eng.layout.tokenizer.decode(r2.token_ids).endswith("Keep it.</think> [1, 2, 3, 4]")


def test_stop_without_think_requirement(tiny_q3):
    eng = make_engine(tiny_q3)
    eng.layout.prompts.stop_box_requires_think = False
    ids = eng.layout.tokenizer("[5, 6, 70, 80] more", add_special_tokens=False)["input_ids"]
    eng.filter = ScriptedFilter(eng.filter, [ids])
    (res,) = eng.start([rand_image(0)], ["a"], 0.0, 20)
    assert res.stop == "box" and eng.layout.tokenizer.decode(res.token_ids) == "[5, 6, 70, 80]"


def test_inverse_cdf_sampling_matches_probabilities():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3]] * 20000)
    g = torch.Generator().manual_seed(0)
    tok = sample_inverse_cdf(probs, g)
    counts = torch.bincount(tok, minlength=5).float() / len(tok)
    assert counts[0] == 0 and counts[2] == 0  # zero-probability ids are never drawn
    assert torch.allclose(counts, probs[0], atol=0.015)


def test_refine_needs_a_batch(tiny_q3):
    eng = make_engine(tiny_q3)
    with pytest.raises(RuntimeError, match="no batch"):
        eng.refine([rand_image(0)], 1.0, 4)
    eng.start([rand_image(0)], ["a"], 1.0, 2)
    with pytest.raises(ValueError, match="2 images for a batch of 1"):
        eng.refine([rand_image(0)] * 2, 1.0, 4)
    assert np.isfinite(eng.start([rand_image(0)], ["a"], 1.0, 2)[0].logprobs).all()


def test_branching_forks_the_cache(tiny_q3):
    """Rows with one share key get one sampled step-0 answer, generated once (decode width = distinct keys), and
    the forked caches continue exactly like a full re-encode of each row alone."""
    eng = make_engine(tiny_q3)
    eng.seed(3)
    widths = record_forward_shapes(eng)
    images, exprs = batch_inputs()  # prompts 0, 0, 0, 1, 1, 2
    share = [(0, 0), (0, 0), (0, 1), (1, 0), (1, 0), (2, 0)]
    r0 = eng.start(images, exprs, 1.0, 12, share=share)
    assert widths[0][0] == 3 and all(w == (4, 1) for w in widths[1:])  # 3 prompts, 4 step-0 answers
    assert r0[0].token_ids == r0[1].token_ids and r0[3].token_ids == r0[4].token_ids
    assert len(eng.rows) == 6 and eng.attn.shape[0] == 6
    r1 = eng.refine([rand_image(40 + i, *im.shape[:2]) for i, im in enumerate(images)], 0.7, 9)
    assert r1[0].token_ids != r1[1].token_ids or r1[3].token_ids != r1[4].token_ids  # siblings refine on their own
    for b in range(6):
        lp, _ = full_reencode(eng, [r0[b], r1[b]])
        mine = torch.tensor(r0[b].logprobs + r1[b].logprobs)
        assert torch.allclose(mine, lp, atol=1e-4), (b, (mine - lp).abs().max())
    with pytest.raises(ValueError, match="share step 0 but not the prompt"):
        eng.start(images, exprs, 1.0, 4, share=[0, 0, 0, 0, 0, 0])


class EndAt(LogitFilter):
    """Forces batch row b to emit an end-of-turn id as its ``ends[b]``-th token of a step (None: never); logits row
    j is row ``engine.live[j]`` (the decode batch loses its finished rows)."""

    def __init__(self, base, engine, end_id):
        super().__init__(base.n_valid, base.banned)
        self.engine, self.end_id, self.ends, self.k = engine, end_id, [], 0

    def __call__(self, logits):
        out = super().__call__(logits).clone()
        for j, b in enumerate(self.engine.live):
            if self.ends[b] == self.k:
                out[j, self.end_id] = 1e4
        self.k += 1
        return out


def test_finished_rows_leave_the_decode_batch(tiny_q3):
    """Rows end at different tokens (forced end-of-turn ids): the decode batch shrinks within the step, and both
    steps still equal a full re-encode of each row alone (tokens and log-probs, the forced ends left out), and the
    same run with the full batch kept (``shrink_at = 0``): same seed, same tokens."""
    ends = [[2, 5, 5, 9, 12, None, 3, 7], [6, None, 1, 4, 4, 10, 2, 8]]
    runs = {}
    for shrink in (0.25, 0.0):
        eng = make_engine(tiny_q3)
        eng.shrink_at = shrink
        eng.seed(5)
        base = eng.filter
        eng.filter = EndAt(base, eng, eng.layout.stop_ids[0])
        widths = record_forward_shapes(eng)
        images = [rand_image(i % 3) for i in range(8)]
        eng.filter.ends = ends[0]
        r0 = eng.start(images, [f"shape {i % 3}" for i in range(8)], 1.0, 14)
        eng.filter.ends, eng.filter.k = ends[1], 0
        r1 = eng.refine([rand_image(50 + i) for i in range(8)], 0.0, 12)  # greedy
        eng.filter = base
        runs[shrink] = (r0, r1, [w[0] for w in widths if w[1] == 1])
        for b in range(8):
            assert all(e[b] is None or len(r.token_ids) <= e[b] + 1 for r, e in zip((r0[b], r1[b]), ends))
            lp, argmax = full_reencode(eng, [r0[b], r1[b]])
            forced = [r.stop == "eos" and len(r.token_ids) == e[b] + 1 for r, e in zip((r0[b], r1[b]), ends)]
            keep = [not (f and i == len(r.token_ids) - 1) for r, f in zip((r0[b], r1[b]), forced)
                    for i in range(len(r.token_ids))]
            mine = torch.tensor(r0[b].logprobs + r1[b].logprobs)
            keep_t = torch.tensor(keep)
            assert torch.allclose(mine[keep_t], lp[keep_t], atol=1e-4), (shrink, b, (mine - lp)[keep_t].abs().max())
            n1 = len(r1[b].token_ids)
            greedy = [t for t, k in zip(argmax[-n1:], keep[-n1:]) if k]
            assert [t for t, k in zip(r1[b].token_ids, keep[-n1:]) if k] == greedy
    decode_rows = runs[0.25][2]  # rows of each decode forward, step 0 then step 1
    n0 = max(len(r.token_ids) for r in runs[0.25][0]) - 1  # step 0's decode forwards
    assert min(decode_rows[:n0]) < 8 and decode_rows[:n0] == sorted(decode_rows[:n0], reverse=True)
    assert decode_rows[n0] == 8 and min(decode_rows[n0:]) < 8  # step 1 starts on the full batch, shrinks again
    assert set(runs[0.0][2]) == {8}
    for a, b in zip(runs[0.25][0] + runs[0.25][1], runs[0.0][0] + runs[0.0][1]):
        assert a.token_ids == b.token_ids and a.stop == b.stop
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_lean_decode_equals_the_full_model_call(tiny_any):
    """The decode fast path (the text layers called directly) gives the tokens and log-probs of the model's own
    forward (``lean_decode = False``), same seed, sampled and greedy steps, both model families."""
    out = {}
    for lean in (True, False):
        eng = make_engine(tiny_any)
        assert lean_text_model(eng.model) is not None  # the fast path applies (else this test is void)
        eng.lean_decode = lean
        eng.seed(1)
        images, exprs = batch_inputs()
        r0 = eng.start(images, exprs, 1.0, 10)
        r1 = eng.refine([rand_image(60 + i, *im.shape[:2]) for i, im in enumerate(images)], 0.0, 8)
        out[lean] = r0 + r1
    for a, b in zip(out[True], out[False]):
        assert a.token_ids == b.token_ids and a.stop == b.stop
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_local_positions_memo_equals_get_rope_index(tiny_q3):
    """The engine's chunk positions are memoised by placeholder layout and grid: each equals the model's own
    get_rope_index of that sequence, for pending answers of any length and other grids."""
    eng = make_engine(tiny_q3)
    c1 = eng.layout.refine_chunk(rand_image(1))
    c2 = eng.layout.refine_chunk(rand_image(2, 96, 160))
    for pending in ([], [11], [12], [11, 13]):  # [11] and [12]: one layout, one memo entry
        for c in (c1, c2):
            seq = pending + c.ids
            got = eng._local_positions(seq, c.image_grid_thw)
            ids = torch.tensor([seq])
            want = eng.model.model.get_rope_index(input_ids=ids, image_grid_thw=c.image_grid_thw,
                                                  mm_token_type_ids=mm_token_types(ids, eng.layout.image_token_id))[0]
            assert torch.equal(got, want[:, 0, :])
    assert len(eng._pos_memo) == 6
    text = eng._local_positions([5, 6, 7], None)
    assert torch.equal(text, torch.arange(3).view(1, -1).expand(3, -1))
