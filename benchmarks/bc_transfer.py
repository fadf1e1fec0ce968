"""Behaviour cloning's per-step overheads outside the model (session 11), before and after, in one run; prints JSON.

- ``transfer``: what a training rank spends RECEIVING one micro-batch from its data worker
  (``agents.bc.data.Prefetcher.next`` with the worker ahead; wall and CPU milliseconds of the consumer). ``before``
  (``pack=False``): every tensor of the 16 encoded trajectories (112) crosses on its own, through PyTorch's default
  sharing strategy (a file descriptor per tensor, fetched over a socket on receipt). ``now``: the worker packs each
  dtype into one buffer (:func:`agents.bc.data.pack_tensors`) and shares it as a file (3 per micro-batch).
- ``rope``: the rope positions of one padded micro-batch by the model's own ``get_rope_index`` (``before``) and by
  :func:`agents.policies.rope.mrope_positions` (``now``).

Both sides get the same values (the encoded tensors and the positions are compared): the ratios are the savings
alone. Sides alternate; medians are reported per phase (``1b``: 2-4-object grounding samples, ``2``: half IVT
teacher trajectories of T = 2), for the CPU default's rank micro-batch under ``torchrun --nproc_per_node 2`` (16).

    OMP_NUM_THREADS=1 python benchmarks/bc_transfer.py       # about 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agents.bc.config import BCConfig  # noqa: E402
from agents.bc.data import Prefetcher  # noqa: E402
from agents.bc.setup import build_data, build_policy  # noqa: E402
from agents.common.config import load_yaml  # noqa: E402
from agents.policies.rope import mrope_positions  # noqa: E402

PHASES = {"1b": {"localize_steps": 0}, "2": {"localize_steps": 0, "grounding_only_steps": 0}}


def receive(cfg: BCConfig, policy, pack: bool, batches: int, wait_s: float) -> tuple[float, float, list]:
    """Consumer wall / CPU ms per micro-batch (the worker given ``wait_s`` to get ahead first) and the batches."""
    pf = Prefetcher(build_data(cfg, rank=0, world=2), 0, policy.encode_trajectory, depth=2, pack=pack)
    wall, cpu, got = [], [], []
    try:
        got.append(pf.next(0)[1])  # starts the worker
        for k in range(1, batches + 1):
            time.sleep(wait_s)
            c0, w0 = time.process_time(), time.perf_counter()
            got.append(pf.next(k)[1])
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    finally:
        pf.close()
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3, got


def same_encoded(a: list, b: list) -> bool:
    fields = [f.name for f in dataclasses.fields(a[0][0])]
    return all(torch.equal(getattr(x, f), getattr(y, f)) if isinstance(getattr(x, f), torch.Tensor)
               else getattr(x, f) == getattr(y, f) for ba, bb in zip(a, b) for x, y in zip(ba, bb) for f in fields)


def padded(encoded: list) -> tuple:
    B, L = len(encoded), max(e.input_ids.shape[0] for e in encoded)
    ids, attn = torch.zeros((B, L), dtype=torch.long), torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.int32)
    for b, e in enumerate(encoded):
        n = e.input_ids.shape[0]
        ids[b, :n], attn[b, :n], mm[b, :n] = e.input_ids, 1, e.mm_token_type_ids
    return ids, mm, torch.cat([e.image_grid_thw for e in encoded]), attn


def rope(model, encoded: list, reps: int) -> dict:
    ids, mm, grid, attn = padded(encoded)
    merge = model.config.vision_config.spatial_merge_size
    sides = {"before": lambda: model.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm, image_grid_thw=grid,
                                                          attention_mask=attn)[0],
             "now": lambda: mrope_positions(mm, grid, attn, merge)}
    times: dict = {k: [] for k in sides}
    for r in range(reps):
        for k in (("before", "now") if r % 2 == 0 else ("now", "before")):
            t0 = time.perf_counter()
            sides[k]()
            times[k].append(time.perf_counter() - t0)
    before, now = statistics.median(times["before"]) * 1e3, statistics.median(times["now"]) * 1e3
    return {"before_ms": round(before, 2), "now_ms": round(now, 2), "speedup": round(before / now, 2),
            "same_positions": bool(torch.equal(sides["before"](), sides["now"]()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    ap.add_argument("--batches", type=int, default=6, help="micro-batches received per side and repetition")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions per phase")
    ap.add_argument("--wait", type=float, default=0.6, help="seconds the worker gets before each receipt")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = load_yaml(BCConfig, "bc_cpu.yaml")
    out: dict = {"load_avg_start": list(os.getloadavg()), "batches": a.batches, "reps": a.reps, "phases": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        policy = build_policy(dataclasses.replace(base, out=tmp), Path(tmp))
        for phase in a.phases:
            cfg = dataclasses.replace(base, **PHASES[phase])
            res: dict = {"before": [], "now": []}
            got = {}
            for r in range(a.reps):
                for side in (["before", "now"] if r % 2 == 0 else ["now", "before"]):
                    wall, cpu, got[side] = receive(cfg, policy, side == "now", a.batches, a.wait)
                    res[side].append((wall, cpu))
            med = {s: [statistics.median(v[i] for v in res[s]) for i in (0, 1)] for s in res}
            out["phases"][phase] = {
                "transfer": {"before_wall_ms": round(med["before"][0], 1), "now_wall_ms": round(med["now"][0], 1),
                             "before_cpu_ms": round(med["before"][1], 1), "now_cpu_ms": round(med["now"][1], 1),
                             "wall_speedup": round(med["before"][0] / med["now"][0], 2),
                             "same_batches": same_encoded(got["before"], got["now"])},
                "rope": rope(policy.hf_model, got["now"][0], reps=20),
            }
    out["load_avg_end"] = list(os.getloadavg())
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
