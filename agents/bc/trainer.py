"""Behaviour cloning on teacher trajectories (the SFT warm-up, IVT Sec. 3.2): ``python -m agents.bc train``.

Each optimizer step: take ``grad_accum`` micro-batches of teacher trajectories (a folder written by
``python -m agents.synthesis``, or fresh ones synthesized per batch), compute the policy's BC LOSS (cross-entropy
on the tokens the model must generate, reasoning and boxes; every injected token, i.e. the prompt, the overlay
images and the corrective instructions, labelled -100), step AdamW under a warm-up + cosine schedule, LOG
``train/loss`` and ``train/lr`` to TensorBoard, EVALUATE on the val split through ``agents.evaluate`` (Acc@k,
per-step IoU, rates as ``eval/...``; the best checkpoint by ``best_metric`` goes to ``{run}/best``), and CHECKPOINT
atomically (``agents.common.checkpoint``). ``--resume --out RUN`` continues a killed run.

Data parallel: ``torchrun --nproc_per_node K -m agents.bc train`` (gloo on CPU, nccl on GPU): each rank draws its own
``batch_size / K`` of every step's batch (:class:`agents.bc.data.Shard`), the gradients are averaged over ranks
before clipping, each rank validates a share of the val scenes (``evaluate(..., shard=True)``), rank 0 alone logs
and writes; ``threads`` are split over the ranks. On the 2-core CPU
machine two ranks of one thread run the default recipe faster than one process of two threads (README, Benchmarks).

The training sequences are built by the policy itself (``VLMPolicy.bc_loss`` -> ``encode_trajectory``): the same
prompt, the same injected overlay images and instructions, the same prefix continuation as at inference.

Outputs in the run folder: ``config.yaml``, TensorBoard events + ``scalars.jsonl``, ``checkpoints/iter_*``,
``best/`` and ``final/`` (policy folders that ``VLMPolicy.from_pretrained`` and ``--init-from`` accept, with
``eval.json``), ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from agents.bc.config import BCConfig
from agents.bc.data import Prefetcher
from agents.bc.setup import (bc_optimizer, bc_scheduler, build_data, build_policy, steps_per_epoch, total_steps,
                             train_only_token_rows)
from agents.common import distributed
from agents.common.checkpoint import (CheckpointError, apply_schedule, checkpoint_dir, latest_checkpoint,
                                     load_checkpoint, prune_checkpoints, read_state, save_checkpoint)
from agents.common.config import atomic_write_text, parse_train_command, to_dict
from agents.common.run_logging import RunLogger, prepare_run_dir, truncate_scalars
from agents.common.seeding import seed_everything
from agents.policies.base import BCLossOptions, SamplingParams
from agents.preflight import check_bc
from ivt_env.datasets.base import DatasetError

DEFAULT_CONFIG = "bc_cpu.yaml"
PROG = "python -m agents.bc train"
EVAL_KEYS = ("acc@0.5", "acc@0.7", "acc@0.9", "miou", "iou_step", "delta", "improve_rate", "stagnation_rate",
             "degradation_rate", "format_rate", "n")


# ----------------------------------------------------------------------------------------------------- train
def train(cfg: BCConfig) -> dict[str, Any]:
    """Run (or resume) behaviour cloning; returns the summary also written to ``{run}/summary.json``."""
    check_bc(cfg)  # every name and folder, before the model loads or a run folder exists
    cfg = _folder_data_options(cfg)
    cfg.validate()
    dist = distributed.init_distributed()
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"bc config: batch_size {cfg.batch_size} is not a multiple of the {dist.world_size} torchrun "
                         "ranks (each rank draws an equal share of every batch)")
    if cfg.threads > 0:
        torch.set_num_threads(max(1, cfg.threads // dist.world_size))  # the run's threads, split over its ranks
    seed_everything(cfg.seed)
    run_dir, policy, params, data, optimizer, scheduler, state, log = _setup_run(cfg, dist)
    total = total_steps(cfg, data)
    eval_every = cfg.eval_every or steps_per_epoch(cfg, data)  # 0 with online data: evaluate only at the end
    loss_options = BCLossOptions(number_sigma=cfg.number_sigma, clone_start=cfg.clone_start,
                                 clone_start_numbers=cfg.clone_start_numbers)
    evaluator = Validator(cfg)

    if state["step"] == 0 and cfg.eval_at_start:  # the start point of the curves
        m = _evaluate(cfg, policy, evaluator, log, state, run_dir, step=0)  # every rank: a share of the scenes
        if dist.is_main:
            print(f"[bc] step 0 (untrained): acc@0.5 {m['acc@0.5']:.3f}, format {m['format_rate']:.3f}",
                  file=sys.stderr)
        distributed.barrier()
    bar = _progress(cfg, total, start=state["step"]) if dist.is_main else None
    t_start = time.perf_counter()
    # micro-batches drawn and encoded in a worker process, cfg.prefetch ahead (the same batches as in-process)
    encode = getattr(policy, "encode_trajectory", None)
    prefetch = Prefetcher(data, start=state["step"] * cfg.grad_accum, encode=encode, depth=cfg.prefetch)
    try:
        summary = _train_loop(cfg, policy, params, data, optimizer, scheduler, state, log, run_dir, total, eval_every,
                              loss_options, evaluator, bar, prefetch, t_start)
    finally:
        prefetch.close()
    return summary


def _train_loop(cfg, policy, params, data, optimizer, scheduler, state, log, run_dir, total, eval_every,
                loss_options, evaluator, bar, prefetch, t_start) -> dict[str, Any]:
    done_here, window = 0, []
    dist = distributed.current()
    for step in range(state["step"], total):
        # --- one optimizer step over grad_accum micro-batches of teacher trajectories
        t0 = time.perf_counter()
        for m_idx in range(cfg.grad_accum):
            batch, encoded = prefetch.next(step * cfg.grad_accum + m_idx)
            loss, n_tok = (policy.bc_loss(batch, loss_options, encoded=encoded) if encoded is not None
                           else policy.bc_loss(batch, loss_options))
            (loss / cfg.grad_accum).backward()
            window.append(float(loss.detach()))
            state["trajectories"] += len(batch) * dist.world_size
            state["tokens"] += int(n_tok) * dist.world_size  # torchrun: this rank's count x ranks
        distributed.all_reduce_grads(params)  # torchrun: the mean gradient of every rank's micro-batches
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        state["train_s"] += dt
        state["step"] = s = step + 1
        done_here += 1

        # --- log
        last = s == total
        if s % cfg.log_every == 0 or last:
            loss_mean = distributed.all_reduce_mean({"loss": sum(window) / len(window)})["loss"]
            _log_step(log, bar, state, s, loss=loss_mean, lr=lr, grad_norm=grad_norm, step_s=dt)
            window = []
        if bar is not None:
            bar.update(1)

        # --- evaluate (best checkpoint by best_metric), checkpoint, stop on the step / time budget
        timed_out = cfg.time_limit_min > 0 and time.perf_counter() - t_start >= 60 * cfg.time_limit_min
        if cfg.time_limit_min > 0:  # every rank stops at the same step
            timed_out = distributed.all_reduce_sum(float(timed_out)) > 0
        stop = bool(cfg.stop_after and done_here >= cfg.stop_after) or timed_out
        evaluate_now = bool(eval_every and s % eval_every == 0)
        if evaluate_now or last or (stop and cfg.time_limit_min > 0):
            m = _evaluate(cfg, policy, evaluator, log, state, run_dir, step=s)  # every rank: a share of the scenes
            if bar is not None:
                bar.write(f"[bc] step {s}: val acc@0.5 {m['acc@0.5']:.3f}  miou {m['miou']:.3f}  "
                          f"format {m['format_rate']:.3f}")
            distributed.barrier()
        if last or stop or evaluate_now or (cfg.save_every and s % cfg.save_every == 0):
            _checkpoint(cfg, run_dir, policy, optimizer, scheduler, state)
        if stop and not last:
            if dist.is_main:
                print(f"[bc] stopped after {done_here} steps (step {s} of {total}); continue with --resume --out "
                      f"{run_dir}", file=sys.stderr)
            break
    if bar is not None:
        bar.close()
    evaluator.close()
    if state["step"] == total and dist.is_main:
        _save_policy(policy, run_dir / "final", state["evals"][-1] if state["evals"] else {})
    log.close()
    summary = _summary(cfg, run_dir, state, total)
    if dist.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------- helpers
def _setup_run(cfg: BCConfig, dist: distributed.DistInfo):
    """Run folder, policy, data, optimizer, schedule, state (restored by --resume) and logger (rank 0 alone
    prepares the folder, builds a fresh tiny model and writes)."""
    run_dir = prepare_run_dir(cfg, cfg.synth.env) if dist.is_main else None
    run_dir = Path(distributed.broadcast_object(str(run_dir) if dist.is_main else None))
    resume_step = None
    if cfg.resume:  # before the logger opens scalars.jsonl for appending (the file is rewritten here)
        resume_step = int(read_state(latest_checkpoint(run_dir))["step"])
        if dist.is_main:
            truncate_scalars(run_dir, resume_step)
    # TensorBoard drops what the killed run logged after its checkpoint (events at resume_step + 1 and later)
    log = RunLogger(run_dir, purge_step=None if resume_step is None else resume_step + 1, enabled=dist.is_main)
    policy = build_policy(cfg, run_dir) if dist.is_main else None
    distributed.barrier()  # the other ranks load the tiny model rank 0 built into {run}/base
    policy = policy or build_policy(cfg, run_dir)
    policy.train()
    if cfg.train_only_tokens:
        ids = train_only_token_rows(policy, cfg.train_only_tokens)
        if dist.is_main:
            print(f"[bc] train_only_tokens: {len(ids)} embedding rows train, every other weight is frozen",
                  file=sys.stderr)
    params = list(policy.trainable_parameters())
    if not params:
        raise ValueError(f"policy from {cfg.init_from!r} has no trainable parameters")
    distributed.broadcast_parameters(params)
    data = build_data(cfg, dist.rank, dist.world_size)
    optimizer = bc_optimizer(params, cfg)
    scheduler = bc_scheduler(optimizer, total_steps(cfg, data), cfg)
    state: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "evals": [], "train_s": 0.0,
                             "trajectories": 0, "tokens": 0}
    if cfg.resume:
        ckpt = latest_checkpoint(run_dir)
        state = load_checkpoint(ckpt, policy=policy, optimizer=optimizer, scheduler=scheduler)
        apply_schedule(optimizer, scheduler, cfg.lr)  # the schedule of THIS run's length (a longer run extends it)
        if state.get("best_step") == 0:  # checkpointed before best/ excluded the start: the next evaluation replaces it
            state["best"] = state["best_step"] = None
        if dist.is_main:  # one line per run, not per rank
            print(f"[bc] resumed {ckpt} at step {state['step']}", file=sys.stderr)
    elif dist.is_main:
        log.hparams(to_dict(cfg), {"eval/acc@0.5": 0.0, "eval/miou": 0.0})
        log.text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```", 0)
    return run_dir, policy, params, data, optimizer, scheduler, state, log


def _folder_data_options(cfg: BCConfig) -> BCConfig:
    """--data DIR trains on the folder alone: the online-only phases that the default (CPU) config turns on are
    switched off here, with a note, so `agents.bc train --data DIR` works as documented."""
    if cfg.data == "online":
        return cfg
    online_only = {k: getattr(cfg, k) for k in ("grounding_mix", "grounding_only_steps", "localize_steps")
                   if getattr(cfg, k)}
    if not online_only:
        return cfg
    print(f"[bc] --data {cfg.data}: training on the folder's trajectories only; the online-only options "
          f"{online_only} do not apply (set to 0)", file=sys.stderr)
    return dataclasses.replace(cfg, **{k: 0 for k in online_only})


class Validator:
    """Validation through ``agents.evaluate.evaluate`` on a collector of ``eval_batch`` envs kept across calls."""

    def __init__(self, cfg: BCConfig):
        self.cfg = cfg
        self.collector = None

    def __call__(self, policy: Any, log: RunLogger, step: int) -> dict:
        from agents.evaluate import evaluate
        from agents.synthesis import load_env_dataset, make_env
        from rollouts.collector import Collector

        cfg = self.cfg
        steps = cfg.synth.steps if cfg.eval_steps < 0 else cfg.eval_steps
        if self.collector is None:
            # a train-size override (num_samples) does not carry over to the val split
            kwargs = {k: v for k, v in dict(cfg.synth.dataset_kwargs or {}).items() if k != "num_samples"}
            val_cfg = dataclasses.replace(cfg.synth, split=cfg.val_split, dataset_kwargs=kwargs)
            ds = load_env_dataset(val_cfg)
            n = len(ds) if cfg.eval_limit <= 0 else min(cfg.eval_limit, len(ds))
            if cfg.eval_limit > len(ds):
                print(f"[bc] eval_limit {cfg.eval_limit}: split {cfg.val_split!r} has {len(ds)} samples, all evaluated "
                      "(a synthetic split grows with synth.dataset_kwargs.split_sizes)", file=sys.stderr)
            self.collector = Collector([make_env(val_cfg, steps, ds) for _ in range(max(1, min(cfg.eval_batch, n)))])
        sampling = SamplingParams(greedy=True, max_new_tokens=cfg.eval_max_new_tokens)
        t0 = time.perf_counter()
        main = distributed.current().is_main
        m = evaluate(policy, self.collector, cfg.val_split, cfg.eval_limit or None, steps, sampling, None, writer=log,
                     prefix="eval", global_step=step, num_strips=4 if main else 0, name=cfg.exp_name, shard=True)
        log.scalar("time/eval_s", time.perf_counter() - t0, step)
        policy.train()
        return m

    def close(self) -> None:
        if self.collector is not None:
            self.collector.close()


def _evaluate(cfg: BCConfig, policy: Any, evaluator: Validator, log: RunLogger, state: dict, run_dir: Path, *,
              step: int) -> dict:
    """Validate, record, and keep the policy in ``{run}/best`` when ``best_metric`` improved. Step 0 (the start,
    validated with ``eval_at_start``) is the curves' baseline, never best/: a fine-tune that never beats its start
    still leaves a trained policy there (``init_from`` already holds the start), as GRPO's best/."""
    m = evaluator(policy, log, step)
    rec = {"step": step, **{k: m.get(k) for k in EVAL_KEYS}}
    state["evals"].append(rec)
    score = m.get(cfg.best_metric)
    if score is None:
        raise KeyError(f"best_metric {cfg.best_metric!r} is not a metric; known: {sorted(k for k in m if k != 'report')}")
    if step > 0 and (state["best"] is None or score > state["best"]):
        state["best"], state["best_step"] = float(score), step
        if distributed.current().is_main:
            _save_policy(policy, run_dir / "best", rec)
    return m


def _checkpoint(cfg: BCConfig, run_dir: Path, policy: Any, optimizer: Any, scheduler: Any, state: dict) -> None:
    """Rank 0 writes; under torchrun the state records every rank's parameter digest (replicas that differ raise)."""
    dist = distributed.current()
    ranks = {}
    if dist.enabled:
        digests = distributed.replica_digests(policy.trainable_parameters(), f"step {state['step']}")
        ranks = {"world_size": dist.world_size, "param_sha256": digests}
    if dist.is_main:
        save_checkpoint(checkpoint_dir(run_dir, state["step"]), policy=policy, optimizer=optimizer,
                        scheduler=scheduler, state={**state, **ranks, "config": to_dict(cfg)}, save_policy_files=False)
        prune_checkpoints(run_dir, cfg.keep_last)
    distributed.barrier()


def _log_step(log: RunLogger, bar: Any, state: dict, step: int, *, loss: float, lr: float, grad_norm: float,
              step_s: float) -> None:
    log.scalars({"loss": loss, "lr": lr, "grad_norm": grad_norm, "trajectories": state["trajectories"],
                 "tokens": state["tokens"]}, step, prefix="train/")
    log.scalars({"step_s": step_s, "train_s": state["train_s"]}, step, prefix="time/")
    if bar is not None:
        best = f"{state['best']:.3f}" if state["best"] is not None else "-"
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", best=best)


def _progress(cfg: BCConfig, total: int, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="bc", unit="step", dynamic_ncols=True)


def _save_policy(policy: Any, directory: Path, record: dict) -> None:
    policy.save(str(directory))
    atomic_write_text(directory / "eval.json", json.dumps(record, indent=2) + "\n")


def _summary(cfg: BCConfig, run_dir: Path, state: dict, total: int) -> dict[str, Any]:
    evals = state["evals"]
    return {"run_dir": str(run_dir), "steps": state["step"], "total_steps": total, "best_metric": cfg.best_metric,
            "best": state["best"], "best_step": state["best_step"], "train_s": round(state["train_s"], 1),
            "trajectories": state["trajectories"], "first_eval": evals[0] if evals else None,
            "last_eval": evals[-1] if evals else None}


# ------------------------------------------------------------------------------------------------------- CLI
USAGE = f"""usage: {PROG} [--config FILE] [--FIELD VALUE ...]

Behaviour cloning on teacher trajectories (IVT Sec. 3.2). `{PROG} --help` lists every field. With no --config the
CPU default configs/{DEFAULT_CONFIG} is used (the tiny model from scratch on IVT-Synthetic-v0). Paper settings:
configs/bc_paper.yaml.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_train_command(argv, BCConfig, default_config=DEFAULT_CONFIG, prog=PROG, usage=USAGE,
                              description=__doc__.split("\n\n")[0])
    if isinstance(cfg, int):
        return cfg
    try:
        summary = train(cfg)
        is_main = distributed.current().is_main
    except (FileNotFoundError, FileExistsError, NotADirectoryError, DatasetError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)  # a user's mistake: one line, no traceback
        return 2
    except ValueError as e:
        if not str(e).startswith("bc config:"):
            raise  # not a user error: keep the traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    if is_main:
        print(json.dumps(summary, indent=2))
    return 0
