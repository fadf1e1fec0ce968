"""``python -m agents.evaluate`` end to end on IVT-Synthetic-v0, and ``evaluate()`` with a caller's writer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents.evaluate import evaluate, main
from agents.policies.scripted import CopyPolicy, OraclePolicy
from agents.common.run_logging import RunLogger, read_scalars
from rollouts.storage import load_trajectories

ROOT = Path(__file__).resolve().parents[3]
CONTRACT_KEYS = ["acc@0.5", "acc@0.7", "acc@0.9", "miou", "iou_step", "improve_rate", "stagnation_rate",
                 "degradation_rate", "format_rate", "n"]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "eval"
    main(["--env", "IVT-Synthetic-v0", "--policy", "copy", "--policy-kwargs", '{"first_noise": 20}', "--steps", "2",
          "--split", "test", "--limit", "6", "--out", str(out), "--seed", "1", "--group-size", "2", "--greedy",
          "--no-progress", "--strips", "3"])
    printed = capsys.readouterr().out
    assert "| Method | IVT | Acc@0.5 | Acc@0.7 | Acc@0.9 | IoU |" in printed
    assert "| Model | Step 0 | Step 1 | Step 2 | Δ | Impr. % | Stagn. % | Degr. % |" in printed
    m = json.loads((out / "metrics.json").read_text())
    for key in CONTRACT_KEYS:
        assert key in m, key
    assert m["n"] == 12 and len(m["iou_step"]) == 3
    for key in ("acc@0.5", "acc@0.7", "acc@0.9", "improve_rate", "stagnation_rate", "degradation_rate", "format_rate"):
        assert 0.0 <= m[key] <= 1.0
    assert m["stagnation_rate"] == 1.0  # copy policy
    assert m["meta"]["policy"] == "copy" and m["meta"]["group_size"] == 2 and m["meta"]["sampling"]["greedy"]
    assert (out / "metrics.md").read_text().startswith("# Evaluation: copy")
    trajs = load_trajectories(out / "trajectories.jsonl")
    assert len(trajs) == 12 and [t.meta["index"] for t in trajs[:4]] == [0, 0, 1, 1]
    assert len(list((out / "strips").glob("*.png"))) == 3
    assert list(out.glob("events.out.tfevents.*"))
    scalars = read_scalars(out)
    assert scalars[0]["step"] == 0 and scalars[0]["eval/acc@0.5"] == pytest.approx(m["acc@0.5"])
    assert scalars[0]["eval/iou_step2"] == pytest.approx(m["iou_step"][2])


class FakeWriter:
    """The SummaryWriter methods evaluate() uses."""

    def __init__(self):
        self.scalars, self.images, self.texts = {}, [], []

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_image(self, tag, img, step, dataformats):
        self.images.append((tag, img.shape, step, dataformats))

    def add_text(self, tag, text, step):
        self.texts.append(tag)


def test_evaluate_function_with_writer(tmp_path):
    w = FakeWriter()
    m = evaluate(OraclePolicy(), "IVT-Synthetic-v0", split="val", limit=5, steps=2, writer=w, prefix="val",
                 global_step=7, num_strips=2)
    assert m["acc@0.5"] == 1.0 and m["stagnation_rate"] == 1.0 and m["n"] == 5
    assert w.scalars["val/acc@0.5"] == (1.0, 7)
    assert w.scalars["val/strata/easy/share"][0] == 1.0
    assert [(tag, step, fmt) for tag, _, step, fmt in w.images] == [("val/strip/0", 7, "HWC"), ("val/strip/1", 7, "HWC")]
    h, wd, c = w.images[0][1]
    assert c == 3 and wd > 3 * 128  # three panels side by side
    # a RunLogger as the writer (what BC / GRPO hold), and a single-shot (T=0) run
    with RunLogger(tmp_path / "run") as logger:
        m0 = evaluate(CopyPolicy(), "IVT-Synthetic-v0", split="val", limit=3, steps=0, writer=logger, global_step=3)
    assert m0["steps"] == 0 and len(m0["iou_step"]) == 1
    assert read_scalars(tmp_path / "run")[0]["eval/miou"] == pytest.approx(m0["miou"])


def test_limit_beyond_dataset_and_bad_args(tmp_path):
    import gymnasium as gym

    n_val = len(gym.make("IVT-Synthetic-v0", split="val").unwrapped.dataset)
    m = evaluate(OraclePolicy(), "IVT-Synthetic-v0", split="val", limit=10**6, steps=0, num_strips=0)
    assert m["n"] == n_val
    with pytest.raises(SystemExit, match="--policy-kwargs: not valid JSON"):
        main(["--policy", "oracle", "--policy-kwargs", "{noise: 1}", "--limit", "1", "--no-progress"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(OraclePolicy(), "IVT-Synthetic-v0", limit=0)


def test_help_lists_every_option():
    r = subprocess.run([sys.executable, "-m", "agents.evaluate", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--env", "--policy", "--policy-kwargs", "--model", "--steps", "--split", "--limit", "--out", "--seed",
                "--group-size", "--greedy", "--data-root", "--num-envs", "--strips", "--config"):
        assert opt in r.stdout, opt


def test_dataset_loads_once_for_all_envs(tmp_path, caplog):
    import logging

    from tests.ivt_env.datasets import fixtures as fx

    root = fx.write_refl4(str(tmp_path), bad=True)
    with caplog.at_level(logging.WARNING, logger="ivt_env.datasets"):
        m = evaluate(OraclePolicy(), "IVT-RefL4-v0", split="test", steps=0, num_envs=4, data_root=root, num_strips=0)
    assert m["n"] == 10  # the fixture's 10 usable test records
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and "refl4-201" in dropped[0] and "bad_missing.jpg" in dropped[0]


def test_sharded_evaluation_gathers_the_metrics_of_the_whole(monkeypatch):
    """``shard=True`` under 2 ranks: rank 1 rolls out samples 1, 3, 5, rank 0 samples 0, 2, 4, 6, and the gathered
    metrics equal one process's over all 7 (the noisy oracle draws its noise per sample, so order does not matter)."""
    from agents.common import distributed

    kw = dict(split="val", limit=7, steps=2, num_strips=0, group_size=2)
    whole = evaluate(OraclePolicy(noise=80.0), "IVT-Synthetic-v0", **kw)
    shares = {}

    def as_rank(rank, gather):
        monkeypatch.setattr(distributed, "current", lambda: distributed.DistInfo(rank=rank, world_size=2))
        monkeypatch.setattr(distributed, "gather_objects", gather)
        return evaluate(OraclePolicy(noise=80.0), "IVT-Synthetic-v0", shard=True, **kw)

    as_rank(1, lambda obj: [obj, shares.setdefault(1, obj)])
    m = as_rank(0, lambda obj: [obj, shares[1]])
    assert sorted({t.meta["index"] for t in shares[1][0]}) == [1, 3, 5]
    assert m["n"] == whole["n"] == 14
    for key in ("acc@0.5", "miou", "iou_step", "delta", "improve_rate", "degradation_rate", "strata"):
        assert m[key] == whole[key], key
    assert 0.0 < whole["acc@0.5"] < 1.0 and whole["degradation_rate"] > 0  # the noise makes the metrics non-trivial
    kw["limit"] = 1  # fewer samples than ranks: rank 1 rolls out nothing
    shares.clear()
    m0 = as_rank(0, lambda obj: [shares.setdefault(0, obj), ([], [])])
    m1 = as_rank(1, lambda obj: [shares[0], shares.setdefault(1, obj)])
    assert shares[1] == ([], []) and m1["n"] == m0["n"] == 2 and m1["miou"] == m0["miou"]
