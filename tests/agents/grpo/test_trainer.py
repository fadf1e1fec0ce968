"""GRPO learner end to end on the tiny VLM: one iteration trains only the LoRA weights; a killed run resumes exactly
like an uninterrupted one; the CLI lists every field and fails clearly without a start checkpoint."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents.grpo import trainer as grpo
from agents.common.checkpoint import latest_checkpoint, read_state
from agents.grpo.config import GRPOConfig
from agents.policies.vlm_setup import LoraSettings as LoraConfig
from agents.common.run_logging import read_scalars

ROOT = Path(__file__).resolve().parents[3]


def alternating_advantages(rewards, **_):
    """Test estimator (plugged in by import path): +1/-1 inside every group, so the policy-gradient term is never
    zero even when a random model earns no reward."""
    a = torch.ones_like(rewards)
    a[:, 1::2] = -1.0
    return a


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from agents.policies.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(str(out), seed=0)
    return str(out)


def _cfg(model, out, **kw):
    base = dict(init_from=model, out=str(out), iterations=1, max_refine_steps=1, group_size=2, prompts_per_iter=2,
                grad_accum=2, max_new_tokens=6, lr=1e-2, eval_every=0, save_every=1, image_every=0,
                progress=False, lora=LoraConfig(enabled=True, rank=4, alpha=8),
                advantage="tests.agents.grpo.test_trainer:alternating_advantages")
    base.update(kw)
    return GRPOConfig(**base)


def _model_state(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters()}


def test_one_iteration_changes_only_the_lora_weights(tiny_model, tmp_path, monkeypatch):
    from agents.grpo import setup as grpo_setup

    built = {}
    real_build = grpo_setup.build_policy

    def spy(cfg):
        built["policy"] = p = real_build(cfg)
        built["before"] = _model_state(p)
        return p

    monkeypatch.setattr(grpo, "build_policy", spy)
    summary = grpo.train(_cfg(tiny_model, tmp_path / "run", image_every=1, num_images=1))
    assert summary["iterations"] == 1
    policy, before = built["policy"], built["before"]
    after = _model_state(policy)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed and changed <= trainable  # LoRA weights moved, nothing else did
    assert any("lora_B" in n for n in changed)

    # logs: every named scalar, an image, the hparams table; a complete checkpoint
    tags = set().union(*[set(r) for r in read_scalars(tmp_path / "run")])
    for tag in ["rollout/reward_mean", "rollout/iou_step0", "rollout/iou_step1", "rollout/improve_rate",
                "rollout/stagnation_rate", "rollout/degradation_rate", "rollout/format_rate",
                "rollout/frac_zero_std_groups", "train/loss", "train/kl", "train/entropy", "train/grad_norm",
                "train/lr", "time/rollout_s", "time/update_s"]:
        assert tag in tags, tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run"))
    ea.Reload()
    assert ea.Tags()["images"] and "_hparams_/experiment" in ea.PluginTagToContent("hparams")
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "iter_000001" and read_state(ckpt)["iteration"] == 1
    assert (ckpt / "policy" / "adapter_config.json").is_file()


def _final(run):
    ckpt = latest_checkpoint(run)
    return (read_state(ckpt), torch.load(ckpt / "trainable.pt", weights_only=True),
            torch.load(ckpt / "optimizer.pt", weights_only=True))


def test_killed_run_resumes_like_an_uninterrupted_one(tiny_model, tmp_path, monkeypatch):
    kw = dict(iterations=3, eval_every=2, eval_limit=2, advantage="grpo", lr_schedule="cosine")
    grpo.train(_cfg(tiny_model, tmp_path / "full", **kw))

    calls = {"n": 0}
    real_update = grpo.policy_update

    def dies_in_third_update(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")  # the process dies mid-iteration 3, after checkpoint 2
        return real_update(*a, **k)

    monkeypatch.setattr(grpo, "policy_update", dies_in_third_update)
    with pytest.raises(KeyboardInterrupt):
        grpo.train(_cfg(tiny_model, tmp_path / "killed", **kw))
    assert latest_checkpoint(tmp_path / "killed").name == "iter_000002"
    monkeypatch.setattr(grpo, "policy_update", real_update)
    summary = grpo.train(_cfg(tiny_model, tmp_path / "killed", resume=True, **kw))
    assert summary["iterations"] == 3

    (s_full, p_full, o_full), (s_res, p_res, o_res) = _final(tmp_path / "full"), _final(tmp_path / "killed")
    assert s_full["iteration"] == s_res["iteration"] == 3
    assert s_full["evals"] == s_res["evals"]
    assert len(p_full) == len(p_res) and all(torch.equal(a, b) for a, b in zip(p_full, p_res))
    assert o_full["param_groups"] == o_res["param_groups"]
    for k, st in o_full["state"].items():
        assert st["step"] == o_res["state"][k]["step"] == 3
        assert torch.equal(st["exp_avg"], o_res["state"][k]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], o_res["state"][k]["exp_avg_sq"])
    # the resumed run's scalar log has each iteration once, as the uninterrupted one
    steps = lambda run: [r["step"] for r in read_scalars(run) if "train/loss" in r]  # noqa: E731
    assert steps(tmp_path / "killed") == steps(tmp_path / "full") == [1, 2, 3]


def test_best_is_the_best_trained_iteration_never_the_start(tiny_model, tmp_path, monkeypatch):
    """A run whose start scores best on validation still leaves a TRAINED policy in best/: the best of iterations
    1..3, here iteration 2 (the start is only the curves' baseline)."""
    import agents.evaluate as evaluate_module

    returns = iter([0.9, 0.2, 0.5, 0.4])  # validation return at iterations 0 (the start), 1, 2, 3

    def fake_evaluate(*args, **kwargs):
        r = next(returns)
        return {"return_mean": r, "miou": r, "acc@0.5": r, "iou_step": [r, r], "degradation_rate": 0.0,
                "improve_rate": 0.0}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    run = tmp_path / "run"
    summary = grpo.train(_cfg(tiny_model, run, iterations=3, eval_every=1, eval_limit=1, keep_last=3))
    assert [e["return_mean"] for e in read_state(run / "best")["evals"]] == [0.9, 0.2, 0.5]
    assert (summary["best_iteration"], summary["best_val_reward"]) == (2, 0.5)
    assert read_state(run / "best")["iteration"] == 2
    best = torch.load(run / "best" / "trainable.pt", weights_only=True)
    it2 = torch.load(run / "checkpoints" / "iter_000002" / "trainable.pt", weights_only=True)
    assert len(best) == len(it2) and all(torch.equal(a, b) for a, b in zip(best, it2))

    # a run checkpointed before this rule, whose best/ is its start: the next (trained) evaluation replaces it
    ckpt = run / "checkpoints" / "iter_000003" / "state.json"
    ckpt.write_text(json.dumps({**json.loads(ckpt.read_text()), "best_val_reward": 0.9, "best_iteration": 0}))
    returns = iter([0.1])
    summary = grpo.train(_cfg(tiny_model, run, iterations=4, eval_every=1, eval_limit=1, keep_last=3, resume=True))
    assert (summary["best_iteration"], summary["best_val_reward"]) == (4, 0.1)


def test_cli_help_lists_every_field():
    out = subprocess.run([sys.executable, "-m", "agents.grpo", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for f in dataclasses.fields(GRPOConfig):
        assert "--" + f.name.replace("_", "-") in text or "--" + f.name in text, f.name
    for f in dataclasses.fields(LoraConfig):
        assert "--lora." + f.name.replace("_", "-") in text or "--lora." + f.name in text, f.name


def test_missing_start_checkpoint_and_resume_errors(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="agents.bc"):
        grpo.train(GRPOConfig(init_from=str(tmp_path / "nope"), out=str(tmp_path / "r"), progress=False))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        grpo.train(GRPOConfig(init_from=tiny_model, out=str(tmp_path / "r2"), resume=True, progress=False))
    with pytest.raises(ValueError, match="clip_eps"):
        grpo.train(GRPOConfig(updates_per_iter=2))
    from agents.common.config import train_argv

    assert train_argv(["--resume", "--out", "x"], GRPOConfig, "grpo_cpu.yaml") == [
        "--config", "grpo_cpu.yaml", "--resume", "True", "--out", "x"]


# ------------------------------------------------------------------------ a bad record met at reset, mid-run
BAD_RECORD = {"index": None}


class _OneBadRecord:
    """The synthetic train split with one sample whose image cannot be read (what the loader could not catch)."""

    def __init__(self, inner, bad):
        self._inner, self._bad = inner, bad

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self):
        return len(self._inner)

    def __getitem__(self, i):
        s = self._inner[i]
        if i != self._bad:
            return s

        def broken():
            from ivt_env.datasets.base import DatasetError

            raise DatasetError(f"sample {s.sample_id}: cannot read image /data/broken.jpg: image file is truncated")

        return dataclasses.replace(s, load_image=broken)


def one_bad_record_env(split="train", **kw):
    from ivt_env.datasets import SyntheticDataset
    from ivt_env.env import GroundingRefineEnv

    ds = SyntheticDataset(split=split)
    if split == "train" and BAD_RECORD["index"] is not None:
        ds = _OneBadRecord(ds, BAD_RECORD["index"])
    kw.pop("data_root", None)
    return GroundingRefineEnv(ds, **kw)


def test_resume_extends_purges_tensorboard_and_skips_bad_records(tiny_model, tmp_path, monkeypatch, caplog):
    import logging
    import math

    import gymnasium as gym
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agents.common.seeding import derive_seed
    from agents.grpo.setup import sample_prompts

    if "IVTTest-OneBadRecord-v0" not in gym.registry:
        gym.register("IVTTest-OneBadRecord-v0", entry_point=one_bad_record_env)
    # the bad sample is one of iteration 3's prompts: met after the kill, by the resumed run
    monkeypatch.setitem(BAD_RECORD, "index", sample_prompts(4, 2, derive_seed(0, 0, 2, 1))[0])
    kw = dict(iterations=3, eval_every=2, eval_limit=2, advantage="grpo", lr_schedule="cosine", save_every=2,
              env_id="IVTTest-OneBadRecord-v0", train_limit=4)
    with caplog.at_level(logging.WARNING, logger="rollouts.collector"):
        grpo.train(_cfg(tiny_model, tmp_path / "full", **kw))
    assert "/data/broken.jpg" in caplog.text and f"skipped sample {BAD_RECORD['index']}" in caplog.text

    # killed while saving iteration 3's checkpoint: step 3's scalars and events are already written
    real_save = grpo._save

    def dies_saving_3(run_dir, cfg, policy, optimizer, scheduler, state, dist, directory=None):
        if directory is None and state["iteration"] == 3:
            (Path(run_dir) / "checkpoints" / ".iter_000003.tmp-killed").mkdir()
            raise KeyboardInterrupt("killed")
        return real_save(run_dir, cfg, policy, optimizer, scheduler, state, dist, directory)

    monkeypatch.setattr(grpo, "_save", dies_saving_3)
    with pytest.raises(KeyboardInterrupt):
        grpo.train(_cfg(tiny_model, tmp_path / "killed", **kw))
    assert latest_checkpoint(tmp_path / "killed").name == "iter_000002"
    monkeypatch.setattr(grpo, "_save", real_save)
    assert grpo.train(_cfg(tiny_model, tmp_path / "killed", resume=True, **kw))["iterations"] == 3
    assert not list((tmp_path / "killed" / "checkpoints").glob(".iter_*"))  # the interrupted save is gone

    # bit-identical to the uninterrupted run, the bad record skipped in both, each step logged once everywhere
    (s_full, p_full, o_full), (s_res, p_res, o_res) = _final(tmp_path / "full"), _final(tmp_path / "killed")
    assert s_full["evals"] == s_res["evals"]
    assert all(torch.equal(a, b) for a, b in zip(p_full, p_res))
    for run in ("full", "killed"):
        rows = read_scalars(tmp_path / run)
        assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
        assert [r["rollout/skipped_samples"] for r in rows if "rollout/skipped_samples" in r][2] == 1.0
        ea = EventAccumulator(str(tmp_path / run))
        ea.Reload()
        assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3]  # TensorBoard purged the killed run's 3
        assert [e.step for e in ea.Scalars("eval/return_mean")] == [0, 2, 3]
        assert [e.value for e in ea.Scalars("rollout/skipped_samples")][2] == 1.0

    # extending the finished run: the schedule is rebuilt for 4 iterations, the new iteration does not train at 0
    grpo.train(_cfg(tiny_model, tmp_path / "full", **{**kw, "iterations": 4, "resume": True}))
    lrs = {r["step"]: r["train/lr"] for r in read_scalars(tmp_path / "full") if "train/lr" in r}
    assert lrs[3] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))  # the 3-iteration schedule
    assert lrs[4] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 3 / 4))) and lrs[4] > 1e-3


def test_used_out_folder_is_refused_or_overwritten(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "scalars.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n')  # a run killed before its checkpoint
    (out / "mine.txt").write_text("not a run file")
    with pytest.raises(FileExistsError, match=r"logs of an earlier run \(scalars.jsonl\): pass --resume .* "
                                              r"--overwrite"):
        grpo.train(_cfg(tiny_model, out))
    rc = grpo.main(["train", "--init-from", tiny_model, "--out", str(out), "--iterations", "1"])
    assert rc == 2
    grpo.train(_cfg(tiny_model, out, overwrite=True))
    rows = read_scalars(out)
    assert [r["step"] for r in rows if "train/loss" in r] == [1] and all(r.get("train/loss") != 9.0 for r in rows)
    assert (out / "mine.txt").read_text() == "not a run file"
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        grpo.train(_cfg(tiny_model, out))
    with pytest.raises(ValueError, match="not both"):
        grpo.train(_cfg(tiny_model, out, overwrite=True, resume=True))


def test_branching_groups_with_per_step_advantages(tiny_model, tmp_path, monkeypatch):
    """branch_size 2: siblings share their step-0 tokens; the update receives per-step advantages (B, T + 1);
    val_size sets the validation split's size."""
    seen = {}
    real_update = grpo.policy_update

    def spy(policy, optimizer, batch, adv, **kw):
        seen["batch"], seen["adv"], seen["guide"] = batch, adv, kw["guide"]
        return real_update(policy, optimizer, batch, adv, **kw)

    monkeypatch.setattr(grpo, "policy_update", spy)
    cfg = _cfg(tiny_model, tmp_path / "run", group_size=4, branch_size=2, step_advantage="progressive",
               eval_every=1, eval_limit=3, val_size=3, guide_coef=0.5, guide_states="all")
    summary = grpo.train(cfg)
    assert summary["iterations"] == 1 and summary["last_eval"] is not None
    batch, adv = seen["batch"], seen["adv"]
    assert tuple(adv.shape) == (8, 2)
    # teacher guidance: one target per distinct refinement state (T = 1: siblings share theirs), loss logged
    assert len(seen["guide"]) == 4 and all(len(g.steps) == 2 for g in seen["guide"])
    assert any("train/guide_loss" in r and r["train/guide_loss"] > 0 for r in read_scalars(tmp_path / "run"))
    for k in range(0, 8, 2):
        assert batch[k].steps[0].token_ids == batch[k + 1].steps[0].token_ids
        assert batch[k].group_id == batch[k + 1].group_id
    with pytest.raises(ValueError, match="branch_size"):
        _cfg(tiny_model, tmp_path / "x", group_size=4, branch_size=3).validate()


def test_rollout_batch_all_trajectories_in_one_batch(tiny_model, tmp_path, monkeypatch):
    """rollout_batch -1 (the CPU default): prompts x N env slots, one engine batch per iteration; 0: the older
    min(prompts x N, 4 N); a branching group must fit in a batch."""
    assert GRPOConfig(prompts_per_iter=8, group_size=6, rollout_batch=0).rollout_slots() == 24
    assert GRPOConfig(prompts_per_iter=8, group_size=6, rollout_batch=-1).rollout_slots() == 48
    assert GRPOConfig(prompts_per_iter=8, group_size=6, rollout_batch=30).rollout_slots() == 30
    GRPOConfig(group_size=7, branch_size=7, rollout_batch=-1).validate()  # 8 x 7 slots: groups never split
    with pytest.raises(ValueError, match="rollout_batch"):
        GRPOConfig(rollout_batch=-2).validate()
    slots = []
    real = grpo.Collector

    def spy(envs, num_envs=None, **kw):
        slots.append(num_envs if num_envs is not None else len(envs))
        return real(envs, num_envs=num_envs, **kw)

    monkeypatch.setattr(grpo, "Collector", spy)
    cfg = _cfg(tiny_model, tmp_path / "run", group_size=2, prompts_per_iter=3, rollout_batch=-1, eval_every=1,
               eval_limit=2, val_size=2)
    assert grpo.train(cfg)["iterations"] == 1
    assert slots == [6, 2]  # training: 3 prompts x 2 in one batch; validation: eval_limit envs


def test_a_trained_stop_token_policy_is_refused_in_a_stopping_env(tiny_model, tmp_path):
    """GRPO does not score a stop-token decision's go-on choices (injected tokens): refused, with the BC config to use."""
    import shutil

    from agents.grpo.setup import build_policy

    model = tmp_path / "stop_model"
    shutil.copytree(tiny_model, model)
    (model / "prompts.yaml").write_text((ROOT / "configs" / "prompts_tiny_stop.yaml").read_text())
    with pytest.raises(ValueError, match="GRPO config: .*stop_token '<\\|box_end\\|>'.*bc_adaptive_token_cpu.yaml"):
        build_policy(_cfg(str(model), tmp_path / "run", env_id="IVT-Synthetic-Adaptive-v0"))
    with pytest.raises(ValueError, match="GRPO config: .*allows stopping"):
        build_policy(_cfg(str(model), tmp_path / "run3", env_kwargs='{"allow_stop": true}'))
    assert build_policy(_cfg(str(model), tmp_path / "run2")).layout.prompts.stop_token == "<|box_end|>"  # fixed T


def test_env_kwargs_reach_the_env_and_bad_ones_are_named():
    from agents.grpo.setup import env_factory

    cfg = GRPOConfig(env_kwargs='{"allow_stop": true, "step_cost": 0.02, "stop_marker": "fits.", '
                                '"dataset_kwargs": {"split_sizes": {"train": 7}}}')
    cfg.validate()
    env = env_factory(cfg, "train")()
    assert (env.unwrapped.allow_stop, env.unwrapped.step_cost, env.unwrapped.stop_marker) == (True, 0.02, "fits.")
    assert len(env.unwrapped.dataset) == 7
    val = env_factory(cfg, "val", size=5)()  # the split size of the validation env joins the given dataset_kwargs
    assert len(val.unwrapped.dataset) == 5 and val.unwrapped.allow_stop
    for bad, msg in [("[1]", "must be a JSON object"), ("{allow", "is not JSON"),
                     ('{"max_refine_steps": 3}', "set by the option 'max_refine_steps'")]:
        with pytest.raises(ValueError, match=f"GRPO config: env_kwargs .*{msg}|GRPO config: env_kwargs {msg}"):
            GRPOConfig(env_kwargs=bad).validate()
