"""GRPO on iterative-visual-thinking trajectories (IVT Sec. 3.3): ``python -m agents.grpo train [--config FILE]``.

Each iteration: COLLECT ``prompts_per_iter`` groups of N trajectories from the env's train split (rollouts.collector,
rewards from the env's ``reward_fn``), compute group-relative ADVANTAGES of the trajectory returns
(agents.grpo.advantages), UPDATE the policy with IVT Eq. 2 (agents.grpo.update / agents.grpo.losses), LOG to TensorBoard,
EVALUATE on the val split every ``eval_every`` iterations (best trained checkpoint by validation reward) and CHECKPOINT
atomically (agents.common.checkpoint). ``--resume --out RUN`` continues a killed run. Under ``torchrun --nproc_per_node K``
every rank collects its own groups and the gradients are averaged (agents.common.distributed).

With no arguments: ``configs/grpo_cpu.yaml`` (the tiny model on IVT-Synthetic-v0, offline, CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from agents.common import distributed
from agents.common.checkpoint import (CheckpointError, apply_schedule, checkpoint_dir, latest_checkpoint,
                                     load_checkpoint, prune_checkpoints, save_checkpoint)
from agents.common.config import parse_train_command, to_dict
from agents.common.seeding import derive_seed, seed_everything
from agents.evaluate.metrics import compute_metrics
from agents.grpo.advantages import compute_advantages, nonfinite_fraction, zero_std_fraction
from agents.grpo.config import GRPOConfig
from agents.grpo.setup import (build_policy, check_start_checkpoint, env_factory, grounded_area_fraction,
                               group_trajectories, grpo_scheduler, make_optimizer, sample_prompts, split_size,
                               strip_for_gather)
from agents.grpo.update import NonFiniteUpdateError, check_finite_state, policy_update
from agents.preflight import check_grpo
from agents.policies.base import BCLossOptions, SamplingParams
from agents.common.run_logging import RunLogger, prepare_run_dir, truncate_scalars
from agents.grpo.step_credit import update_advantages
from agents.grpo.guidance import guidance_trajectories
from ivt_env.datasets.base import DatasetError
from rollouts.collector import Collector

DEFAULT_CONFIG = "grpo_cpu.yaml"
PROG = "python -m agents.grpo train"


def train(cfg: GRPOConfig) -> dict[str, Any]:
    """Run (or resume) GRPO; returns a summary (iterations done, first/last validation metrics, best score)."""
    cfg.validate()
    check_grpo(cfg)  # every name and folder, before the model loads or a run folder exists
    check_start_checkpoint(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    train_env = env_factory(cfg, cfg.train_split)
    n_train = split_size(train_env)  # also fails fast on a missing dataset, before any run folder exists
    n_train = min(n_train, cfg.train_limit) if cfg.train_limit else n_train
    dist = distributed.init_distributed()
    run_dir, policy, optimizer, scheduler, state, log = _setup_run(cfg, dist)
    n_slots = cfg.rollout_slots()
    collector = Collector(train_env, num_envs=n_slots)
    val = None
    if cfg.eval_every:  # envs built once, reused by every validation (every rank validates a share: torchrun)
        val_env = env_factory(cfg, cfg.val_split, size=cfg.val_size)
        val = Collector([val_env() for _ in range(max(1, min(cfg.eval_limit or n_slots, n_slots)))])
    sampling = dataclasses.replace(SamplingParams.from_config(cfg), branch=cfg.branch_size)
    norm_len = cfg.max_new_tokens * (cfg.max_refine_steps + 1)

    if state["iteration"] == 0 and cfg.eval_every:  # the start point of the curves (never best/: see _evaluate)
        _evaluate(cfg, policy, val, run_dir, log, state, dist, iteration=0, optimizer=optimizer,
                  scheduler=scheduler)
    bar = _progress(cfg, dist, start=state["iteration"])
    skipped_in_row = 0
    for it in range(state["iteration"], cfg.iterations):
        # one encoding of every observation per iteration: the rollout's chunks serve both passes of the update
        with _encoding_cache(policy):
            stats, rollout_s, update_s, batch, rewards, skipped = _iteration(
                cfg, it, policy, optimizer, collector, sampling, n_train, dist, norm_len)
        skipped_in_row = _count_skip(cfg, stats.skipped, skipped_in_row, it + 1)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state["iteration"] = it + 1

        # --- log: rollout metrics over all ranks' trajectories, losses averaged over ranks
        _log_iteration(cfg, log, bar, dist, step=it + 1, batch=batch, rewards=rewards, stats=stats.as_dict(),
                       lr=lr, times={"rollout_s": rollout_s, "update_s": update_s})
        skipped = distributed.all_reduce_mean({"n": float(skipped)})["n"] * dist.world_size
        if dist.is_main:  # bad records met at reset (named in the collector's log line): counted, not fatal
            log.scalar("rollout/skipped_samples", skipped, it + 1)

        # --- evaluate (best checkpoint by validation reward) and checkpoint
        step = it + 1
        last = step == cfg.iterations
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            _evaluate(cfg, policy, val, run_dir, log, state, dist, iteration=step, optimizer=optimizer,
                      scheduler=scheduler)
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            _save(run_dir, cfg, policy, optimizer, scheduler, state, dist)
    if bar is not None:
        bar.close()
    collector.close()
    if val is not None:
        val.close()
    log.close()
    distributed.barrier()
    summary = _summary(state, run_dir)
    return summary


def _encoding_cache(policy: Any):
    """The policy's per-iteration encoding memo (VLMPolicy.encoding_cache), or a no-op for other policies."""
    fn = getattr(policy, "encoding_cache", None)
    return fn() if callable(fn) else contextlib.nullcontext()


def _iteration(cfg: GRPOConfig, it: int, policy: Any, optimizer: Any, collector: Collector, sampling: Any,
               n_train: int, dist: distributed.DistInfo, norm_len: int):
    """Collect, advantages and the policy update of iteration ``it`` (0-based); returns (stats, rollout seconds,
    update seconds, batch, rewards (G, N), skipped samples)."""
    # --- collect: N trajectories for each of this rank's prompts
    t0 = time.perf_counter()
    prompts = sample_prompts(n_train, cfg.prompts_per_iter, derive_seed(cfg.seed, dist.rank, it, 1))
    # observations stay in memory: the policy re-encodes them to score its tokens (token_logprobs)
    trajs = collector.collect(policy, prompts, cfg.group_size, sampling,
                              seed=derive_seed(cfg.seed, dist.rank, it, 2), keep_observations=True)
    skipped = _check_skipped(collector, trajs, it)
    groups = group_trajectories(trajs, cfg.group_size)
    rollout_s = time.perf_counter() - t0

    # --- advantages: one per trajectory, from its group's returns
    rewards = torch.tensor([[t.ret for t in g] for g in groups], dtype=torch.float64)  # (G, N)
    _warn_nonfinite_rewards(cfg, groups, rewards, it + 1)  # they get advantage 0 (agents.grpo.advantages)
    scales = torch.tensor([[grounded_area_fraction(t) for t in g] for g in groups],
                          dtype=torch.float64)  # (G, N) SRPO: each rollout's own grounded area
    adv = compute_advantages(cfg.advantage, rewards, scales=scales, eps=cfg.adv_eps,
                             population_std=cfg.population_std, num_bins=cfg.srpo_bins)
    batch = [t for g in groups for t in g]
    # per trajectory (B,) as in IVT, or per step (B, S) with cfg.step_advantage (agents.grpo.step_credit)
    upd_adv = update_advantages(cfg, groups, rewards, adv)
    # teacher guidance (guide_coef > 0; on in grpo_cpu.yaml, off in the paper config): the teacher's answer to each
    # refinement state visited (DAgger targets)
    guide = (guidance_trajectories(batch, verbosity=cfg.guide_verbosity, states=cfg.guide_states,
                                   keep_marker=cfg.guide_keep)
             if cfg.guide_coef else [])

    # --- update: IVT Eq. 2 over generated tokens, accumulated over grad_accum micro-batches
    t1 = time.perf_counter()
    stats = policy_update(policy, optimizer, batch, upd_adv, grad_accum=cfg.grad_accum,
                          updates=cfg.updates_per_iter, beta=cfg.beta, entropy_coef=cfg.entropy_coef,
                          kl_estimator=cfg.kl_estimator, clip_eps=cfg.clip_eps, old_logprobs=cfg.old_logprobs,
                          aggregation=cfg.aggregation, norm_len=norm_len, max_grad_norm=cfg.max_grad_norm,
                          entropy_aggregation=cfg.entropy_aggregation, guide_coef=cfg.guide_coef,
                          guide=guide,
                          guide_options=BCLossOptions(number_sigma=cfg.guide_sigma, clone_start=True))
    update_s = time.perf_counter() - t1
    return stats, rollout_s, update_s, batch, rewards, skipped


# --------------------------------------------------------------------------------------------------- helpers
def _warn_nonfinite_rewards(cfg: GRPOConfig, groups, rewards: torch.Tensor, step: int) -> None:
    """A warning naming the samples and the reward function of every NaN/inf return."""
    bad = [(g, i) for g, i in torch.nonzero(~torch.isfinite(rewards)).tolist()]
    if bad:
        ids = [f"{groups[g][i].sample_id} (group {g}, trajectory {i}: {float(rewards[g, i])})" for g, i in bad]
        warnings.warn(f"[grpo] iteration {step}: {len(bad)} non-finite rewards from reward {cfg.reward!r}: "
                      f"{'; '.join(ids)}; their advantage is 0 and their groups are normalised without them",
                      RuntimeWarning, stacklevel=2)


def _count_skip(cfg: GRPOConfig, skipped: str, in_row: int, step: int) -> int:
    """Skipped updates in a row so far; raises :class:`NonFiniteUpdateError` at ``cfg.max_skipped_updates``."""
    if not skipped:
        return 0
    in_row += 1
    warnings.warn(f"[grpo] iteration {step}: update skipped ({skipped}); {in_row} in a row", RuntimeWarning,
                  stacklevel=2)
    if in_row >= cfg.max_skipped_updates:
        raise NonFiniteUpdateError(f"{in_row} updates in a row skipped ({skipped}, last at iteration {step}): "
                                   "check the reward function and the learning rate (max_skipped_updates)")
    return in_row


def _check_skipped(collector: Collector, trajs: Sequence[Any], it: int) -> int:
    """How many of this iteration's samples were skipped as bad records; an error if nothing was left to train on.
    Decided over all ranks (one all-reduce): every rank raises together, where a rank with nothing left raising alone
    would leave the others waiting for it in the update's gradient all-reduce forever."""
    empty = not trajs and bool(collector.last_skipped)
    if distributed.all_reduce_mean({"empty": float(empty)})["empty"] > 0:
        if not empty:
            raise DatasetError(f"iteration {it + 1}: every sample of another rank failed at reset (that rank's error "
                               "names them); stopping every rank together")
        first = collector.last_skipped[0]
        raise DatasetError(f"iteration {it + 1}: every sample failed at reset ({len(collector.last_skipped)} bad "
                           f"records, e.g. sample {first['index']} ({first['sample_id']}): {first['error']})")
    return len(collector.last_skipped)


def _setup_run(cfg: GRPOConfig, dist: distributed.DistInfo):
    """Run folder, policy (identical on every rank), optimizer, schedule, state (restored by --resume), logger."""
    seed_everything(cfg.seed)  # same on every rank: identical model/LoRA init (also broadcast below)
    run_dir = prepare_run_dir(cfg, cfg.env_id, dist)
    policy = build_policy(cfg)
    params = list(policy.trainable_parameters())
    distributed.broadcast_parameters(params)
    optimizer = make_optimizer(params, cfg)
    scheduler = grpo_scheduler(optimizer, cfg)
    state: dict[str, Any] = {"iteration": 0, "best_val_reward": None, "best_iteration": None, "evals": []}
    if cfg.resume:
        state = _resume(cfg, run_dir, policy, optimizer, scheduler, dist)
    else:
        seed_everything(derive_seed(cfg.seed, dist.rank))
    # after _resume, which trims the log to the checkpoint; TensorBoard drops the killed run's later events itself
    log = RunLogger(run_dir, enabled=dist.is_main, purge_step=state["iteration"] + 1 if cfg.resume else None)
    if dist.is_main and state["iteration"] == 0:
        log.hparams(to_dict(cfg), {"eval/return_mean": 0.0, "eval/miou": 0.0})
        log.text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```")
    return run_dir, policy, optimizer, scheduler, state, log


def _log_iteration(cfg, log, bar, dist, *, step, batch, rewards, stats, lr, times) -> None:
    """rollout/*, train/*, time/* scalars, trajectory strips, and the progress bar's numbers."""
    all_trajs = [t for part in distributed.gather_objects([strip_for_gather(t) for t in batch]) for t in part]
    fracs = distributed.all_reduce_mean({"z": zero_std_fraction(rewards), "nf": nonfinite_fraction(rewards)})
    train_stats = distributed.all_reduce_mean(stats)
    roll = compute_metrics(all_trajs)
    if dist.is_main:
        log.scalars(_rollout_scalars(roll, fracs["z"], fracs["nf"]), step, prefix="rollout/")
        log.scalars({**train_stats, "lr": lr}, step, prefix="train/")
        log.scalars(times, step, prefix="time/")
        if cfg.image_every > 0 and (step - 1) % cfg.image_every == 0:
            _log_strips(log, batch[:: cfg.group_size][: cfg.num_images], step)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(R=f"{roll['return_mean']:.3f}", iou=f"{roll['iou_step'][-1]:.3f}",
                        imp=f"{roll['improve_rate']:.2f}", deg=f"{roll['degradation_rate']:.2f}",
                        fmt=f"{roll['format_rate']:.2f}", loss=f"{train_stats['loss']:.3f}")


def _resume(cfg: GRPOConfig, run_dir: Path, policy: Any, optimizer: Any, scheduler: Any,
            dist: distributed.DistInfo) -> dict:
    ckpt = latest_checkpoint(run_dir)
    state = load_checkpoint(ckpt, policy=policy, optimizer=optimizer, scheduler=scheduler, rank=dist.rank)
    apply_schedule(optimizer, scheduler, cfg.lr)  # the schedule of THIS run's --iterations (an extended run goes on)
    if state.get("best_iteration") == 0:  # a run from before best/ excluded the start: the next evaluation replaces it
        state["best_val_reward"] = state["best_iteration"] = None
    if state.get("world_size", 1) != dist.world_size and dist.is_main:
        print(f"[grpo] resuming a {state.get('world_size')}-rank run on {dist.world_size} ranks: sampling differs "
              "from the original run", file=sys.stderr)
    if dist.is_main:  # drop scalars the killed run logged after its last checkpoint
        truncate_scalars(run_dir, state["iteration"])
        print(f"[grpo] resumed {ckpt} at iteration {state['iteration']}", file=sys.stderr)
        changed = _config_changes(state.get("config", {}), to_dict(cfg))
        if changed:
            print("[grpo] resuming with changed settings: " + "; ".join(changed), file=sys.stderr)
    return state


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if k == "resume":
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _save(run_dir, cfg, policy, optimizer, scheduler, state, dist, directory: Optional[Path] = None) -> None:
    """Checkpoint (all ranks take part: their RNG states are gathered; rank 0 writes)."""
    rng = distributed.gather_rng_states()
    digests = distributed.replica_digests(policy.trainable_parameters(), f"iteration {state['iteration']}")
    # every rank (identical replicas): all raise together, none waits at the barrier for a rank that stopped
    check_finite_state(list(policy.trainable_parameters()), optimizer,
                       what=f"checkpoint of iteration {state['iteration']}")
    if dist.is_main:
        full = {**state, "world_size": dist.world_size, "config": to_dict(cfg), "param_sha256": digests}
        target = directory or checkpoint_dir(run_dir, state["iteration"])
        save_checkpoint(target, policy=policy, optimizer=optimizer, scheduler=scheduler, state=full, rng_states=rng)
        if directory is None:
            prune_checkpoints(run_dir, cfg.keep_last)
    distributed.barrier()


def _evaluate(cfg, policy, val, run_dir, log, state, dist, *, iteration: int, optimizer, scheduler) -> None:
    """Validation (``agents.evaluate``: ``eval/...`` scalars, strips and the report go to the run's TensorBoard);
    under torchrun every rank rolls out a share of the scenes and gets the metrics of all (``shard=True``: greedy
    validation equals one process's; sampled validation draws other, equally valid, samples per world size). The
    trained iteration with the best validation reward (mean return) so far is saved to {run}/best.
    Iteration 0 is only the baseline: were it a candidate, a run that never beats its start would leave the start in
    best/ and report it as the GRPO policy (as SB3's EvalCallback, the first candidate is a trained one)."""
    from agents.evaluate import evaluate

    t0 = time.perf_counter()
    sampling = SamplingParams.from_config(cfg, greedy=cfg.eval_greedy)
    m = evaluate(policy, val, cfg.val_split, cfg.eval_limit or None, cfg.max_refine_steps, sampling, None,
                 writer=log, prefix="eval", global_step=iteration, num_strips=cfg.num_images if dist.is_main else 0,
                 seed=derive_seed(cfg.seed, 7), shard=True)  # the logger writes on rank 0 alone
    log.scalar("time/eval_s", time.perf_counter() - t0, iteration)
    m = {k: m[k] for k in ("return_mean", "miou", "acc@0.5", "iou_step", "degradation_rate", "improve_rate")}
    m = distributed.broadcast_object(m)  # the same floats on every rank (rank 0's), whatever the gather order did
    reward = float(m["return_mean"])
    state["evals"].append({"iteration": iteration, "return_mean": reward, "miou": m["miou"], "acc@0.5": m["acc@0.5"],
                           "iou_step": m["iou_step"], "improve_rate": m["improve_rate"],
                           "degradation_rate": m["degradation_rate"]})
    if iteration > 0 and (state["best_val_reward"] is None or reward > state["best_val_reward"]):
        state["best_val_reward"], state["best_iteration"] = reward, iteration
        _save(run_dir, cfg, policy, optimizer, scheduler, state, dist, directory=Path(run_dir) / "best")


def _rollout_scalars(m: dict, zero_frac: float, nonfinite_frac: float = 0.0) -> dict[str, Any]:
    out = {"reward_mean": m["return_mean"], "iou_step": m["iou_step"], "miou": m["miou"], "acc@0.5": m["acc@0.5"],
           "improve_rate": m["improve_rate"], "stagnation_rate": m["stagnation_rate"],
           "degradation_rate": m["degradation_rate"], "format_rate": m["format_rate"],
           "frac_zero_std_groups": zero_frac, "frac_nonfinite_reward": nonfinite_frac}
    return {k: v for k, v in out.items() if v is not None}


def _log_strips(log: RunLogger, trajs: Sequence[Any], step: int) -> None:
    from agents.evaluate.viz import trajectory_strip

    for k, t in enumerate(trajs):
        if t.steps and t.steps[0].observation is not None:
            log.image(f"rollout/strip/{k}", trajectory_strip(t, height=128), step)


def _progress(cfg: GRPOConfig, dist: distributed.DistInfo, start: int):
    if not (cfg.progress and dist.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.iterations, initial=start, desc="grpo", unit="it", dynamic_ncols=True)


def _summary(state: dict, run_dir: Path) -> dict[str, Any]:
    evals = state.get("evals", [])
    return {"run_dir": str(run_dir), "iterations": state["iteration"], "best_val_reward": state["best_val_reward"],
            "best_iteration": state["best_iteration"], "first_eval": evals[0] if evals else None,
            "last_eval": evals[-1] if evals else None}


# ------------------------------------------------------------------------------------------------------- CLI
USAGE = f"""usage: {PROG} [--config FILE] [--FIELD VALUE ...]

GRPO for iterative visual thinking. `{PROG} --help` lists every field. With no --config the CPU default
configs/{DEFAULT_CONFIG} is used. Under `torchrun --nproc_per_node K -m agents.grpo train ...` it runs data-parallel.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_train_command(argv, GRPOConfig, default_config=DEFAULT_CONFIG, prog=PROG, usage=USAGE,
                              description=__doc__.split("\n\n")[0])
    if isinstance(cfg, int):
        return cfg
    try:
        cfg.validate()
        summary = train(cfg)
        is_main = distributed.current().is_main
    except NonFiniteUpdateError as e:  # a clear stop, never a run that keeps writing NaN checkpoints
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, DatasetError, CheckpointError) as e:
        if isinstance(e, ValueError) and not isinstance(e, DatasetError) and "GRPO config" not in str(e):
            raise  # not a user error: keep the traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    if is_main:
        import json

        print(json.dumps(summary, indent=2))
    return 0

