"""Atomic training checkpoints: everything a killed run needs to continue exactly where it stopped.

A checkpoint is a folder::

    policy/          policy.save(...) output: what `VLMPolicy.from_pretrained` (or any policy loader) reads
    trainable.pt     the trainable tensors in `policy.trainable_parameters()` order (exact resume, any policy)
    optimizer.pt     optimizer.state_dict()
    scheduler.pt     scheduler.state_dict() (absent when there is no scheduler)
    rng.pt           RNG states (python, numpy, torch CPU, torch CUDA) per rank: a list indexed by rank
    state.json       the caller's state (iteration, best score, config, ...); JSON, so a person can read it

It is written into a hidden temp folder next to the target and moved into place with ``os.replace``: a reader (or
a resume after a crash) sees either the previous complete checkpoint or the new complete one, never half of one.
Used by GRPO (`agents.grpo`) and behaviour cloning (`agents.bc`). Files load with ``torch.load(weights_only=True)``
(RNG states are stored as plain lists/tensors for that reason).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ivt_env.atomic import atomic_dir

STATE_FILE = "state.json"
CKPT_DIRNAME = "checkpoints"
_ITER_RE = re.compile(r"^iter_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or does not match the model/optimizer it is loaded into."""


# ----------------------------------------------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    """This process's RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------------------------- parameters
def _trainable(policy: Any) -> list[torch.Tensor]:
    if hasattr(policy, "trainable_parameters"):
        return list(policy.trainable_parameters())
    if isinstance(policy, torch.nn.Module):
        return [p for p in policy.parameters() if p.requires_grad]
    raise TypeError(f"cannot checkpoint {type(policy).__name__}: it has no trainable_parameters() and is no nn.Module")


# ----------------------------------------------------------------------------------------------------- save/load
def save_checkpoint(
    directory: str | os.PathLike,
    *,
    policy: Any = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    state: Optional[dict[str, Any]] = None,
    rng_states: Optional[Sequence[dict[str, Any]]] = None,
    save_policy_files: bool = True,
) -> Path:
    """Write a complete checkpoint to ``directory`` atomically (replacing an older one there) and return its path.

    ``state`` must be JSON-serialisable (iteration, best score, config dict, ...). ``rng_states``: one entry per
    rank (gather them with :func:`agents.common.distributed.gather_rng_states` under DDP); default: this process's state.
    ``save_policy_files=False`` skips ``policy.save`` (the exact tensors in ``trainable.pt`` are always written).
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        if policy is not None:
            if save_policy_files and hasattr(policy, "save"):
                policy.save(str(tmp / "policy"))
            torch.save([p.detach().cpu().clone() for p in _trainable(policy)], tmp / "trainable.pt")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(list(rng_states) if rng_states is not None else [get_rng_state()], tmp / "rng.pt")
        text = json.dumps(state or {}, indent=2, sort_keys=True, default=_json_default)
        with open(tmp / STATE_FILE, "w") as f:  # written last: its presence marks a complete folder
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return directory


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"checkpoint state: {type(o).__name__} is not JSON-serialisable ({o!r:.80})")


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    policy: Any = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore what is given (trainable tensors in place, optimizer, scheduler, RNG of ``rank``); return the state.

    Raises :class:`CheckpointError` naming the folder and the mismatch (parameter count/shape, missing file).
    """
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise CheckpointError(f"{directory}: not a complete checkpoint (no {STATE_FILE})")
    if policy is not None:
        f = directory / "trainable.pt"
        if not f.is_file():
            raise CheckpointError(f"{directory}: no trainable.pt to restore the policy from")
        saved = _load_file(f)
        params = _trainable(policy)
        if len(saved) != len(params):
            raise CheckpointError(f"{f}: holds {len(saved)} trainable tensors, the policy has {len(params)}")
        for i, (p, s) in enumerate(zip(params, saved)):
            if p.shape != s.shape:
                raise CheckpointError(f"{f}: tensor {i} has shape {tuple(s.shape)}, the policy's is {tuple(p.shape)}")
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s.to(device=p.device, dtype=p.dtype))
    for obj, name in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None:
            continue
        f = directory / name
        if not f.is_file():
            raise CheckpointError(f"{directory}: no {name} to restore from")
        loaded = _load_file(f)
        try:
            obj.load_state_dict(loaded)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{f}: does not match the {name[:-3]}: {e}") from e
    if restore_rng and (directory / "rng.pt").is_file():
        states = _load_file(directory / "rng.pt")
        set_rng_state(states[rank % len(states)])
    return read_state(directory)


def _load_file(f: Path) -> Any:
    """``torch.load(weights_only=True)`` of one checkpoint file; a corrupt, truncated or hostile file is a
    :class:`CheckpointError` that names it (the raw unpickling error names neither the file nor the fix)."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every way a file can be unreadable gets the same clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{f}: unreadable checkpoint file ({type(e).__name__}: {first[:200]}); "
                              "resume from another checkpoint or delete this one") from e


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON state of a checkpoint without loading tensors."""
    p = Path(directory) / STATE_FILE
    if not p.is_file():
        raise CheckpointError(f"{directory}: not a complete checkpoint (no {STATE_FILE})")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: unreadable checkpoint state ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------- run folders
def checkpoint_dir(run_dir: str | os.PathLike, iteration: int) -> Path:
    """Where iteration ``iteration``'s checkpoint lives: ``{run_dir}/checkpoints/iter_{iteration:06d}``."""
    return Path(run_dir) / CKPT_DIRNAME / f"iter_{iteration:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete ``iter_*`` checkpoints of a run (or of a ``checkpoints`` folder), oldest first."""
    run_dir = Path(run_dir)
    root = run_dir / CKPT_DIRNAME if (run_dir / CKPT_DIRNAME).is_dir() else run_dir
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _ITER_RE.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run; ``run_dir`` may also be a checkpoint folder itself. None if none."""
    run_dir = Path(run_dir)
    if (run_dir / STATE_FILE).is_file() and _ITER_RE.match(run_dir.name):
        return run_dir
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, lr: Optional[float] = None) -> None:
    """Give the optimizer the learning rate of ``scheduler`` (rebuilt for THIS run's length) at its restored step.

    A LambdaLR checkpoint stores the step, not the schedule function, but the optimizer's saved ``lr`` is the old
    schedule's value: extending a finished cosine run would train its first new step at lr 0. Called right after
    :func:`load_checkpoint`; for an unchanged run it computes the same value the schedule had set (bit-identical).
    ``lr``: THIS run's peak learning rate (the config's): the checkpoint restored the old one into the scheduler's
    ``base_lrs``, so a resume with another ``--lr`` would silently keep the old; every group is rescaled to it
    (groups keep their ratios to the first).
    """
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        return
    if lr is not None and scheduler.base_lrs and scheduler.base_lrs[0] != lr:
        scale = lr / scheduler.base_lrs[0] if scheduler.base_lrs[0] else 1.0
        scheduler.base_lrs = [lr if b == scheduler.base_lrs[0] else b * scale for b in scheduler.base_lrs]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = base
    lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-[^/]+$")  # ivt_env.atomic.atomic_dir's staging folder
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-\d+$")  # the previous folder it moves aside before the swap


def clean_interrupted_saves(run_dir: str | os.PathLike) -> list[str]:
    """Remove what a save killed midway left in a run folder (``.iter_*.tmp-*``, ``.best.tmp-*``); a previous folder
    moved aside (``.best.old-PID``) whose replacement never landed is moved back. Returns what was done, one line
    each. Only for a run folder no live process writes to (a resume, on rank 0)."""
    done = []
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / CKPT_DIRNAME):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            tmp, old = _TMP_RE.match(p.name), _OLD_RE.match(p.name)
            if tmp and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p} (a save interrupted before it completed)")
            elif old and p.is_dir():
                target = folder / old.group("name")
                if not target.exists():
                    os.replace(p, target)
                    done.append(f"restored {target} from {p.name} (its replacement never landed)")
                else:
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(f"removed {p} (superseded by {target.name})")
    return done


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` iteration checkpoints (``keep_last <= 0`` keeps all)."""
    if keep_last <= 0:
        return []
    old = list_checkpoints(run_dir)[:-keep_last]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return old
