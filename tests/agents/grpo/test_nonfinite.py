"""Non-finite rewards and updates end to end (issue 12): a NaN reward gets advantage 0, is counted and named; a huge
finite reward whose advantage overflows skips the update, repeated skips stop the run with a clear error, and no
checkpoint ever holds NaN/inf. Short runs of the toy policy (tests.agents.toy_policy) on IVT-Synthetic-v0."""

import math
import warnings

import pytest
import torch

from agents.grpo import trainer as grpo
from agents.common.checkpoint import latest_checkpoint
from agents.grpo.config import GRPOConfig
from agents.grpo.update import NonFiniteUpdateError, UpdateStats, check_finite_state, policy_update
from agents.common.run_logging import read_scalars


def nan_on_left_column(ious, valids, *, step, max_steps, boxes):
    """IoU at the last step, NaN when the final box lies in the toy grid's left column (x1 = 0)."""
    if step < max_steps:
        return 0.0
    return float("nan") if boxes[-1] is not None and boxes[-1][0] == 0 else float(ious[-1])


def huge(ious, valids, *, step, max_steps, boxes):
    """Finite but huge: 1e308 + 5e307 * x1 / 1000 (x1 in {0, 333, 666}); a group's sum overflows float64."""
    if step < max_steps:
        return 0.0
    return 1e308 + 5e307 * (boxes[-1][0] / 1000.0 if boxes[-1] is not None else 0.0)


def _cfg(out, **kw):
    base = dict(policy="tests.agents.toy_policy:ToyBoxPolicy", init_from="", out=str(out), iterations=2,
                max_refine_steps=1, group_size=4, prompts_per_iter=2, grad_accum=2, lr=0.5, beta=0.0,
                eval_every=0, save_every=1, image_every=0, progress=False, advantage="grpo")
    base.update(kw)
    return GRPOConfig(**base)


def _all_finite(ckpt):
    params = torch.load(ckpt / "trainable.pt", weights_only=True)
    return all(bool(torch.isfinite(p).all()) for p in params)


def test_nan_rewards_get_zero_advantage_are_counted_and_named(tmp_path):
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match=r"non-finite rewards from reward 'tests.agents.grpo.test_nonfinite:nan"
                                            r"_on_left_column'.*\(group \d, trajectory \d: nan\)"):
        summary = grpo.train(_cfg(out, reward="tests.agents.grpo.test_nonfinite:nan_on_left_column"))
    assert summary["iterations"] == 2
    rows = read_scalars(out)
    frac = [r["rollout/frac_nonfinite_reward"] for r in rows if "rollout/frac_nonfinite_reward" in r]
    assert len(frac) == 2 and max(frac) > 0
    skipped = [r["train/skipped_update"] for r in rows if "train/skipped_update" in r]
    assert skipped == [0.0, 0.0]
    ckpt = latest_checkpoint(out)
    assert _all_finite(ckpt)


def test_huge_reward_skips_updates_then_stops_clearly(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--policy", "tests.agents.toy_policy:ToyBoxPolicy", "--init-from", "", "--out", str(out),
            "--iterations", "5", "--max-refine-steps", "1", "--group-size", "4", "--branch-size", "1", "--prompts-per-iter", "2",
            "--lr", "0.5", "--beta", "0", "--eval-every", "0", "--save-every", "1", "--image-every", "0",
            "--progress", "False", "--reward", "tests.agents.grpo.test_nonfinite:huge", "--max-skipped-updates", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc = grpo.main(argv)
    err = capsys.readouterr().err
    assert rc == 1
    assert "2 updates in a row skipped (non-finite advantage" in err and "max_skipped_updates" in err
    # iteration 1 was checkpointed (its parameters untouched by the skipped update), iteration 2 never
    ckpt = latest_checkpoint(out)
    assert ckpt.name.endswith("1") and _all_finite(ckpt)
    from tests.agents.toy_policy import ToyBoxPolicy

    assert torch.equal(torch.load(ckpt / "trainable.pt", weights_only=True)[0], ToyBoxPolicy().logits.detach())


def test_policy_update_skips_nonfinite_advantage_loss_and_gradient():
    from tests.agents.grpo.test_ddp import _TokenPolicy, _token_trajs

    from agents.grpo.advantages import compute_advantages

    trajs = _token_trajs([2, 3], 0)
    # dr_grpo on rewards (1e39, 0): +-5e38 is finite in float64 but overflows the float32 loss
    overflow = compute_advantages("dr_grpo", torch.tensor([[1e39, 0.0]], dtype=torch.float64)).reshape(-1)
    assert torch.isfinite(overflow).all() and not torch.isfinite(overflow.float()).all()
    for adv, poison in ((overflow.tolist(), None), ([float("inf"), 1.0], None), ([1.0, -1.0], "loss"),
                        ([1.0, -1.0], "grad")):
        pol = _TokenPolicy()
        opt = torch.optim.AdamW(pol.trainable_parameters(), lr=0.1)
        w0 = pol.w.detach().clone()
        if poison == "loss":
            real = pol.token_logprobs
            pol.token_logprobs = lambda t, _real=real, **k: _nan_logprobs(_real(t, **k))
        if poison == "grad":
            pol.w.register_hook(lambda g: g * math.inf)
        stats = policy_update(pol, opt, trajs, torch.tensor(adv), beta=0.0)
        assert isinstance(stats, UpdateStats) and stats.skipped.startswith("non-finite")
        assert torch.equal(pol.w.detach(), w0) and not opt.state  # no step: no parameter, no moment touched
        assert stats.as_dict()["skipped_update"] == 1.0


def _nan_logprobs(tl):
    from agents.policies.base import TokenLogprobs

    return TokenLogprobs(logprobs=tl.logprobs * math.nan, entropy=tl.entropy, mask=tl.mask)


def test_check_finite_state_refuses_nan_parameters_and_moments():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    check_finite_state([p], opt)
    opt.state[p]["exp_avg"][0] = math.nan
    with pytest.raises(NonFiniteUpdateError, match="optimizer state 'exp_avg'"):
        check_finite_state([p], opt)
    with pytest.raises(NonFiniteUpdateError, match="trainable parameter 0"):
        check_finite_state([torch.tensor([math.inf])])


def test_dr_grpo_needs_seq_sum_norm():
    with pytest.raises(ValueError, match="dr_grpo .*seq_sum_norm"):
        GRPOConfig(advantage="dr_grpo").validate()
    GRPOConfig(advantage="dr_grpo", aggregation="seq_sum_norm").validate()
    GRPOConfig(advantage="centered").validate()


def test_save_never_writes_a_nonfinite_checkpoint(tmp_path):
    from agents.common.distributed import DistInfo
    from tests.agents.toy_policy import ToyBoxPolicy

    cfg = _cfg(tmp_path / "run")
    pol = ToyBoxPolicy()
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    with torch.no_grad():
        pol.logits[0, 0] = math.nan
    state = {"iteration": 3, "best_val_reward": None, "best_iteration": None, "evals": []}
    with pytest.raises(NonFiniteUpdateError, match="checkpoint of iteration 3: trainable parameter 0"):
        grpo._save(tmp_path / "run", cfg, pol, opt, sched, state, DistInfo())
    assert latest_checkpoint(tmp_path / "run") is None
