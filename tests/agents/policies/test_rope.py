"""Rope positions without the model's per-row loop (agents.policies.rope) against the model's own get_rope_index."""

import numpy as np
import pytest
import torch

from agents.policies.rope import mrope_positions, rope_positions, supports
from agents.policies.vlm import VLMPolicy


def padded_batch(rows, image_id):
    """ids, mm types, attention mask (right-padded) and grids of ``rows``: each a list of ("text", n) or
    ("image", (t, h, w)) runs (images in row order; merge size 2)."""
    seqs, grids = [], []
    for runs in rows:
        seq = []
        for kind, v in runs:
            if kind == "text":
                seq += [7] * v
            else:
                seq += [image_id] * (v[0] * (v[1] // 2) * (v[2] // 2))
                grids.append(list(v))
        seqs.append(seq)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(rows), L), 3, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
    mm = (ids == image_id).to(torch.int32) * attn.to(torch.int32)
    return ids, mm, attn, torch.tensor(grids, dtype=torch.long)


def test_hand_computed_row():
    # 2 text tokens, a 4x4-patch image (2x2 tokens after the merge), 1 text token, 1 pad
    ids, mm, attn, grid = padded_batch([[("text", 2), ("image", (1, 4, 4)), ("text", 1)],
                                        [("text", 8)]], image_id=9)
    pos = mrope_positions(mm, grid, attn, 2)
    assert pos[:, 0].tolist() == [[0, 1, 2, 2, 2, 2, 4, 0],   # t: the image's tokens share p = 2
                                  [0, 1, 2, 2, 3, 3, 4, 0],   # h: p + row
                                  [0, 1, 2, 3, 2, 3, 4, 0]]   # w: p + column; then p = 2 + max(4, 4) // 2
    assert pos[:, 1].tolist() == [list(range(8))] * 3


@pytest.fixture(scope="module")
def q3(tiny_q3):
    return VLMPolicy.from_pretrained(tiny_q3, device="cpu", seed=0, full_finetune=True).hf_model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_models_get_rope_index(q3, seed):
    rng = np.random.RandomState(seed)
    image_id = int(q3.config.image_token_id)
    rows = []
    for _ in range(5):
        runs = [("text", int(rng.randint(1, 6)))]
        for _ in range(int(rng.randint(0, 4))):  # 0-3 images of uneven grids, text between (as in every layout)
            runs += [("image", (1, 2 * int(rng.randint(1, 6)), 2 * int(rng.randint(1, 6)))),
                     ("text", int(rng.randint(1, 9)))]
        rows.append(runs)
    ids, mm, attn, grid = padded_batch(rows, image_id)
    assert supports(q3)
    want = q3.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm, image_grid_thw=grid if len(grid) else None,
                                   attention_mask=attn)[0]
    got = mrope_positions(mm, grid.reshape(-1, 3), attn, q3.config.vision_config.spatial_merge_size)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(rope_positions(q3, ids, mm, grid.reshape(-1, 3), attn), want)


def test_other_families_keep_their_own_route(tiny_q25):
    m = VLMPolicy.from_pretrained(tiny_q25, device="cpu", seed=0, full_finetune=True).hf_model
    assert not supports(m)
    ids, mm, attn, grid = padded_batch([[("text", 3), ("image", (1, 4, 6)), ("text", 2)]],
                                       int(m.config.image_token_id))
    want = m.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=attn)[0]
    assert torch.equal(rope_positions(m, ids, mm, grid, attn), want)


def test_an_image_run_that_does_not_fit_its_grid_is_an_error():
    ids, mm, attn, grid = padded_batch([[("text", 2), ("image", (1, 4, 4)), ("text", 1)]], image_id=9)
    with pytest.raises(ValueError, match="image run of 4 tokens"):
        mrope_positions(mm, torch.tensor([[1, 4, 8]]), attn, 2)
    with pytest.raises(ValueError, match="token types"):
        mrope_positions(mm * 2, grid, attn, 2)
