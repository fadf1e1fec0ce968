"""Data-parallel helpers for ``torchrun --nproc_per_node K python -m agents.grpo train ...``.

Design: no ``DistributedDataParallel`` wrapper. The policy owns its model (``TrainablePolicy.token_logprobs`` runs
the forward passes, possibly under ``disable_adapter`` for the reference), so wrapping the module in DDP would mean
reaching into it. Instead every rank

1. starts from identical trainable parameters (:func:`broadcast_parameters` from rank 0 after building the policy),
2. collects its OWN groups (its own prompts and sampling seed), computes advantages and accumulates gradients
   locally,
3. averages the trainable gradients with ONE flattened ``all_reduce`` (:func:`all_reduce_grads`) before clipping and
   the optimizer step,

so the optimizer sees the same averaged gradient on every rank and the parameters stay identical (tested with 2
gloo processes). The backend is ``gloo`` on CPU and ``nccl`` on CUDA. Without ``torchrun`` (no ``WORLD_SIZE`` in the
environment) everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (in place)."""
    if not current().enabled:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Average ``p.grad`` over ranks with one flattened all-reduce (a missing grad counts as zeros)."""
    info = current()
    if not info.enabled:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])  # (sum numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        new = flat[offset:offset + n].view_as(g).to(g.dtype)
        if p.grad is None:
            p.grad = new
        else:
            p.grad.copy_(new)
        offset += n


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each scalar over ranks (same keys on every rank)."""
    info = current()
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def all_reduce_sum(value: float) -> float:
    if not current().enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    info = current()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def param_digest(params: Iterable[torch.Tensor]) -> str:
    """sha256 of the parameters' bytes: equal digests on all ranks = bit-identical replicas."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digests(params: Iterable[torch.Tensor], where: str) -> list[str]:
    """Every rank's :func:`param_digest` of ``params``, in rank order (all ranks take part); raises on every rank
    when the data-parallel replicas differ (``where`` names the checkpoint in the message)."""
    digests = gather_objects(param_digest(params))
    if len(set(digests)) != 1:
        raise RuntimeError(f"trainable parameters differ between ranks at {where}: {digests}")
    return digests


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states (for :func:`agents.common.checkpoint.save_checkpoint`), in rank order."""
    from agents.common.checkpoint import get_rng_state

    return gather_objects(get_rng_state())
