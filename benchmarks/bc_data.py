"""Behaviour cloning's online data (``agents.bc.data.OnlineData``): milliseconds to draw one rank's micro-batch of the
CPU default (configs/bc_cpu.yaml under ``torchrun --nproc_per_node 2``: 16 samples), with and without the two
savings of session 10, in one run; prints JSON.

- ``before``: every synthetic scene built afresh on each lookup (``SCENE_MEMO = 0``) and the start records of a
  whole draw (1.5x the batch) made at once, the route before: a training sample's scene was built 3-4 times (its
  start record, its teacher plan, the env reset) and the start records beyond the batch were thrown away.
- ``now``: the dataset's scene memo and start records made only until the micro-batch is full.

Both sides draw the same micro-batches (their ids, texts and observation images are compared), so the ratio is the
saving alone. Sides alternate per repetition; the median of each side's repetitions is reported per phase: ``1a``
(one-object grounding samples), ``1b`` (2-4-object grounding samples), ``2`` (half IVT teacher trajectories of
T = 2). The model is not involved (one rank's worker process draws and encodes; encoding is not timed here).

    OMP_NUM_THREADS=1 python benchmarks/bc_data.py --batches 20 --reps 3    # about 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agents.bc.config import BCConfig  # noqa: E402
from agents.bc.data import OnlineData  # noqa: E402
from agents.bc.setup import build_data  # noqa: E402
from agents.common.config import load_yaml  # noqa: E402
from ivt_env.datasets import synthetic  # noqa: E402

PHASES = {"1a": {}, "1b": {"localize_steps": 0}, "2": {"localize_steps": 0, "grounding_only_steps": 0}}


class WholeDraw(OnlineData):
    """The route before: the start records of every drawn index at once, then the first kept ones."""

    def _draw(self, syn, count, rng):
        trajs = []
        while len(trajs) < count:
            want = count - len(trajs)
            recs = syn.starts([rng.randrange(self.n) for _ in range(want + want // 2 + 1)])
            trajs += syn.trajectories([r for r in recs if r["stage"] == "kept"][:want], keep_observations=True)
        return trajs


@contextlib.contextmanager
def scene_memo(size: int):
    old = synthetic.SCENE_MEMO
    synthetic.SCENE_MEMO = size
    try:
        yield
    finally:
        synthetic.SCENE_MEMO = old


def draw(side: str, cfg: BCConfig, batches: int) -> tuple[float, list]:
    """Milliseconds per micro-batch of rank 0 (of 2) and the batches' contents."""
    data = build_data(cfg, rank=0, world=2)  # a Shard of OnlineData, batch 16
    if side == "before":
        data.data.__class__ = WholeDraw
    with scene_memo(0 if side == "before" else synthetic.SCENE_MEMO):
        t0 = time.perf_counter()
        got = [data.batch(k) for k in range(batches)]
        ms = (time.perf_counter() - t0) / batches * 1000
    return ms, [(t.sample_id, [s.text for s in t.steps], [s.observation for s in t.steps]) for b in got for t in b]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[1] == y[1] and all(np.array_equal(p, q) for p, q in zip(x[2], y[2]))
                                    for x, y in zip(a, b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    ap.add_argument("--batches", type=int, default=20, help="micro-batches per side and repetition")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions per phase")
    a = ap.parse_args(argv)
    base = load_yaml(BCConfig, "bc_cpu.yaml")
    out: dict = {"load_avg_start": list(os.getloadavg()), "batches": a.batches, "reps": a.reps, "phases": {}}
    t_all = time.perf_counter()
    for phase in a.phases:
        cfg = dataclasses.replace(base, **PHASES[phase])
        times: dict[str, list[float]] = {"before": [], "now": []}
        contents = {}
        for r in range(a.reps):
            for side in (["before", "now"] if r % 2 == 0 else ["now", "before"]):
                ms, contents[side] = draw(side, cfg, a.batches)
                times[side].append(ms)
        before, now = statistics.median(times["before"]), statistics.median(times["now"])
        out["phases"][phase] = {"before_ms": round(before, 1), "now_ms": round(now, 1),
                                "speedup": round(before / now, 2), "same_batches": same(contents["before"],
                                                                                      contents["now"])}
    out["load_avg_end"] = list(os.getloadavg())
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
