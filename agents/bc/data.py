"""Training batches of teacher trajectories for behaviour cloning, with the observation images each step saw.

Two sources, both deterministic in (seed, batch number) so a resumed run draws exactly the batches an
uninterrupted run would have drawn, without saving any data-loader state:

- :class:`FolderData`: a folder written by ``python -m agents.synthesis`` (the paper's recipe: a fixed set of
  teacher trajectories, several epochs, reshuffled each epoch). Images are read lazily per batch from the PNGs
  the synthesis wrote; a trajectory without them is replayed through the env to render them again.
- :class:`OnlineData`: teacher trajectories synthesized on the fly, fresh scenes in every batch (the CPU default).
  DESIGN.md measured that a tiny model trained from scratch needs fresh scenes every batch, and synthesis with the
  scripted student and the geometric teacher costs about a millisecond per trajectory, so no folder is written.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from rollouts.observations import load_png, replay_observations
from rollouts.types import Trajectory


class FolderData:
    """Batches of a synthesized folder's trajectories: epoch ``e`` visits them in ``Random(seed + e)`` order."""

    def __init__(self, folder: str | Path, batch_size: int, seed: int = 0, env_fn: Any = None, limit: int = 0):
        from rollouts.storage import load_trajectories

        self.folder = Path(folder)
        path = self.folder / "trajectories.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.folder}: no trajectories.jsonl; synthesize one with `python -m agents.synthesis --out {folder}`"
            )
        self.trajectories = load_trajectories(path)
        if limit > 0:
            self.trajectories = self.trajectories[:limit]
        if not self.trajectories:
            raise ValueError(f"{path}: holds no trajectories")
        for t in self.trajectories:
            for st in t.steps:
                if st.image_path and not Path(st.image_path).is_absolute():
                    st.image_path = str(self.folder / st.image_path)
        self.batch_size = batch_size
        self.seed = seed
        self.env_fn = env_fn
        self._env = None
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.trajectories)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.trajectories) / self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.trajectories)))
            random.Random(self.seed + epoch).shuffle(order)
            self._orders = {epoch: order}  # keep one epoch's order in memory
        return self._orders[epoch]

    def batch(self, k: int) -> list[Trajectory]:
        """Micro-batch number ``k`` (0, 1, 2, ... across epochs); the last batch of an epoch may be smaller."""
        epoch, j = divmod(k, self.batches_per_epoch)
        idx = self._order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        out = []
        for i in idx:
            src = self.trajectories[i]
            t = Trajectory.from_dict(src.to_dict())  # a copy: images are held only while the batch lives
            if all(st.image_path and Path(st.image_path).is_file() for st in t.steps):
                for st in t.steps:
                    st.observation = load_png(st.image_path, f"trajectory {t.sample_id} step {st.t}")
            else:
                if self.env_fn is None:
                    raise FileNotFoundError(
                        f"{self.folder}: trajectory {t.sample_id!r} has no step images and no env to replay it in"
                    )
                if self._env is None:
                    self._env = self.env_fn()
                replay_observations(t, self._env)
            out.append(t)
        return out


class OnlineData:
    """Fresh teacher trajectories per batch from a :class:`agents.synthesis.Synthesizer` (scripted student or
    GT perturbation; a model student would be far too slow to run per batch).

    ``grounding`` (optional): a second synthesizer of single-step grounding samples (``start=gt, steps=0``: the
    step-0 prompt answered with the GT box). ``grounding_mix`` of every micro-batch comes from it, and all of the
    first ``grounding_only`` micro-batches. ``localize`` (optional): a synthesizer of single-step grounding samples
    on easier scenes (e.g. one object each) that supplies the whole of the first ``localize_only`` micro-batches."""

    def __init__(self, synthesizer: Any, batch_size: int, seed: int = 0, indices: Optional[Sequence[int]] = None,
                 grounding: Any = None, grounding_mix: float = 0.0, grounding_only: int = 0,
                 localize: Any = None, localize_only: int = 0):
        self.syn = synthesizer
        self.localize = localize
        self.localize_only = localize_only if localize is not None else 0
        self.grounding = grounding
        self.grounding_mix = grounding_mix
        self.grounding_only = grounding_only
        self.batch_size = batch_size
        self.seed = seed
        self.n = len(synthesizer.dataset) if indices is None else len(indices)
        self.indices = indices
        self.seen = 0  # start records made (kept or filtered)

    def batch(self, k: int) -> list[Trajectory]:
        """Micro-batch number ``k``: samples drawn by ``Random((seed, k))``, filtered, played as teacher
        trajectories (single-step grounding samples first when mixed)."""
        if k < self.localize_only:
            return self._draw(self.localize, self.batch_size, random.Random(f"{self.seed}/{k}/localize"))
        n_ground = 0
        if self.grounding is not None:
            n_ground = self.batch_size if k < self.grounding_only else int(round(self.grounding_mix * self.batch_size))
        out = self._draw(self.grounding, n_ground, random.Random(f"{self.seed}/{k}/ground")) if n_ground else []
        return out + self._draw(self.syn, self.batch_size - n_ground, random.Random(f"{self.seed}/{k}"))

    def _draw(self, syn: Any, count: int, rng: random.Random) -> list[Trajectory]:
        trajs: list[Trajectory] = []
        tries = 0
        while len(trajs) < count:
            tries += 1
            if tries > 50:
                raise RuntimeError(
                    f"online teacher data: the IoU filter [{syn.cfg.iou_min}, {syn.cfg.iou_max}] keeps "
                    f"almost nothing ({len(trajs)} trajectories after {tries - 1} draws)"
                )
            want = count - len(trajs)
            draw = [rng.randrange(self.n) for _ in range(want + want // 2 + 1)]
            if self.indices is not None:
                draw = [int(self.indices[i]) for i in draw]
            # scripted or ground-truth starts are made per index: read the draw in order and stop once ``want``
            # are kept (the same picks, fewer scenes built); a policy student answers the whole draw in one batch
            chunk = want if getattr(syn, "student", None) is None else len(draw)
            kept: list[dict] = []
            for pos in range(0, len(draw), chunk):
                recs = syn.starts(draw[pos:pos + chunk])
                self.seen += len(recs)
                kept += [r for r in recs if r["stage"] == "kept"]
                if len(kept) >= want:
                    break
            trajs += syn.trajectories(kept[:want], keep_observations=True)
        return trajs


class Shard:
    """Data-parallel rank ``rank`` of ``world`` (``torchrun``): its micro-batch ``k`` is ``data``'s micro-batch
    ``k * world + rank``, so the ranks draw disjoint batches of ``data`` (built with the per-rank batch size and
    its phase lengths in those micro-batches) and a resumed run draws the same ones again.

    >>> class Numbers:
    ...     batches_per_epoch = 6
    ...     def batch(self, k): return [k]
    >>> [Shard(Numbers(), 1, 2).batch(k) for k in range(3)], Shard(Numbers(), 1, 2).batches_per_epoch
    ([[1], [3], [5]], 3)
    """

    def __init__(self, data: Any, rank: int, world: int):
        self.data, self.rank, self.world = data, int(rank), int(world)

    def batch(self, k: int) -> list[Trajectory]:
        return self.data.batch(k * self.world + self.rank)

    @property
    def batches_per_epoch(self) -> Optional[int]:
        n = getattr(self.data, "batches_per_epoch", None)
        return max(1, n // self.world) if n else n

    def __len__(self) -> int:
        return len(self.data)


class _Batches(torch.utils.data.Dataset):
    """Item k: micro-batch k of ``data`` and, with ``encode``, each trajectory's training sequence."""

    def __init__(self, data: Any, encode: Optional[Callable[[Any], Any]], pack: bool = True):
        self.data, self.encode, self.pack = data, encode, pack

    def __len__(self) -> int:  # never used for sampling (the sampler gives the indices)
        return 1 << 62

    def __getitem__(self, k: int):
        batch = self.data.batch(int(k))
        if self.encode is None:
            return batch, None
        encoded = [self.encode(t) for t in batch]
        return batch, (pack_tensors(encoded) if self.pack else encoded)


def pack_tensors(items: list) -> list:
    """Copies of the dataclasses ``items`` whose tensor fields are views into ONE flat buffer per dtype: a
    micro-batch then crosses to the training process as 3 shared-memory files instead of one per tensor (112 for
    16 encoded trajectories), with the same values.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class E:
    ...     a: torch.Tensor
    ...     b: torch.Tensor
    >>> out = pack_tensors([E(torch.arange(3), torch.ones(2, 2)), E(torch.arange(2), torch.zeros(1, 2))])
    >>> out[1].a.tolist(), out[0].b.shape, out[0].a.untyped_storage().data_ptr() == out[1].a.untyped_storage().data_ptr()
    ([0, 1], torch.Size([2, 2]), True)
    """
    fields = [[(f.name, getattr(e, f.name)) for f in dataclasses.fields(e)
               if isinstance(getattr(e, f.name), torch.Tensor)] for e in items]
    by_dtype: dict = {}
    for named in fields:
        for _, t in named:
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    flat = {d: torch.cat(ts) for d, ts in by_dtype.items()}
    offset = dict.fromkeys(flat, 0)
    out = []
    for e, named in zip(items, fields):
        views = {}
        for name, t in named:
            a, n = offset[t.dtype], t.numel()
            views[name] = flat[t.dtype][a:a + n].view(t.shape)
            offset[t.dtype] = a + n
        out.append(dataclasses.replace(e, **views))
    return out


def _as_is(item: Any) -> Any:
    return item


def _share_by_file(worker_id: int) -> None:
    """In the worker only: its tensors reach the training process as shared-memory FILES. Under the default
    strategy (file descriptors) the receiver fetches every storage's descriptor from the worker over a socket: with
    one storage per tensor that was 107 ms of a rank's wall time (48 ms CPU) per micro-batch of 16 encoded
    trajectories, against 7 ms packed and shared as files (``benchmarks/bc_transfer.py``)."""
    torch.multiprocessing.set_sharing_strategy("file_system")


class Prefetcher:
    """Micro-batches ``start``, ``start + 1``, ... of ``data`` (FolderData / OnlineData) drawn in ONE worker process,
    ``depth`` ahead of the consumer, with their training sequences (``encode(traj)``, e.g.
    ``VLMPolicy.encode_trajectory``: overlay rendering and the image processor) also made there. Batch k is a pure
    function of (seed, k), so the batches and sequences are exactly those drawn in the training process.
    ``next(k)`` returns ``(trajectories, encoded or None)`` and checks that k is the next index. The worker is forked
    (it shares the data source and the encoder as they are at the first ``next``) and stops at :meth:`close`.
    ``depth=0``: no worker, each batch made on demand. ``pack`` (default): the worker packs each micro-batch's
    tensors into one buffer per dtype (:func:`pack_tensors`) shared as a file, so receiving it costs the training
    rank about 7 ms instead of 107 (one descriptor round trip per tensor; ``benchmarks/bc_transfer.py``)."""

    def __init__(self, data: Any, start: int = 0, encode: Optional[Callable[[Any], Any]] = None, depth: int = 2,
                 pack: bool = True):
        self.data, self.encode, self.depth, self.pack = data, encode, int(depth), bool(pack)
        self.k = int(start)
        self._it: Optional[Iterator] = None
        self._loader = None

    def _start(self) -> None:
        import itertools
        import multiprocessing

        self._loader = torch.utils.data.DataLoader(
            _Batches(self.data, self.encode, self.pack), batch_size=None, sampler=itertools.count(self.k),
            num_workers=1, prefetch_factor=self.depth, collate_fn=_as_is,
            worker_init_fn=_share_by_file if self.pack else None,
            multiprocessing_context=multiprocessing.get_context("fork"),
        )
        self._it = iter(self._loader)

    def next(self, k: int):
        if k != self.k:
            raise ValueError(f"Prefetcher: asked for micro-batch {k}, the next one is {self.k}")
        if self.depth <= 0:
            self.k += 1
            batch = self.data.batch(k)
            return batch, ([self.encode(t) for t in batch] if self.encode is not None else None)
        if self._it is None:
            self._start()  # its sampler counts from self.k
        self.k += 1
        return next(self._it)

    def close(self) -> None:
        it, self._it, self._loader = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
