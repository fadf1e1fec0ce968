"""Where a GRPO iteration and a behaviour-cloning step spend their time, before and after issue 16; prints JSON.

Both measured in ONE run on the same inputs, interleaved (before, after, after, before, ...), so the RATIOS hold on
a noisy machine even when the seconds do not.

GRPO (``--part grpo``): the default run (configs/grpo_cpu.yaml: 8 prompts x N = 6, T = 2, branch 3, beta 0.04, from
assets/tiny-ivt-bc). Each repetition runs iteration ``it`` twice from the SAME weights and optimizer state: once
"before" and once "after", and checks that both give the same rollout tokens, loss, gradient norm and updated
weights. The iteration is the trainer's own (``agents.grpo.trainer._iteration``, teacher guidance as
configured). Stages (seconds per iteration): ``collect`` (rollouts, rewards), ``advantages`` (with the guidance
sequences), ``reference_pass`` and
``policy_forward`` (teacher-forced passes, encoding excluded), ``guide_forward`` (the teacher-guidance
cross-entropy's forward), ``encode`` (building the training sequences of the
update: image processor, ids), ``loss``, ``backward``, ``optimizer`` (clip + AdamW), ``logging`` (the rollout
metrics of the log line), ``other`` (the rest of the update).

BC (``--part bc``): the default run (configs/bc_cpu.yaml, a fresh tiny model from scratch) at phase 1 (single-step
grounding samples of one-object scenes) and phase 2 (half IVT teacher trajectories of T = 2). Per repetition a block
of ``--bc-steps`` consecutive steps "before" and the same steps "after", from the same weights. Stages: ``data``
(synthesis: scenes, expressions, scripted student, teacher, overlays; "after": the wait for the worker), ``encode``
(image processor, ids), ``forward`` (+ loss), ``backward``, ``optimizer``.

"before": the routes before issue 16: every chunk through the multimodal processor, no encoding memo, every image
through the vision tower, the patch embedding as a Conv3d, one right-padded forward per teacher-forced pass, BC
batches drawn and encoded in the training process. "after" (issue 16; ``agents.policies.vision.ENABLED`` and
``PromptLayout.fast_encode`` switch it): numpy pixel values + memoised text ids (:meth:`PromptLayout.encode`), one
encoding per observation per GRPO iteration (``VLMPolicy.encoding_cache``), the vision tower once per distinct image
(rollout and update), the patch embedding as a matmul, shared segments (prompt; step-0 answer + step-1 chunk of
branch siblings) run once in the teacher-forced passes, uneven batches as two length buckets. "after_prefetch" (BC
only): "after" plus the batches drawn and encoded in a worker process (:class:`agents.bc.data.Prefetcher`, option
``prefetch``, off by default). "after" also drops finished rows from the rollout engine's decode batch mid-step
(``RolloutEngine.shrink_at``) and runs its decode forwards through the text layers directly (``lean_decode``);
"after_noshrink" (GRPO only, ``--grpo-noshrink 1``): "after" with the finished rows kept (``shrink_at = 0``), so
``shrink_speedup`` (after_noshrink / after) is what that buys, same run, same tokens.

Rollout batch (third pass of issue 16): "before" collects in engine batches of the default before issue 16
(``--before-rollout-batch``, 0: min(prompts x N, 4 N) = 24), "after" with the config's ``rollout_batch`` (-1: all
8 x 6 trajectories in one batch). Other batches draw other random numbers per row, so "after" samples other
trajectories than "before" (``same_step_tokens`` 0, no weight comparison: the curves of whole runs are compared
instead, README "Benchmarks"); "after_oldbatch" (``--grpo-oldbatch 1``, the default) runs the new code at the old
batch, checked against "before" (same tokens, loss, gradient norm, weights), and ``rollout_batch_speedup``
(after_oldbatch / after) is what the one batch buys. The vision tower's per-image attention runs batched per patch
count in "after" (:func:`agents.policies.vision.batched_vision_attention`); the reference pass computes no
entropies and the engine memoises chunk positions in every mode (so "before" is slightly faster than before
issue 16: the ratios are conservative).

    OMP_NUM_THREADS=1 python benchmarks/grpo_iteration.py --threads 1               # both parts, about 3 min
    OMP_NUM_THREADS=1 python benchmarks/grpo_iteration.py --part grpo --reps 4 --grpo-noshrink 0
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


class Clock:
    """Accumulated seconds per stage; ``stage(name)`` nests (the inner time is also in the outer stage)."""

    def __init__(self):
        self.s: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] += time.perf_counter() - t0


def set_mode(policy, after: bool, shrink: bool = True) -> None:
    from agents.policies import vision
    from agents.policies.engine import RolloutEngine

    policy.layout.fast_encode = after
    vision.ENABLED = after
    policy.engine.shrink_at = RolloutEngine.shrink_at if after and shrink else 0.0
    policy.engine.lean_decode = after


@contextlib.contextmanager
def patched(obj, name, wrapper):
    orig = getattr(obj, name)
    setattr(obj, name, wrapper(orig))
    try:
        yield
    finally:
        setattr(obj, name, orig)


def timed(clock: Clock, name: str, fn):
    def f(*a, **k):
        with clock.stage(name):
            return fn(*a, **k)
    return f


@contextlib.contextmanager
def instrument(clock: Clock, policy, optimizer):
    """Time encode_trajectory, the teacher-forced passes, backward and the optimizer without touching the code."""
    def enc(orig):
        def f(*a, **k):
            with clock.stage("encode"):
                return orig(*a, **k)
        return f

    def tlp(orig):
        def f(trajs, *, reference=False, grad=True):
            before = clock.s["encode"]
            t0 = time.perf_counter()
            out = orig(trajs, reference=reference, grad=grad)
            dt = time.perf_counter() - t0 - (clock.s["encode"] - before)
            clock.s["reference_pass" if reference else "policy_forward"] += dt
            return out
        return f

    def bcl(orig):  # the teacher-guidance cross-entropy's forward (GRPO guide_coef), encoding excluded
        def f(*a, **k):
            before = clock.s["encode"]
            t0 = time.perf_counter()
            out = orig(*a, **k)
            clock.s["guide_forward"] += time.perf_counter() - t0 - (clock.s["encode"] - before)
            return out
        return f

    def bwd(orig):
        def f(self, *a, **k):
            with clock.stage("backward"):
                return orig(self, *a, **k)
        return f

    def opt(orig):
        def f(*a, **k):
            with clock.stage("optimizer"):
                return orig(*a, **k)
        return f

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(policy, "encode_trajectory", enc))
        stack.enter_context(patched(policy, "token_logprobs", tlp))
        stack.enter_context(patched(policy, "bc_loss", bcl))
        stack.enter_context(patched(torch.Tensor, "backward", bwd))
        stack.enter_context(patched(optimizer, "step", opt))
        stack.enter_context(patched(torch.nn.utils, "clip_grad_norm_", opt))
        yield


def snapshot(policy, optimizer):
    return ({k: v.detach().clone() for k, v in policy.model.state_dict().items()}, copy.deepcopy(optimizer.state_dict()))


def restore(policy, optimizer, snap):
    policy.model.load_state_dict(snap[0])
    optimizer.load_state_dict(copy.deepcopy(snap[1]))


def max_param_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------------------------------------------ GRPO
def grpo_part(args) -> dict:
    import dataclasses

    from agents.common.config import parse_train_command
    from agents.common.distributed import DistInfo
    from agents.common.seeding import seed_everything
    from agents.evaluate.metrics import compute_metrics
    from agents.grpo import trainer as grpo_trainer
    from agents.grpo.config import GRPOConfig
    from agents.grpo.setup import build_policy, env_factory, make_optimizer, split_size, strip_for_gather
    from agents.policies.base import SamplingParams
    from rollouts.collector import Collector

    cfg = parse_train_command(["train"] + args.grpo_args, GRPOConfig, default_config="grpo_cpu.yaml", prog="bench",
                              usage="", description="")
    seed_everything(cfg.seed)
    policy = build_policy(cfg)
    optimizer = make_optimizer(list(policy.trainable_parameters()), cfg)
    train_env = env_factory(cfg, cfg.train_split)
    n_train = split_size(train_env)
    old_slots = args.before_rollout_batch or min(cfg.prompts_per_iter * cfg.group_size, 4 * cfg.group_size)
    new_slots = cfg.rollout_slots()
    collectors = {"new": Collector(train_env, num_envs=new_slots)}
    collectors["old"] = collectors["new"] if old_slots == new_slots else Collector(train_env, num_envs=old_slots)
    sampling = dataclasses.replace(SamplingParams.from_config(cfg), branch=cfg.branch_size)
    norm_len = cfg.max_new_tokens * (cfg.max_refine_steps + 1)

    def iteration(it: int, mode: str, clock: Clock):
        """The trainer's own iteration (``grpo_trainer._iteration``: collect, advantages, guidance, update), its
        stages timed by wrapping the collector and the update; ``advantages`` is the rest (rewards, advantages,
        guidance sequences)."""
        after = mode != "before"
        set_mode(policy, after, shrink=mode != "after_noshrink")
        collector = collectors["old" if mode in ("before", "after_oldbatch") else "new"]
        cache = grpo_trainer._encoding_cache(policy) if after else contextlib.nullcontext()
        with contextlib.ExitStack() as stack:
            stack.enter_context(instrument(clock, policy, optimizer))
            stack.enter_context(patched(collector, "collect", lambda f: timed(clock, "collect", f)))
            stack.enter_context(patched(grpo_trainer, "policy_update", lambda f: timed(clock, "update", f)))
            stack.enter_context(cache)
            t0 = time.perf_counter()
            c0, u0 = clock.s["collect"], clock.s["update"]
            with clock.stage("total"):
                stats, _, _, batch, _, _ = grpo_trainer._iteration(cfg, it, policy, optimizer, collector, sampling,
                                                                   n_train, DistInfo(), norm_len)
                clock.s["advantages"] += (time.perf_counter() - t0) - (clock.s["collect"] - c0) - (
                    clock.s["update"] - u0)
                with clock.stage("logging"):
                    compute_metrics([strip_for_gather(t) for t in batch])
        tokens = [tuple(s.token_ids) for t in batch for s in t.steps]
        return stats, tokens

    n_img = {}
    iteration(0, "after", Clock())  # warm-up (not timed)
    modes = ["before", "after"] + (["after_noshrink"] if args.grpo_noshrink else []) + (
        ["after_oldbatch"] if args.grpo_oldbatch and old_slots != new_slots else [])
    clocks = {m: Clock() for m in modes}
    checks = []
    for r in range(args.reps):
        it = 1 + r
        snap = snapshot(policy, optimizer)
        res = {}
        secs = {}
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            restore(policy, optimizer, snap)
            hits0 = policy.layout.cache_hits
            t_before = clocks[mode].s["total"]
            stats, tokens = iteration(it, mode, clocks[mode])
            secs[mode] = clocks[mode].s["total"] - t_before
            n_img[mode] = policy.layout.cache_hits - hits0
            res[mode] = (stats, tokens, {k: v.detach().clone() for k, v in policy.model.state_dict().items()})
        sb, tb, pb = res["before"]
        for mode in modes[1:]:
            sa, ta, pa = res[mode]
            same_tok = sum(x == y for x, y in zip(tb, ta)) / max(len(tb), 1)
            sfx = "" if mode == "after" else "_" + mode
            checks.append({"iteration": it, "mode": mode, "same_step_tokens": round(same_tok, 4),
                           "rollout_batch": old_slots if mode in ("before", "after_oldbatch") else new_slots,
                           "loss_before": sb.loss, f"loss{sfx or '_after'}": sa.loss,
                           "grad_norm_before": sb.grad_norm, f"grad_norm{sfx or '_after'}": sa.grad_norm,
                           "max_param_diff": max_param_diff(pb, pa) if same_tok == 1.0 else None,
                           "iteration_speedup": round(secs["before"] / secs[mode], 2)})
        if "after_noshrink" in secs:
            checks[-1]["shrink_speedup"] = round(secs["after_noshrink"] / secs["after"], 3)
        if "after_oldbatch" in secs:
            checks[-1]["rollout_batch_speedup"] = round(secs["after_oldbatch"] / secs["after"], 3)
        # continue from the "after" weights
    set_mode(policy, True)
    out = {"config": "grpo_cpu.yaml", "reps": args.reps, "modes": modes, "checks": checks,
           "rollout_batch": {"before": old_slots, "after": new_slots},
           "fast_encode_kept": bool(policy.layout.fast_encode), "encode_memo_hits_per_iteration": n_img.get("after")}
    return {**out, **summarise(clocks, args.reps, "iteration_s")}


def summarise(clocks: dict, n: int, total_name: str) -> dict:
    out = {}
    for mode, c in clocks.items():
        s = {k: v / n for k, v in c.s.items()}
        if "update" in s:  # the update's parts; "other" = its remainder (loss, bookkeeping)
            parts = ("reference_pass", "policy_forward", "guide_forward", "encode", "backward", "optimizer")
            s["update_other"] = s["update"] - sum(s.get(k, 0.0) for k in parts)
        s[total_name] = s.pop("total")
        out[mode] = {k: round(v, 4) for k, v in sorted(s.items())}
    b = out["before"]
    for mode in [m for m in clocks if m != "before"]:
        a = out[mode]
        key = "speedup" if mode == "after" else f"speedup_{mode}"
        out[key] = {k: round(b[k] / a[k], 2) for k in b if k in a and a[k] > 1e-4 and b[k] > 1e-4}
    if "after_noshrink" in out:  # what dropping finished rows from the decode batch buys, everything else equal
        a, n = out["after"], out["after_noshrink"]
        out["shrink_speedup"] = {k: round(n[k] / a[k], 3) for k in a if k in n and a[k] > 1e-4 and n[k] > 1e-4}
    return out


# -------------------------------------------------------------------------------------------------------- BC
def bc_part(args) -> dict:
    from agents.bc.config import BCConfig
    from agents.bc.data import Prefetcher
    from agents.bc.setup import build_data, build_policy
    from agents.common.config import parse_train_command
    from agents.common.seeding import seed_everything
    from agents.policies.base import BCLossOptions

    cfg = parse_train_command(["train"] + args.bc_args, BCConfig, default_config="bc_cpu.yaml", prog="bench",
                              usage="", description="")
    seed_everything(cfg.seed)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_bc_"))
    policy = build_policy(cfg, run_dir)
    policy.train()
    params = list(policy.trainable_parameters())
    data = build_data(cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opts = BCLossOptions(number_sigma=cfg.number_sigma, clone_start=cfg.clone_start)
    phases = {"phase1": 1, "phase2": cfg.grounding_only_steps + 1}  # batch numbers (k - 1 >= 0: see block)
    n = args.bc_steps

    def block(k0: int, mode: str, clock: Clock) -> list:
        set_mode(policy, mode != "before")
        worker = mode == "after_prefetch"
        losses = []
        pre = Prefetcher(data, start=k0, encode=policy.encode_trajectory, depth=max(cfg.prefetch, 2) if worker else 0)
        try:
            if worker:  # the worker starts with the run: its first batch is not a steady-state step
                pre.next(k0)
                k0 += 1
            for k in range(k0, k0 + n):
                with clock.stage("total"):
                    if worker:
                        with clock.stage("data"):
                            batch, enc = pre.next(k)
                    else:
                        with clock.stage("data"):
                            batch = data.batch(k)
                        with clock.stage("encode"):
                            enc = [policy.encode_trajectory(t) for t in batch]
                    with clock.stage("forward"):
                        loss, _ = policy.bc_loss(batch, opts, encoded=enc)
                    with clock.stage("backward"):
                        loss.backward()
                    with clock.stage("optimizer"):
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        finally:
            pre.close()
        return losses

    modes = ["before", "after"] + (["after_prefetch"] if args.bc_prefetch else [])
    out: dict = {"config": "bc_cpu.yaml", "steps_per_block": n, "reps": args.reps, "modes": modes,
                 "prefetch_depth": max(cfg.prefetch, 2)}
    for name, k0 in phases.items():
        block(k0 + 400, "after", Clock())  # warm-up, same phase
        clocks = {m: Clock() for m in modes}
        checks = []
        for r in range(args.reps):
            k = k0 + r * (n + 1)
            snap = snapshot(policy, optimizer)
            losses = {}
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                restore(policy, optimizer, snap)
                # the worker draws one batch more (its first); the same batch numbers are compared
                losses[mode] = block(k - 1 if mode == "after_prefetch" else k, mode, clocks[mode])
            checks.append({"batches": [k, k + n - 1], "max_loss_diff": max(
                abs(a - b) for m in modes[1:] for a, b in zip(losses["before"], losses[m]))})
        out[name] = {**summarise(clocks, args.reps * n, "step_s"), "checks": checks}
    set_mode(policy, True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["grpo", "bc", "both"], default="both")
    ap.add_argument("--reps", type=int, default=2, help="interleaved before/after repetitions (GRPO iterations; "
                    "BC blocks)")
    ap.add_argument("--bc-steps", type=int, default=4, help="BC steps per block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bc-prefetch", type=int, default=1, help="1: also measure BC with the prefetch worker "
                    "(after_prefetch)")
    ap.add_argument("--grpo-noshrink", type=int, default=1, help="1: also measure GRPO with finished rows kept "
                    "in the rollout engine's decode batch (after_noshrink: RolloutEngine.shrink_at = 0)")
    ap.add_argument("--before-rollout-batch", type=int, default=0, help="the rollout batch of \"before\" "
                    "(0: the default before issue 16, min(prompts x N, 4 N) = 24; \"after\" runs the config's)")
    ap.add_argument("--grpo-oldbatch", type=int, default=1, help="1: also measure GRPO with the new code at the "
                    "before's rollout batch (after_oldbatch: the same rollouts as before, checked)")
    ap.add_argument("--grpo-args", default="", help="extra `agents.grpo train` options in one string, e.g. "
                    "'--beta 0'")
    ap.add_argument("--bc-args", default="", help="extra `agents.bc train` options in one string")
    args = ap.parse_args(argv)
    args.grpo_args, args.bc_args = shlex.split(args.grpo_args), shlex.split(args.bc_args)
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    out: dict = {"threads": args.threads, "load_avg_start": list(os.getloadavg())}
    if args.part in ("grpo", "both"):
        out["grpo"] = grpo_part(args)
    if args.part in ("bc", "both"):
        out["bc"] = bc_part(args)
    out["load_avg_end"] = list(os.getloadavg())
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
