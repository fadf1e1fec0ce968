"""Building blocks of the GRPO run that are not the loop itself: policy, envs, optimizer/schedule, prompt sampling,
group scales, seeds. Kept here so `agents.grpo` reads as the loop and nothing else."""

from __future__ import annotations

import dataclasses
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from agents.common.schedule import make_scheduler
from agents.grpo.config import GRPOConfig
from ivt_env import ENV_DEFAULTS
from ivt_env.make import make_env

BC_HINT = (
    "create it with behaviour cloning first (`python -m agents.bc train`, configs/bc_cpu.yaml; its best/ folder is "
    "the checkpoint, see assets/README.md), or start from "
    "any model folder with --init-from PATH (a fresh tiny model: `python -c \"from agents.policies.tiny import "
    "build_tiny_model; build_tiny_model('/tmp/tiny')\"`, which has not learnt to ground yet)"
)


# ------------------------------------------------------------------------------------------------------ policy
def build_policy(cfg: GRPOConfig) -> Any:
    """The trainable policy from ``cfg.policy`` / ``cfg.init_from``; raises a clear error when the start checkpoint
    is missing or the policy is not trainable."""
    from agents.policies import make_policy

    check_start_checkpoint(cfg)
    kwargs: dict[str, Any] = {}
    if cfg.policy.lower() == "vlm":
        kwargs = dict(model=resolve_init_from(cfg.init_from), lora=lora_settings(cfg),
                      full_finetune=not cfg.lora.enabled, load_in_4bit=cfg.load_in_4bit, device=cfg.device,
                      dtype=cfg.dtype, reference=cfg.reference)
    elif cfg.init_from:
        kwargs = dict(path=resolve_init_from(cfg.init_from))
    policy = make_policy(cfg.policy, **kwargs)
    for name in ("token_logprobs", "trainable_parameters", "save"):
        if not callable(getattr(policy, name, None)):
            raise TypeError(f"policy {cfg.policy!r} ({type(policy).__name__}) has no {name}(): GRPO needs a "
                            "TrainablePolicy (agents.policies.base)")
    if hasattr(policy, "train"):
        policy.train()  # training mode for the teacher-forced passes (acting switches to eval mode itself)
    if not list(policy.trainable_parameters()):
        raise ValueError(f"policy {cfg.policy!r} from {cfg.init_from!r} has no trainable parameters")
    prompts = getattr(getattr(policy, "layout", None), "prompts", None)
    stops = {**ENV_DEFAULTS.get(cfg.env_id, {}), **cfg.env_options()}.get("allow_stop")
    if getattr(prompts, "stop_token", "") and stops:
        # its go-on choices are injected tokens, never scored: the policy gradient would see only the stops
        raise ValueError(f"GRPO config: {cfg.init_from!r} stops with a trained token (prompts stop_token "
                         f"{prompts.stop_token!r}) and the env allows stopping ({cfg.env_id}, env_kwargs "
                         f"{cfg.env_kwargs or '{}'}); GRPO does not train that decision "
                         "(train it with behaviour cloning: configs/bc_adaptive_token_cpu.yaml) or use an env without "
                         "stopping")
    return policy


from agents.common.config import PROJECT_ROOT  # noqa: E402


def resolve_init_from(path: str) -> str:
    """``path`` as given, else relative to the project root (so ``assets/tiny-ivt-bc`` works from any folder)."""
    if not path or Path(path).exists() or Path(path).is_absolute():
        return path
    alt = PROJECT_ROOT / path
    return str(alt) if alt.exists() else path


def check_start_checkpoint(cfg: GRPOConfig) -> None:
    """Fail early (before any run folder is made) when the VLM start checkpoint is missing."""
    if cfg.policy.lower() == "vlm" and not Path(resolve_init_from(cfg.init_from)).is_dir():
        raise FileNotFoundError(f"start checkpoint {cfg.init_from!r} does not exist: {BC_HINT}")


def lora_settings(cfg: Any) -> Any:
    """The config's LoraSettings, or None when LoRA is off (GRPO and behaviour-cloning configs alike)."""
    return cfg.lora if cfg.lora.enabled else None


# ------------------------------------------------------------------------------------------------------- envs
def env_factory(cfg: GRPOConfig, split: str, size: int = 0) -> Callable[[], Any]:
    """A zero-argument constructor of the grounding env for ``split`` with the configured reward and T; ``size`` > 0
    sets the split's size (the synthetic dataset's ``split_sizes``: e.g. 1,000 validation scenes)."""
    opts = cfg.env_options()
    dataset_kwargs = dict(opts.pop("dataset_kwargs", None) or {})
    if size:
        dataset_kwargs["split_sizes"] = {**dataset_kwargs.get("split_sizes", {}), split: int(size)}
    return make_env(cfg.env_id, split=split, max_refine_steps=cfg.max_refine_steps, reward_fn=cfg.reward,
                    data_root=cfg.data_root or None, dataset_kwargs=dataset_kwargs or None, **opts)


def split_size(env_fn: Callable[[], Any]) -> int:
    env = env_fn()
    try:
        return len(env.unwrapped.dataset)
    finally:
        env.close()


def sample_prompts(n_available: int, k: int, seed: int) -> list[int]:
    """``k`` distinct sample indices (with replacement only when the split is smaller than ``k``)."""
    rng = np.random.default_rng(seed)
    return rng.choice(n_available, size=k, replace=k > n_available).tolist()


# ---------------------------------------------------------------------------------------------------- groups
def group_trajectories(trajs: Sequence[Any], group_size: int) -> list[list[Any]]:
    """Trajectories grouped by ``group_id`` (collection order inside a group kept); every group must have N."""
    groups: dict[int, list[Any]] = {}
    for t in trajs:
        groups.setdefault(int(t.group_id), []).append(t)
    bad = {g: len(v) for g, v in groups.items() if len(v) != group_size}
    if bad:
        raise ValueError(f"collector returned groups of the wrong size (want {group_size}): {bad}")
    return [groups[g] for g in sorted(groups)]


def grounded_area_fraction(traj: Any) -> float:
    """Area of the region the trajectory grounds (its final step's box) / image area, in [0, 1]; NaN when the final
    step has no valid box (the SRPO scale of a rollout, Ground-R1)."""
    box = traj.steps[-1].box if traj.steps and traj.steps[-1].valid else None
    if box is None:
        return float("nan")
    x1, y1, x2, y2 = box
    return min(1.0, max(0.0, x2 - x1) * max(0.0, y2 - y1) / max(float(traj.width * traj.height), 1.0))


# ------------------------------------------------------------------------------------------ optimizer, schedule
def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: GRPOConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def grpo_scheduler(optimizer: torch.optim.Optimizer, cfg: GRPOConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_iters`` iterations, then constant / linear / cosine decay to 0 at the last
    iteration. Stepped once per iteration (also when ``updates_per_iter > 1``)."""
    return make_scheduler(optimizer, total=cfg.iterations, warmup=cfg.warmup_iters, kind=cfg.lr_schedule)


def strip_for_gather(traj: Any) -> Any:
    """A copy without images and token data (what metrics need, cheap to send between ranks)."""
    steps = [dataclasses.replace(s, observation=None, token_ids=None, logprobs=None, injected_ids=None)
             for s in traj.steps]
    return dataclasses.replace(traj, steps=steps)
