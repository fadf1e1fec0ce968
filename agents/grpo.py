"""GRPO on iterative-visual-thinking trajectories (IVT Sec. 3.3): ``python -m agents.grpo train [--config FILE]``.

Each iteration: COLLECT ``prompts_per_iter`` groups of N trajectories from the env's train split (rollouts.collector,
rewards from the env's ``reward_fn``), compute group-relative ADVANTAGES of the trajectory returns
(agents.advantages), UPDATE the policy with IVT Eq. 2 (agents.grpo_update / agents.losses), LOG to TensorBoard,
EVALUATE on the val split every ``eval_every`` iterations (best checkpoint by validation reward) and CHECKPOINT
atomically (agents.checkpoint). ``--resume --out RUN`` continues a killed run. Under ``torchrun --nproc_per_node K``
every rank collects its own groups and the gradients are averaged (agents.distributed).

With no arguments: ``configs/grpo_cpu.yaml`` (the tiny model on IVT-Synthetic-v0, offline, CPU).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from agents import distributed
from agents.advantages import compute_advantages, zero_std_fraction
from agents.checkpoint import (checkpoint_dir, latest_checkpoint, load_checkpoint, prune_checkpoints,
                               save_checkpoint)
from agents.config import parse_train_command, to_dict
from agents.grpo_config import GRPOConfig
from agents.grpo_setup import (build_policy, check_start_checkpoint, derive_seed, env_factory, group_trajectories,
                               gt_area_fraction, make_optimizer, make_scheduler, sample_prompts, seed_everything,
                               split_size, strip_for_gather)
from agents.grpo_update import policy_update
from agents.metrics import compute_metrics
from agents.policies.base import SamplingParams
from agents.run_logging import RunLogger, prepare_run_dir
from agents.step_credit import update_advantages
from ivt_env.datasets.base import DatasetError
from rollouts.collector import Collector

DEFAULT_CONFIG = "grpo_cpu.yaml"
PROG = "python -m agents.grpo train"


def train(cfg: GRPOConfig) -> dict[str, Any]:
    """Run (or resume) GRPO; returns a summary (iterations done, first/last validation metrics, best score)."""
    cfg.validate()
    check_start_checkpoint(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    train_env = env_factory(cfg, cfg.train_split)
    n_train = split_size(train_env)  # also fails fast on a missing dataset, before any run folder exists
    n_train = min(n_train, cfg.train_limit) if cfg.train_limit else n_train
    dist = distributed.init_distributed()
    run_dir, policy, optimizer, scheduler, state, log = _setup_run(cfg, dist)
    n_slots = cfg.rollout_batch or min(cfg.prompts_per_iter * cfg.group_size, 4 * cfg.group_size)
    collector = Collector(train_env, num_envs=n_slots)
    val = None
    if dist.is_main and cfg.eval_every:  # envs built once, reused by every validation
        val_env = env_factory(cfg, cfg.val_split, size=cfg.val_size)
        val = Collector([val_env() for _ in range(max(1, min(cfg.eval_limit or n_slots, n_slots)))])
    sampling = SamplingParams(temperature_first=cfg.temperature_first, temperature_refine=cfg.temperature_refine,
                              max_new_tokens=cfg.max_new_tokens, branch=cfg.branch_size)
    norm_len = cfg.max_new_tokens * (cfg.max_refine_steps + 1)

    if state["iteration"] == 0 and cfg.eval_every:  # the start point of the curves (and the first best/)
        _evaluate(cfg, policy, val, run_dir, log, state, dist, iteration=0, optimizer=optimizer,
                  scheduler=scheduler)
    bar = _progress(cfg, dist, start=state["iteration"])
    for it in range(state["iteration"], cfg.iterations):
        # --- collect: N trajectories for each of this rank's prompts
        t0 = time.perf_counter()
        prompts = sample_prompts(n_train, cfg.prompts_per_iter, derive_seed(cfg.seed, dist.rank, it, 1))
        # observations stay in memory: the policy re-encodes them to score its tokens (token_logprobs)
        trajs = collector.collect(policy, prompts, cfg.group_size, sampling,
                                  seed=derive_seed(cfg.seed, dist.rank, it, 2), keep_observations=True)
        groups = group_trajectories(trajs, cfg.group_size)
        rollout_s = time.perf_counter() - t0

        # --- advantages: one per trajectory, from its group's returns
        rewards = torch.tensor([[t.ret for t in g] for g in groups], dtype=torch.float64)  # (G, N)
        scales = torch.tensor([gt_area_fraction(g[0]) for g in groups], dtype=torch.float64)  # (G,)
        adv = compute_advantages(cfg.advantage, rewards, scales=scales, eps=cfg.adv_eps,
                                 population_std=cfg.population_std, scale_edges=cfg.srpo_scale_edges,
                                 balance=cfg.srpo_balance)
        batch = [t for g in groups for t in g]
        # per trajectory (B,) as in IVT, or per step (B, S) with cfg.step_advantage (agents.step_credit)
        upd_adv = update_advantages(cfg, groups, rewards, adv)

        # --- update: IVT Eq. 2 over generated tokens, accumulated over grad_accum micro-batches
        t1 = time.perf_counter()
        stats = policy_update(policy, optimizer, batch, upd_adv, grad_accum=cfg.grad_accum,
                              updates=cfg.updates_per_iter, beta=cfg.beta, entropy_coef=cfg.entropy_coef,
                              kl_estimator=cfg.kl_estimator, clip_eps=cfg.clip_eps, old_logprobs=cfg.old_logprobs,
                              aggregation=cfg.aggregation, norm_len=norm_len, max_grad_norm=cfg.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        update_s = time.perf_counter() - t1
        state["iteration"] = it + 1

        # --- log: rollout metrics over all ranks' trajectories, losses averaged over ranks
        _log_iteration(cfg, log, bar, dist, step=it + 1, batch=batch, rewards=rewards, stats=stats.as_dict(),
                       lr=lr, times={"rollout_s": rollout_s, "update_s": update_s})

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


# --------------------------------------------------------------------------------------------------- helpers
def _setup_run(cfg: GRPOConfig, dist: distributed.DistInfo):
    """Run folder, policy (identical on every rank), optimizer, schedule, state (restored by --resume), logger."""
    seed_everything(cfg.seed)  # same on every rank: identical model/LoRA init (also broadcast below)
    run_dir = prepare_run_dir(cfg, cfg.env_id, dist)
    policy = build_policy(cfg)
    params = list(policy.trainable_parameters())
    distributed.broadcast_parameters(params)
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    state: dict[str, Any] = {"iteration": 0, "best_val_reward": None, "best_iteration": None, "evals": []}
    if cfg.resume:
        state = _resume(cfg, run_dir, policy, optimizer, scheduler, dist)
    else:
        seed_everything(derive_seed(cfg.seed, dist.rank))
    log = RunLogger(run_dir, enabled=dist.is_main)  # after _resume, which trims the log to the checkpoint
    if dist.is_main and state["iteration"] == 0:
        log.hparams(to_dict(cfg), {"eval/return_mean": 0.0, "eval/miou": 0.0})
        log.text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```")
    return run_dir, policy, optimizer, scheduler, state, log


def _log_iteration(cfg, log, bar, dist, *, step, batch, rewards, stats, lr, times) -> None:
    """rollout/*, train/*, time/* scalars, trajectory strips, and the progress bar's numbers."""
    all_trajs = [t for part in distributed.gather_objects([strip_for_gather(t) for t in batch]) for t in part]
    zero_frac = distributed.all_reduce_mean({"z": zero_std_fraction(rewards)})["z"]
    train_stats = distributed.all_reduce_mean(stats)
    roll = compute_metrics(all_trajs)
    if dist.is_main:
        log.scalars(_rollout_scalars(roll, zero_frac), step, prefix="rollout/")
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
    if state.get("world_size", 1) != dist.world_size and dist.is_main:
        print(f"[grpo] resuming a {state.get('world_size')}-rank run on {dist.world_size} ranks: sampling differs "
              "from the original run", file=sys.stderr)
    if dist.is_main:  # drop scalars the killed run logged after its last checkpoint
        _truncate_scalars(run_dir, state["iteration"])
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


def _truncate_scalars(run_dir: Path, iteration: int) -> None:
    import json

    from agents.config import atomic_write_text

    p = run_dir / "scalars.jsonl"
    if p.is_file():
        keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= iteration]
        atomic_write_text(p, "".join(ln + "\n" for ln in keep))


def _save(run_dir, cfg, policy, optimizer, scheduler, state, dist, directory: Optional[Path] = None) -> None:
    """Checkpoint (all ranks take part: their RNG states are gathered; rank 0 writes)."""
    rng = distributed.gather_rng_states()
    digests = distributed.gather_objects(distributed.param_digest(policy.trainable_parameters()))
    if len(set(digests)) != 1:  # data-parallel replicas must stay bit-identical
        raise RuntimeError(f"trainable parameters differ between ranks at iteration {state['iteration']}: {digests}")
    if dist.is_main:
        full = {**state, "world_size": dist.world_size, "config": to_dict(cfg), "param_sha256": digests}
        target = directory or checkpoint_dir(run_dir, state["iteration"])
        save_checkpoint(target, policy=policy, optimizer=optimizer, scheduler=scheduler, state=full, rng_states=rng)
        if directory is None:
            prune_checkpoints(run_dir, cfg.keep_last)
    distributed.barrier()


def _evaluate(cfg, policy, val, run_dir, log, state, dist, *, iteration: int, optimizer, scheduler) -> None:
    """Validation on rank 0 (``agents.evaluate``: ``eval/...`` scalars, strips and the report go to the run's
    TensorBoard); the best validation reward (mean return) so far is saved to {run}/best."""
    from agents.evaluate import evaluate

    m = None
    if dist.is_main:
        t0 = time.perf_counter()
        sampling = SamplingParams(temperature_first=cfg.temperature_first, temperature_refine=cfg.temperature_refine,
                                  max_new_tokens=cfg.max_new_tokens, greedy=cfg.eval_greedy)
        m = evaluate(policy, val, cfg.val_split, cfg.eval_limit or None, cfg.max_refine_steps, sampling, None,
                     writer=log, prefix="eval", global_step=iteration, num_strips=cfg.num_images,
                     seed=derive_seed(cfg.seed, 7))
        log.scalar("time/eval_s", time.perf_counter() - t0, iteration)
        m = {k: m[k] for k in ("return_mean", "miou", "acc@0.5", "iou_step", "degradation_rate", "improve_rate")}
    m = distributed.broadcast_object(m)
    reward = float(m["return_mean"])
    state["evals"].append({"iteration": iteration, "return_mean": reward, "miou": m["miou"], "acc@0.5": m["acc@0.5"],
                           "iou_step": m["iou_step"], "improve_rate": m["improve_rate"],
                           "degradation_rate": m["degradation_rate"]})
    if state["best_val_reward"] is None or reward > state["best_val_reward"]:
        state["best_val_reward"], state["best_iteration"] = reward, iteration
        _save(run_dir, cfg, policy, optimizer, scheduler, state, dist, directory=Path(run_dir) / "best")


def _rollout_scalars(m: dict, zero_frac: float) -> dict[str, Any]:
    out = {"reward_mean": m["return_mean"], "iou_step": m["iou_step"], "miou": m["miou"], "acc@0.5": m["acc@0.5"],
           "improve_rate": m["improve_rate"], "stagnation_rate": m["stagnation_rate"],
           "degradation_rate": m["degradation_rate"], "format_rate": m["format_rate"],
           "frac_zero_std_groups": zero_frac}
    return {k: v for k, v in out.items() if v is not None}


def _log_strips(log: RunLogger, trajs: Sequence[Any], step: int) -> None:
    from agents.viz import trajectory_strip

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
                              description=__doc__.split("\n\n")[0])  # fmt: skip
    if isinstance(cfg, int):
        return cfg
    try:
        cfg.validate()
        summary = train(cfg)
        is_main = distributed.current().is_main
    except (ValueError, FileNotFoundError, FileExistsError, DatasetError) as e:
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


if __name__ == "__main__":
    sys.exit(main())
