"""Behaviour cloning on 2 CPU cores: one process of 2 torch threads against ``torchrun`` with 2 ranks of 1 thread
(data parallel, ``agents.bc`` ``Shard``: each rank draws half of every batch); prints JSON.

Each side runs the CPU default (configs/bc_cpu.yaml, the tiny model from scratch) for ``--steps`` optimizer steps in
one phase of its recipe, and the seconds per step are read from the run's own ``time/step_s`` (the first
``--skip`` steps, warm-up, left out), so start-up and the final evaluation do not count. The sides alternate
(single, ddp, single, ddp, ...) for ``--reps`` repetitions, so the RATIO holds on a noisy machine. Phases:
``1a`` (one-object grounding samples), ``1b`` (2-4-object grounding samples: ``--localize-steps 0``), ``2``
(half IVT teacher trajectories of T = 2: ``--localize-steps 0 --grounding-only-steps 0``).

    python benchmarks/bc_ddp.py --phases 1a 1b 2 --steps 40 --reps 2        # about 6 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = {"1a": [], "1b": ["--localize-steps", "0"], "2": ["--localize-steps", "0", "--grounding-only-steps", "0"]}


def run_side(side: str, phase: str, steps: int, skip: int, out: Path) -> float:
    """Seconds per optimizer step of one run (median over the steps after ``skip``)."""
    args = ["train", "--out", str(out), "--max-steps", str(steps), "--eval-at-start", "False", "--eval-every", "0",
            "--eval-limit", "2", "--eval-batch", "2", "--log-every", "1", "--progress", "False", "--threads", "2",
            *PHASES[phase]]
    if side == "ddp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "agents.bc", *args]
    else:
        cmd = [sys.executable, "-m", "agents.bc", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # the runs set their own threads (2, or 1 per rank)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{side} {phase} failed: {res.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "scalars.jsonl").read_text().splitlines()]
    per_step = [r["time/step_s"] for r in rows if "time/step_s" in r and r["step"] > skip]
    return statistics.median(per_step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", nargs="+", default=["1a", "1b", "2"], choices=sorted(PHASES))
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out (warm-up)")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions per phase")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out: dict = {"load_avg_start": list(os.getloadavg()), "steps": a.steps, "reps": a.reps, "phases": {}}
    with tempfile.TemporaryDirectory(prefix="bench_bc_ddp_") as tmp:
        for phase in a.phases:
            times: dict[str, list[float]] = {"single": [], "ddp": []}
            for r in range(a.reps):
                order = ["single", "ddp"] if r % 2 == 0 else ["ddp", "single"]
                for side in order:
                    times[side].append(run_side(side, phase, a.steps, a.skip, Path(tmp) / f"{phase}_{side}_{r}"))
            single, ddp = statistics.mean(times["single"]), statistics.mean(times["ddp"])
            out["phases"][phase] = {"single_2_threads_s": round(single, 4), "torchrun_2x1_s": round(ddp, 4),
                                    "speedup": round(single / ddp, 3),
                                    "per_rep": [round(s / d, 3) for s, d in zip(times["single"], times["ddp"])]}
    out["load_avg_end"] = list(os.getloadavg())
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
