"""Data parallel on CPU (gloo): gradients are averaged over ranks, and a real 2-process `torchrun` GRPO run ends
with bit-identical trainable parameters on both ranks although each rank collected different prompts."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from agents.checkpoint import latest_checkpoint, read_state
from agents.grpo_setup import derive_seed, sample_prompts

ROOT = Path(__file__).resolve().parents[2]


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from agents import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different initial values on each rank
        w = torch.nn.Parameter(torch.randn(3, 2))
        b = torch.nn.Parameter(torch.randn(2))
        distributed.broadcast_parameters([w, b])  # -> rank 0's values everywhere
        w.grad = torch.full((3, 2), float(rank + 1))  # rank 0: 1, rank 1: 2 -> mean 1.5
        b.grad = None  # a missing grad counts as zeros
        if rank == 1:
            b.grad = torch.tensor([4.0, -2.0])  # -> mean (2, -1)
        distributed.all_reduce_grads([w, b])
        means = distributed.all_reduce_mean({"x": float(rank)})
        digest = distributed.param_digest([w, b])
        torch.save({"w": w.detach(), "b": b.detach(), "gw": w.grad, "gb": b.grad, "mean": means["x"],
                    "digest": digest, "all": distributed.gather_objects(rank)}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_and_broadcast_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(100)
    w0 = torch.randn(3, 2)
    assert torch.equal(r0["w"], w0) and torch.equal(r1["w"], w0)
    assert torch.equal(r0["gw"], torch.full((3, 2), 1.5)) and torch.equal(r1["gw"], r0["gw"])
    assert torch.equal(r0["gb"], torch.tensor([2.0, -1.0])) and torch.equal(r1["gb"], r0["gb"])
    assert r0["mean"] == r1["mean"] == 0.5
    assert r0["digest"] == r1["digest"]
    assert r0["all"] == r1["all"] == [0, 1]


def test_torchrun_two_ranks_identical_parameters(tmp_path):
    from agents.policies.tiny import build_tiny_model

    model = tmp_path / "tiny"
    build_tiny_model(str(model), seed=0)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "agents.grpo", "train", "--init-from", str(model), "--out", str(out), "--iterations", "1",
           "--max-refine-steps", "1", "--group-size", "2", "--prompts-per-iter", "2", "--grad-accum", "2",
           "--max-new-tokens", "6", "--lr", "1e-2", "--eval-every", "0", "--image-every", "0", "--progress", "False",
           "--branch-size", "1",
           "--lora.rank", "4", "--lora.alpha", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    state = read_state(latest_checkpoint(out))
    assert state["iteration"] == 1 and state["world_size"] == 2
    digests = state["param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # the ranks trained on different prompts (so equal parameters come from the gradient all-reduce)
    assert sample_prompts(20000, 2, derive_seed(0, 0, 0, 1)) != sample_prompts(20000, 2, derive_seed(0, 1, 0, 1))
    # and the update did something: the LoRA B matrices (half of the LoRA tensors) start at zero
    params = torch.load(latest_checkpoint(out) / "trainable.pt", weights_only=True)
    assert sum(int(p.abs().sum() == 0) for p in params) < len(params) // 2
