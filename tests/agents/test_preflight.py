"""Names and folders are checked before any work, and a user's mistake is one line, not a traceback (issue 13)."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agents import bc, grpo
from agents.policies.model_dir import model_label, resolve_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from agents.policies.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(str(out), seed=0)
    return str(out)


@pytest.mark.parametrize("flag, value, message", [
    ("--advantage", "nope", "--advantage: unknown advantage estimator 'nope'"),
    ("--reward", "nope", "--reward: unknown reward 'nope'"),
    ("--policy", "nope", "--policy: unknown policy 'nope'"),
    ("--env-id", "IVT-Nope-v0", "--env-id 'IVT-Nope-v0' is not a registered env id"),
    ("--data-root", "/no/such/data", "--data-root /no/such/data: no such data folder"),
])
def test_grpo_names_fail_first_in_one_line(tiny_model, tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    rc = grpo.main(["train", "--init-from", tiny_model, "--out", str(out), flag, value, "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # no run folder left behind
    assert time.perf_counter() - t0 < 20  # no model load, no validation, no rollout


def test_bc_names_and_folders_fail_first_in_one_line(tmp_path, capsys):
    cases = [
        (["--data", str(tmp_path / "no_data")], "--data " + str(tmp_path / "no_data") + ": no such teacher-data"),
        (["--init-from", str(tmp_path / "no_model")], "no such model folder (use 'tiny'"),
        (["--synth.env", "IVT-Nope-v0"], "--synth.env 'IVT-Nope-v0' is not a registered env id"),
        (["--prompts", "no_such_prompts.yaml"], "--prompts no_such_prompts.yaml: no such file"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        rc = bc.main(["train", "--out", str(out), "--threads", "1", *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (extra, err)
        assert not out.exists()


@pytest.mark.parametrize("module", ["agents.grpo", "agents.bc"])
def test_missing_config_file_is_one_line(module, capsys):
    mod = {"agents.grpo": grpo, "agents.bc": bc}[module]
    with pytest.raises(SystemExit) as e:
        mod.main(["train", "--config", "no_such_config.yaml"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--config no_such_config.yaml: config file not found" in err
    assert len(err.splitlines()) == 1


def test_synthesis_unknown_env_and_missing_config(tmp_path, capsys):
    from agents.synthesis import main

    assert main(["--env", "IVT-Nope-v0", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--env 'IVT-Nope-v0' is not a registered env id" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit) as e:
        main(["--config", "nope.yaml"])
    assert e.value.code == 2 and "config file not found" in capsys.readouterr().err


def test_model_folder_resolution(tiny_model, tmp_path):
    run = tmp_path / "grpo_run"
    ckpt = run / "checkpoints" / "iter_000004"
    shutil.copytree(tiny_model, ckpt / "policy")
    shutil.copytree(tiny_model, run / "best" / "policy")
    (ckpt / "trainable.pt").write_bytes(b"")
    assert resolve_model_dir(str(ckpt)) == str(ckpt / "policy")
    assert resolve_model_dir(str(run / "best")) == str(run / "best" / "policy")
    assert resolve_model_dir(str(run)) == str(run / "best" / "policy")
    assert resolve_model_dir(tiny_model) == tiny_model
    assert resolve_model_dir("Qwen/Qwen3-VL-2B-Instruct") == "Qwen/Qwen3-VL-2B-Instruct"  # a hub name: unchanged
    with pytest.raises(FileNotFoundError, match=r"--model runs/x/best: no such model folder"):
        resolve_model_dir("runs/x/best")
    bc_ckpt = tmp_path / "bc_run" / "checkpoints" / "iter_000002"
    bc_ckpt.mkdir(parents=True)
    (bc_ckpt / "trainable.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only the trained tensors.*best/ or final/"):
        resolve_model_dir(str(bc_ckpt))
    assert model_label(str(ckpt)) == "grpo_run/iter_000004"
    assert model_label(str(run / "best")) == "grpo_run/best"
    assert model_label("assets/tiny-ivt-bc") == "tiny-ivt-bc"


def test_evaluate_takes_a_checkpoint_folder_and_labels_the_row(tiny_model, tmp_path):
    from agents.evaluate import main

    ckpt = tmp_path / "grpo_run" / "checkpoints" / "iter_000004"
    shutil.copytree(tiny_model, ckpt / "policy")
    res = main(["--model", str(ckpt), "--limit", "1", "--steps", "0", "--max-new-tokens", "4", "--no-progress",
                "--strips", "0", "--out", str(tmp_path / "eval")])
    assert res["meta"]["policy"] == "grpo_run/iter_000004"
    assert "| grpo_run/iter_000004 |" in res["report"] and "| vlm |" not in res["report"]


def test_missing_model_folder_is_one_line_in_evaluate_and_benchmark(tmp_path):
    for cmd in ([sys.executable, "-m", "agents.evaluate", "--model", str(tmp_path / "nope" / "best")],
                [sys.executable, "benchmarks/rollout.py", "--model", str(tmp_path / "nope" / "best")]):
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                  "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
        err = out.stderr.strip().splitlines()
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert err and "no such model folder" in err[-1] and "Repo id" not in out.stderr


def test_config_file_layers_on_the_default_config_and_help_agrees(tmp_path, capsys):
    """Dataclass defaults (paper) < the command's default config (CPU) < --config FILE < flags; --help shows it."""
    from agents.common.config import load_yaml, parse_train_command
    from agents.grpo.config import GRPOConfig

    small = tmp_path / "small.yaml"
    small.write_text("iterations: 3\n")
    kw = dict(default_config="grpo_cpu.yaml", prog="p", usage="u", description="d")
    cpu = load_yaml(GRPOConfig, "grpo_cpu.yaml")
    cfg = parse_train_command(["train", "--config", str(small)], GRPOConfig, **kw)
    assert cfg.iterations == 3 and (cfg.lr, cfg.max_new_tokens) == (cpu.lr, cpu.max_new_tokens) == (1e-4, 48)
    assert parse_train_command(["train", "--config", str(small), "--lr", "3e-5"], GRPOConfig, **kw).lr == 3e-5
    with pytest.raises(SystemExit):
        parse_train_command(["train", "--config", str(small), "--help"], GRPOConfig, **kw)
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.0001)" in help_text and "(default: 48)" in help_text and "(default: 3)" in help_text
    assert "layered on the default config grpo_cpu.yaml" in help_text
    # `base: defaults`: the paper's dataclass defaults for what the file leaves out
    paper_based = tmp_path / "paper_based.yaml"
    paper_based.write_text("base: defaults\niterations: 3\n")
    cfg = parse_train_command(["train", "--config", str(paper_based)], GRPOConfig, **kw)
    assert (cfg.iterations, cfg.lr, cfg.max_new_tokens) == (3, GRPOConfig().lr, GRPOConfig().max_new_tokens)
    # the shipped paper configs say so themselves and keep their meaning
    paper = parse_train_command(["train", "--config", "grpo_paper.yaml"], GRPOConfig, **kw)
    assert paper == load_yaml(GRPOConfig, "grpo_paper.yaml") and paper.lr != cpu.lr
    # a nested field keeps its siblings from the base
    nested = tmp_path / "nested.yaml"
    nested.write_text("lora:\n  rank: 2\n")
    cfg = parse_train_command(["train", "--config", str(nested)], GRPOConfig, **kw)
    assert cfg.lora.rank == 2 and cfg.lora.alpha == cpu.lora.alpha
