"""Behaviour cloning data parallel (``torchrun``, gloo on CPU): each rank draws its own share of every batch and
its phase in those draws, and a real 2-process run ends with bit-identical parameters on both ranks, logged once,
its validation sharded over the ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

from agents.bc import build_data
from agents.bc.config import BCConfig
from agents.common.checkpoint import latest_checkpoint, read_state
from agents.synthesis import SynthesizeConfig

ROOT = Path(__file__).resolve().parents[3]


def _synth():
    return SynthesizeConfig(env="IVT-Synthetic-v0", steps=2, student="scripted", verbosity=0, batch_size=8,
                            progress=False)


def test_ranks_draw_disjoint_shares_in_the_same_phases(tmp_path):
    cfg = BCConfig(init_from="tiny", data="online", synth=_synth(), batch_size=4, grad_accum=1, max_steps=4,
                   grounding_mix=0.5, grounding_only_steps=2, localize_steps=1, out=str(tmp_path))
    one = build_data(cfg)
    r0, r1 = build_data(cfg, 0, 2), build_data(cfg, 1, 2)
    for k in range(3):  # step 0: one-object scenes, step 1: grounding only, step 2: half trajectories
        a, b = r0.batch(k), r1.batch(k)
        assert len(a) == len(b) == 2
        assert [len(t.steps) for t in a] == [len(t.steps) for t in b] == ([1, 1] if k < 2 else [1, 3])
        assert {t.sample_id for t in a}.isdisjoint({t.sample_id for t in b})
        assert [len(t.steps) for t in one.batch(k)] == ([1] * 4 if k < 2 else [1, 1, 3, 3])
    assert [t.sample_id for t in build_data(cfg, 1, 2).batch(2)] == [t.sample_id for t in r1.batch(2)]  # resumable


def test_torchrun_two_ranks_identical_parameters(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "agents.bc", "train", "--out", str(out), "--max-steps", "3", "--batch-size", "4",
           "--localize-steps", "1", "--grounding-only-steps", "2", "--eval-every", "0", "--eval-at-start", "False",
           "--eval-limit", "4", "--eval-batch", "2", "--eval-max-new-tokens", "4", "--save-every", "1",
           "--log-every", "1", "--progress", "False", "--threads", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    state = read_state(latest_checkpoint(out))
    assert state["step"] == 3 and state["world_size"] == 2
    assert len(state["param_sha256"]) == 2 and state["param_sha256"][0] == state["param_sha256"][1]
    rows = [json.loads(x) for x in (out / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # rank 0 alone logs, once per step
    assert [r["train/trajectories"] for r in rows if "train/loss" in r] == [4, 8, 12]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3 and (out / "final").is_dir()
    # the final validation: each rank rolled out 2 of the 4 scenes; rank 0 logged all 4, once, and wrote best/
    assert [(r["step"], r["eval/n"]) for r in rows if "eval/n" in r] == [(3, 4.0)]
    assert json.loads((out / "best" / "eval.json").read_text())["n"] == 4
    assert res.stdout.count('"run_dir"') == 1  # one summary printed
