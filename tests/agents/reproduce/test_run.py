import json

import pytest

from agents.reproduce.rows import PAPER, ROWS, findings
from agents.reproduce.run import main


def test_findings_by_hand():
    rows = {"base_single_shot": {"acc@0.5": 0.40}, "base_ivt": {"acc@0.5": 0.30},
            "sft_ivt": {"acc@0.5": 0.45, "degradation_rate": 0.40}, "sft_grpo_ivt": {"degradation_rate": 0.21}}
    got = {f["finding"][0]: f["holds"] for f in findings(rows)}
    assert got == {"a": True, "b": True, "c": False}  # 0.21 > 0.5 * 0.40
    rows["sft_grpo_ivt"]["degradation_rate"] = 0.20
    rows["base_ivt"]["acc@0.5"] = 0.36  # 0.36 is not below 0.40 - 0.05
    got = {f["finding"][0]: f["holds"] for f in findings(rows)}
    assert got == {"a": False, "b": False, "c": True}
    # the paper's own figures show all three: 0.487 < 0.796 - 0.05; 0.820 > 0.487 + 0.1; 0.248 <= 0.5 x 0.634
    assert [f["holds"] for f in findings(PAPER)] == [True, True, True]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from agents.policies.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(str(out), seed=0)
    return str(out)


def test_reproduce_end_to_end_on_given_checkpoints(tiny_model, tmp_path):
    import shutil

    out = tmp_path / "repro"
    grpo_run = tmp_path / "grpo_run"  # a GRPO run folder keeps its policy in best/policy/ (the full mode's stages)
    shutil.copytree(tiny_model, grpo_run / "best" / "policy")
    (grpo_run / "best" / "state.json").write_text(json.dumps({"iteration": 60, "best_iteration": 60}))
    args = ["--out", str(out), "--limit", "3", "--progress", "False", "--strips", "1"]
    for flag in ("--base-model", "--sft-model", "--grpo-single-model"):
        args += [flag, tiny_model]
    assert main(args + ["--grpo-model", str(grpo_run / "best")]) == 0
    assert json.loads((out / "results.json").read_text())["meta"]["models"]["grpo"] == str(grpo_run / "best" / "policy")
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {r.name for r in ROWS}
    for row in ROWS:
        r = results["rows"][row.name]
        assert len(r["iou_step"]) == row.steps + 1 and r["n"] == 3
        assert set(r) >= {"acc@0.5", "acc@0.7", "acc@0.9", "miou", "delta", "improve_rate", "stagnation_rate",
                          "degradation_rate"}
    assert results["paper"]["sft_ivt"]["degradation_rate"] == pytest.approx(0.634)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Table 2" in html  # self-contained: the figure is inline
    assert (out / "iou_per_step.png").stat().st_size > 1000
    assert "| SFT + IVT | paper |" in (out / "report.md").read_text()
    assert results["meta"]["trained_until"] == {"base": None, "sft": None, "grpo": "iteration 60", "grpo_single": None}
    assert "Checkpoints: grpo at iteration 60." in (out / "report.md").read_text()


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    args = ["--out", str(tmp_path / "r"), "--from-shipped", "--base-model", str(tmp_path / "nope")]
    assert main(args) == 2
    assert "base checkpoint" in capsys.readouterr().err


def test_bc_stage_continues_the_base_run(tmp_path):
    from agents.common.checkpoint import read_state
    from agents.reproduce.run import seed_bc_from_base

    base, bc = tmp_path / "base", tmp_path / "bc"
    (base / "base").mkdir(parents=True)
    (base / "base" / "config.json").write_text("{}")
    ckpt = base / "checkpoints" / "iter_000040"
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.pt").write_bytes(b"weights")
    (ckpt / "state.json").write_text(json.dumps({"step": 40, "best": 0.54, "best_step": 40, "evals": [{"a": 1}]}))
    assert not seed_bc_from_base(base, bc, phase1=30)  # the base stopped elsewhere: nothing copied
    assert not bc.exists()
    assert seed_bc_from_base(base, bc, phase1=40)
    state = read_state(bc / "checkpoints" / "iter_000040")
    assert state == {"step": 40, "best": None, "best_step": None, "evals": []}  # best re-chosen on T = 2
    assert (bc / "checkpoints" / "iter_000040" / "trainable.pt").read_bytes() == b"weights"
    assert (bc / "base" / "config.json").is_file() and not (tmp_path / "bc.seeding").exists()
    assert read_state(ckpt)["best"] == 0.54  # the base run is untouched
    assert not seed_bc_from_base(base, bc, phase1=40)  # never over an existing bc folder


def test_grpo_stages_pin_the_assets_rollout_batch(tmp_path, monkeypatch):
    """The shipped GRPO assets were trained with engine batches of 24 (the default before issue 16); the default
    config now collects 48 at once, so the full mode pins 24 to reproduce them."""
    import agents.grpo
    from agents.common.config import load_yaml
    from agents.grpo import GRPOConfig
    from agents.reproduce.run import ASSET_ROLLOUT_BATCH, ReproduceConfig, _grpo_stage

    seen = []
    monkeypatch.setattr(agents.grpo, "train", lambda g: seen.append(g))
    _grpo_stage(ReproduceConfig(), tmp_path / "g", tmp_path / "sft")
    _grpo_stage(ReproduceConfig(), tmp_path / "s", tmp_path / "sft", max_refine_steps=0, branch_size=1)
    assert [g.rollout_batch for g in seen] == [ASSET_ROLLOUT_BATCH] * 2 == [24, 24]
    assert seen[1].max_refine_steps == 0
    cpu = load_yaml(GRPOConfig, "grpo_cpu.yaml")
    assert cpu.rollout_batch == -1 and cpu.rollout_slots() == 48  # the default: one batch of 8 x 6
