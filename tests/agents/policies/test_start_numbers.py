"""BCLossOptions.clone_start_numbers=False (issue 14): step 0's box coordinates are context, the rest trains."""

import torch

from agents.policies.base import BCLossOptions
from agents.policies.logprobs import IGNORE, EncodedTrajectory, mask_targets, number_token_ids
from agents.policies.vlm import VLMPolicy
from rollouts.types import Step, Trajectory
from .conftest import rand_image


def encoded(labels, steps):
    n = len(labels)
    return EncodedTrajectory(input_ids=torch.zeros(n, dtype=torch.long), labels=torch.tensor(labels),
                             mm_token_type_ids=torch.zeros(n, dtype=torch.int32), pixel_values=torch.zeros(0, 4),
                             image_grid_thw=torch.zeros(0, 3), step_index=torch.tensor(steps))


def test_mask_targets_start_numbers_by_hand():
    """Ids 17 and 42 are 'numbers': masked in step 0 only, in multi-step and single-step sequences alike."""
    multi = encoded([IGNORE, IGNORE, 5, 17, 42, 6, IGNORE, 17, 9], [0, 0, 0, 0, 0, 0, 1, 1, 1])
    single = encoded([IGNORE, 8, 42, 17, 3], [0, 0, 0, 0, 0])
    mask_targets([multi, single], start_number_ids=torch.tensor([17, 42]))
    assert multi.labels.tolist() == [IGNORE, IGNORE, 5, IGNORE, IGNORE, 6, IGNORE, 17, 9]  # step 1's 17 trains
    assert single.labels.tolist() == [IGNORE, 8, IGNORE, IGNORE, 3]
    # with clone_start=False the multi-step sequence's step 0 goes entirely; the single-step one keeps its words
    multi = encoded([IGNORE, IGNORE, 5, 17, 42, 6, IGNORE, 17, 9], [0, 0, 0, 0, 0, 0, 1, 1, 1])
    single = encoded([IGNORE, 8, 42, 17, 3], [0, 0, 0, 0, 0])
    mask_targets([multi, single], clone_start=False, start_number_ids=torch.tensor([17, 42]))
    assert multi.labels.tolist() == [IGNORE] * 7 + [17, 9]
    assert single.labels.tolist() == [IGNORE, 8, IGNORE, IGNORE, 3]


def test_number_token_ids_tiny_tokenizer(tiny_q3):
    """The tiny tokenizer has one token per whole number 0..1000 and no other all-digit token."""
    tok = VLMPolicy.from_pretrained(tiny_q3, device="cpu").tokenizer
    ids = number_token_ids(tok)
    assert sorted(tok.decode([i]) for i in ids.tolist()) == sorted(str(n) for n in range(1001))
    assert tok.convert_tokens_to_ids("<think>") not in ids.tolist()
    assert number_token_ids(tok) is ids  # scanned once per tokenizer


def test_bc_loss_keeps_start_words_and_stop_marker(tiny_q3):
    """The labels left in step 0 decode to its text without the four coordinates; step 1 keeps its numbers."""
    pol = VLMPolicy.from_pretrained(tiny_q3, device="cpu")
    texts = ["<think>Target at left. It fits.</think> <stop> [12, 30, 400, 1000]",
             "<think>Box fits.</think> <stop> [15, 30, 400, 999]"]
    traj = Trajectory("s0", "synthetic", "the blue circle", [2, 4, 51, 128], 128, 128,
                      steps=[Step(t, s, True, 0.5) for t, s in enumerate(texts)],
                      meta={"image": rand_image(0), "allow_stop": True})
    full = pol.encode_trajectory(traj)
    enc = pol.encode_trajectory(traj)
    with torch.no_grad():
        _, n = pol.bc_loss([traj], BCLossOptions(clone_start_numbers=False), encoded=[enc])
    kept0 = enc.labels[(enc.step_index == 0) & (enc.labels != IGNORE)].tolist()
    kept1 = enc.labels[(enc.step_index == 1) & (enc.labels != IGNORE)].tolist()
    assert pol.tokenizer.decode(kept0) == "<think>Target at left. It fits.</think> <stop> [, , , ]"
    assert kept1 == full.labels[(full.step_index == 1) & (full.labels != IGNORE)].tolist()
    assert n == full.n_generated - 4  # exactly the four step-0 coordinates left the loss
