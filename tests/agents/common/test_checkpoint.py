"""Atomic checkpoints: round trip of parameters, optimizer, scheduler, RNG and state; atomic replacement."""

import json
import os
import random

import numpy as np
import pytest
import torch

from agents.common.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


class TinyPolicy:
    """Two linear layers, only the second trainable (stands in for base weights + LoRA)."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.frozen = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 2)
        self.frozen.requires_grad_(False)
        self.saved_to = []

    def trainable_parameters(self):
        return list(self.head.parameters())

    def save(self, directory):
        os.makedirs(directory, exist_ok=True)
        torch.save(self.head.state_dict(), os.path.join(directory, "head.pt"))
        self.saved_to.append(directory)


def _train_steps(policy, opt, sched, n):
    for _ in range(n):
        x = torch.randn(5, 3)
        loss = policy.head(policy.frozen(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _make(seed=0):
    pol = TinyPolicy(seed)
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return pol, opt, sched


def test_round_trip_restores_everything(tmp_path):
    pol, opt, sched = _make()
    _train_steps(pol, opt, sched, 3)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    d = save_checkpoint(checkpoint_dir(tmp_path, 3), policy=pol, optimizer=opt, scheduler=sched,
                        state={"iteration": 3, "best": 0.25})
    expect_draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    expect_params = [p.detach().clone() for p in pol.trainable_parameters()]
    expect_sched = sched.state_dict()
    # continue the original for 2 more steps
    _train_steps(pol, opt, sched, 2)
    after_params = [p.detach().clone() for p in pol.trainable_parameters()]

    pol2, opt2, sched2 = _make(seed=0)  # same frozen base, as loaded from disk in real use
    with torch.no_grad():
        for p in pol2.trainable_parameters():
            p.normal_()  # trainable tensors must be overwritten by the checkpoint
    state = load_checkpoint(d, policy=pol2, optimizer=opt2, scheduler=sched2)
    assert state == {"iteration": 3, "best": 0.25}
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expect_draws
    for a, b in zip(pol2.trainable_parameters(), expect_params):
        assert torch.equal(a, b)
    assert sched2.state_dict() == expect_sched and sched2.last_epoch == 3
    assert opt2.state_dict()["state"][0]["step"].item() == 3
    # resumed continuation is bit-identical to the uninterrupted one
    load_checkpoint(d, policy=pol2, optimizer=opt2, scheduler=sched2)
    random.random(), np.random.rand(), torch.rand(())  # the same draws as the original made after saving
    _train_steps(pol2, opt2, sched2, 2)
    for a, b in zip(pol2.trainable_parameters(), after_params):
        assert torch.equal(a, b)
    # the frozen layer is not part of the checkpoint
    assert len(torch.load(d / "trainable.pt", weights_only=True)) == 2
    assert pol.saved_to and (d / "policy" / "head.pt").is_file()
    assert json.loads((d / "state.json").read_text())["iteration"] == 3


def test_replace_is_atomic_and_leaves_no_temp(tmp_path):
    pol, opt, sched = _make()
    d = tmp_path / "best"
    save_checkpoint(d, policy=pol, optimizer=opt, state={"v": 1})
    save_checkpoint(d, policy=pol, optimizer=opt, state={"v": 2})
    assert json.loads((d / "state.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]

    class Boom(TinyPolicy):
        def save(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_checkpoint(d, policy=Boom(), state={"v": 3})
    assert json.loads((d / "state.json").read_text()) == {"v": 2}  # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_latest_list_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for it in (2, 10, 4):
        save_checkpoint(checkpoint_dir(tmp_path, it), state={"iteration": it})
    (tmp_path / "checkpoints" / ".iter_000011.tmp-x").mkdir()  # a crashed write: ignored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000002", "iter_000004", "iter_000010"]
    assert latest_checkpoint(tmp_path).name == "iter_000010"
    assert latest_checkpoint(tmp_path / "checkpoints" / "iter_000004").name == "iter_000004"
    prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000010"]


def test_mismatch_errors_name_the_file(tmp_path):
    pol, opt, _ = _make()
    d = save_checkpoint(tmp_path / "c", policy=pol, optimizer=opt, state={})
    other = TinyPolicy()
    other.head = torch.nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match="trainable.pt"):
        load_checkpoint(d, policy=other)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(TypeError, match="not JSON"):
        save_checkpoint(tmp_path / "c2", state={"x": object()})


def test_unreadable_and_hostile_checkpoint_files_are_named(tmp_path):
    import pickle

    pol, opt, sched = _make()
    d = save_checkpoint(tmp_path / "c", policy=pol, optimizer=opt, scheduler=sched, state={})
    (d / "optimizer.pt").write_bytes((d / "optimizer.pt").read_bytes()[:40])  # cut short
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: unreadable checkpoint file"):
        load_checkpoint(d, policy=pol, optimizer=opt)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (d / "trainable.pt").write_bytes(pickle.dumps(Evil()))  # weights_only refuses it, and we say which file
    with pytest.raises(CheckpointError, match=r"trainable\.pt: unreadable checkpoint file \(UnpicklingError"):
        load_checkpoint(d, policy=pol)
    (d / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"state\.json: unreadable checkpoint state"):
        load_checkpoint(d)


def test_apply_schedule_rebuilds_the_lr_for_a_longer_run():
    import math

    from agents.common.checkpoint import apply_schedule

    def cosine(total):
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / total, 1.0)))

    pol = TinyPolicy()
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(4))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-4, 8.5355e-5, 5e-5, 1.4645e-5], rel=1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-20)  # where the 4-step run ended
    state = sched.state_dict()
    opt2 = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-4)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, cosine(6))  # the run extended to 6 steps
    opt2.load_state_dict(opt.state_dict())  # load_checkpoint's order: optimizer, then scheduler
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-20)  # the bug: step 5 would train at lr 0
    apply_schedule(opt2, sched2)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))  # 2.5e-5
    assert sched2.get_last_lr() == [opt2.param_groups[0]["lr"]]
    # an unchanged run gets exactly the value its schedule had set (resumes stay bit-identical)
    sched3 = torch.optim.lr_scheduler.LambdaLR(opt2, cosine(4))
    sched3.load_state_dict(state)
    apply_schedule(opt2, sched3)
    assert opt2.param_groups[0]["lr"] == 1e-4 * cosine(4)(4)
    # a resume with another --lr: the checkpoint restored the old peak (1e-4) into base_lrs; the new one is used
    sched4 = torch.optim.lr_scheduler.LambdaLR(opt2, cosine(6))
    sched4.load_state_dict(state)
    apply_schedule(opt2, sched4, lr=3e-4)
    assert opt2.param_groups[0]["lr"] == pytest.approx(3e-4 * 0.25) and sched4.base_lrs == [3e-4]


def test_clean_interrupted_saves(tmp_path):
    from agents.common.checkpoint import clean_interrupted_saves

    save_checkpoint(checkpoint_dir(tmp_path, 2), state={"iteration": 2})
    (tmp_path / "checkpoints" / ".iter_000003.tmp-abc123").mkdir()  # killed mid-save
    (tmp_path / "checkpoints" / ".iter_000003.tmp-abc123" / "trainable.pt").write_bytes(b"x")
    (tmp_path / ".best.tmp-zz").mkdir()
    old = tmp_path / ".best.old-4242"  # killed between moving the old best aside and moving the new one in
    save_checkpoint(old, state={"iteration": 1})
    (tmp_path / "notes.txt").write_text("mine")
    done = clean_interrupted_saves(tmp_path)
    assert len(done) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoints", "notes.txt"]
    assert json.loads((tmp_path / "best" / "state.json").read_text()) == {"iteration": 1}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter_000002"]
    assert clean_interrupted_saves(tmp_path) == []
