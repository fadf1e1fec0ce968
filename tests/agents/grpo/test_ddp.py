"""Data parallel on CPU (gloo): gradients are averaged over ranks, and a real 2-process `torchrun` GRPO run ends
with bit-identical trainable parameters on both ranks although each rank collected different prompts."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from agents.common.checkpoint import latest_checkpoint, read_state
from agents.common.seeding import derive_seed
from agents.grpo.setup import sample_prompts

ROOT = Path(__file__).resolve().parents[3]


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from agents.common import distributed

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
        dist.barrier()  # no rank tears the group down while the other is still in a collective
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


# ------------------------------------------------------------------ token counts across ranks (unequal lengths)
class _TokenPolicy:
    """A policy of one learnable logit vector: token k of any trajectory has log-prob log_softmax(w)[k]."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5, 0.0, -0.4]))
        self.w_ref = torch.tensor([0.1, 0.0, 0.2, -0.1, 0.0])

    def token_logprobs(self, trajs, *, reference=False, grad=True):
        from agents.policies.base import TokenLogprobs

        with torch.set_grad_enabled(grad and not reference):
            logp = torch.log_softmax(self.w_ref if reference else self.w, dim=0)  # (V,)
            ent = -(logp.exp() * logp).sum()
            ids = [[k for s in t.steps for k in s.token_ids] for t in trajs]
            L = max(len(x) for x in ids)
            lp = torch.stack([torch.stack([logp[x[j]] if j < len(x) else logp[0] * 0 for j in range(L)]) for x in ids])
            mask = torch.tensor([[j < len(x) for j in range(L)] for x in ids])
            return TokenLogprobs(logprobs=lp, entropy=ent.expand(lp.shape) * 1.0, mask=mask)

    def trainable_parameters(self):
        return [self.w]


def _token_trajs(lengths, advs_seed):
    from rollouts.types import Step, Trajectory

    out = []
    for i, n in enumerate(lengths):
        ids = [(i + 2 * j) % 5 for j in range(n)]
        steps = [Step(t=0, text="", valid=True, iou=0.0, token_ids=ids[:1], logprobs=[0.0]),
                 Step(t=1, text="", valid=True, iou=0.0, token_ids=ids[1:], logprobs=[0.0] * (n - 1))]
        out.append(Trajectory(sample_id=f"s{advs_seed}-{i}", dataset="x", expression="", gt_box=[0, 0, 1, 1],
                              width=1, height=1, steps=steps))
    return out


# rank 0: 6 generated tokens, rank 1: 10 -> with per-rank denominators tokens weighed 1/12 and 1/20, not 1/16
RANK_LENGTHS = ([1, 2, 3], [4, 5, 1])
RANK_ADV = ([1.0, -0.5, 0.25], [-1.0, 0.75, 0.5])
AGGS = ("token_mean", "seq_mean", "seq_sum_norm")


def _grad_after_update(trajs, adv, aggregation):
    from agents.grpo.update import policy_update

    pol = _TokenPolicy()
    opt = torch.optim.SGD(pol.trainable_parameters(), lr=1.0)  # w_new = w - grad
    w0 = pol.w.detach().clone()
    policy_update(pol, opt, trajs, torch.tensor(adv), grad_accum=2, beta=0.04, entropy_coef=0.01,
                  aggregation=aggregation, norm_len=7.0, max_grad_norm=0.0)
    return w0 - pol.w.detach()


def _token_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trajs = _token_trajs(RANK_LENGTHS[rank], rank)
        grads = {a: _grad_after_update(trajs, RANK_ADV[rank], a) for a in AGGS}
        torch.save(grads, os.path.join(out_dir, f"g{rank}.pt"))
        dist.barrier()  # no rank tears the group down while the other is still in a collective
    finally:
        dist.destroy_process_group()


def test_two_ranks_unequal_lengths_give_the_one_process_full_batch_gradient(tmp_path):
    mp.spawn(_token_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"g{r}.pt", weights_only=True) for r in (0, 1))
    full = _token_trajs(RANK_LENGTHS[0], 0) + _token_trajs(RANK_LENGTHS[1], 1)
    for a in AGGS:
        want = _grad_after_update(full, RANK_ADV[0] + RANK_ADV[1], a)  # one process, the whole batch
        assert torch.equal(g0[a], g1[a])
        assert torch.allclose(g0[a], want, atol=1e-7, rtol=1e-6), (a, g0[a], want)
    # the per-rank token_mean denominators would differ from it
    naive = (_grad_after_update(_token_trajs(RANK_LENGTHS[0], 0), RANK_ADV[0], "token_mean")
             + _grad_after_update(_token_trajs(RANK_LENGTHS[1], 1), RANK_ADV[1], "token_mean")) / 2
    assert not torch.allclose(naive, g0["token_mean"], atol=1e-4)


# ------------------------------------------------------------------ a rank whose samples all fail at reset
class _Collector:
    def __init__(self, skipped):
        self.last_skipped = skipped


def _skip_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from agents.grpo.trainer import _check_skipped

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bad = [{"index": 7, "sample_id": "s7", "error": "cannot read image /data/broken.jpg"}]
        # rank 0 has trajectories to train on; every sample of rank 1 failed at reset
        collector, trajs = (_Collector([]), ["a trajectory"]) if rank == 0 else (_Collector(bad), [])
        try:
            result = f"returned {_check_skipped(collector, trajs, 4)}"
        except Exception as e:  # noqa: BLE001 - the test records what each rank saw
            result = f"{type(e).__name__}: {e}"
        dist.barrier()  # both ranks reach here: neither is left waiting in a collective
        (Path(out_dir) / f"skip{rank}.txt").write_text(result)
        dist.barrier()  # no rank tears the group down while the other is still in a collective
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_when_one_ranks_samples_all_fail(tmp_path):
    """Without the collective decision rank 0 would return and wait forever in the update's gradient all-reduce."""
    mp.spawn(_skip_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = ((tmp_path / f"skip{r}.txt").read_text() for r in (0, 1))
    assert r0.startswith("DatasetError: iteration 5: every sample of another rank failed at reset")
    assert r1.startswith("DatasetError: iteration 5: every sample failed at reset (1 bad records, e.g. sample 7 (s7)")


def test_torchrun_sharded_validation_equals_one_process(tmp_path):
    """GRPO validation under torchrun: each rank rolls out a share of the val scenes (rank 0: 0, 2, 4; rank 1: 1, 3)
    and every rank gets the metrics of all. Warm-started from the shipped BC model (it answers real boxes), the
    figures at iteration 1 equal one process evaluating the saved best/ (= iteration 1) on the same scenes."""
    from agents.evaluate.core import main as evaluate_main

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "agents.grpo", "train", "--init-from", str(ROOT / "assets" / "tiny-ivt-bc"), "--out", str(out),
           "--iterations", "1", "--max-refine-steps", "1", "--group-size", "2", "--prompts-per-iter", "2",
           "--branch-size", "1", "--max-new-tokens", "40", "--eval-every", "1", "--eval-limit", "5",
           "--image-every", "0", "--progress", "False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = read_state(latest_checkpoint(out))
    assert [e["iteration"] for e in state["evals"]] == [0, 1] and state["best_iteration"] == 1
    sharded = state["evals"][-1]
    assert sharded["miou"] > 0.1  # real boxes, so the comparison below can fail
    one = evaluate_main(["--model", str(out / "best"), "--split", "val", "--limit", "5", "--steps", "1",
                         "--max-new-tokens", "40", "--num-envs", "5", "--out", str(tmp_path / "eval"),
                         "--env-kwargs", '{"dataset_kwargs": {"split_sizes": {"val": 1000}}}'])
    assert one["n"] == 5
    for key in ("miou", "acc@0.5", "return_mean", "degradation_rate", "improve_rate"):
        assert abs(one[key] - sharded[key]) < 1e-6, (key, one[key], sharded[key])
    assert all(abs(a - b) < 1e-6 for a, b in zip(one["iou_step"], sharded["iou_step"]))
