"""Behaviour cloning: the training sequence is the inference layout, a tiny run learns, a killed run resumes."""

import json
import math
from pathlib import Path

import pytest
import torch

from agents.bc import bc_scheduler, build_data, build_policy, main, train
from agents.bc.config import BCConfig
from agents.common.config import load_yaml
from agents.policies.base import SamplingParams
from rollouts.collector import collect_groups
from rollouts.storage import save_trajectories
from agents.synthesis import SynthesizeConfig, make_env, run

IGNORE = -100


def test_cpu_default_recipe_options_train(tmp_path):
    """The CPU default's options together (one-object warm-up, grounding phase, trajectories with a masked scripted
    step 0 and held fitting boxes, Gaussian number targets): the run completes and every phase trains."""
    from agents.policies.vlm import VLMPolicy

    cfg = _cfg(tmp_path / "run", batch_size=4, max_steps=6, localize_steps=2, grounding_only_steps=4,
               grounding_mix=0.5, number_sigma=20.0, clone_start=False, number_init="sinusoidal",
               synth=_synth(iou_max=1.0, keep_fitting=True))
    assert train(cfg)["steps"] == 6
    base = VLMPolicy.from_pretrained(str(tmp_path / "run" / "base"))
    final = VLMPolicy.from_pretrained(str(tmp_path / "run" / "final"))
    p0 = dict(base.hf_model.named_parameters())
    assert sum(not torch.equal(p, p0[n]) for n, p in final.hf_model.named_parameters()) > 0.9 * len(p0)
    rec = [json.loads(x) for x in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    tokens = [r["train/tokens"] for r in rec if "train/tokens" in r]
    per_step = [b - a for a, b in zip([0.0] + tokens, tokens)]
    # single-step samples: about 19 answer tokens each; steps 5-6 hold two 3-step trajectories whose step 0 is
    # masked, i.e. two refinement answers each instead of three
    assert all(60 <= n <= 90 for n in per_step[:4]) and all(n > per_step[0] for n in per_step[4:])


def _synth(**kw):
    base = dict(env="IVT-Synthetic-v0", steps=2, student="scripted", verbosity=0, batch_size=8, progress=False)
    base.update(kw)
    return SynthesizeConfig(**base)


def _cfg(out, **kw):
    base = dict(init_from="tiny", full_finetune=True, threads=1, data="online", synth=_synth(), lr=1e-3,
                batch_size=4, grad_accum=1, max_steps=2, warmup_ratio=0.0, eval_at_start=False, eval_limit=2,
                eval_batch=2, eval_max_new_tokens=4, progress=False, out=str(out), log_every=1)
    base.update(kw)
    return BCConfig(**base)


def _infer_injected(policy, traj):
    """The ids the policy injects at inference when it sees the trajectory's observations step by step."""
    outs = []
    for t, st in enumerate(traj.steps):
        prev = traj.steps[t - 1].box_norm if t else [0.0] * 4
        obs = {"image": st.observation, "expression": traj.expression, "step": t, "prev_box": prev,
               "prev_valid": int(t > 0)}
        outs.append(policy.act([obs], [list(outs)], [{}], SamplingParams(greedy=True, max_new_tokens=3))[0])
    return [o.injected_ids for o in outs]


def test_training_sequence_matches_inference_layout(tmp_path):
    cfg = _cfg(tmp_path / "run")
    policy = build_policy(cfg, tmp_path / "run")
    tok = policy.tokenizer

    # (1) a teacher trajectory (texts only) from BC's online data path
    traj = build_data(cfg).batch(0)[0]
    assert traj.steps[0].token_ids is None and len(traj.steps) == 3
    enc = policy.encode_trajectory(traj)
    injected = _infer_injected(policy, traj)
    ids, labels = [], []
    for st, inj in zip(traj.steps, injected):
        gen = tok(st.text, add_special_tokens=False)["input_ids"]  # the text as the model must write it
        assert tok.decode(gen) == st.text
        ids += inj + gen
        labels += [IGNORE] * len(inj) + gen
    assert enc.input_ids.tolist() == ids
    assert enc.labels.tolist() == labels  # every injected token masked, every generated one kept
    assert enc.n_generated == sum(len(tok(st.text, add_special_tokens=False)["input_ids"]) for st in traj.steps)
    assert int(enc.mm_token_type_ids.sum()) == sum(i.count(policy.layout.image_token_id) for i in injected)

    # (2) an inference trajectory (token ids kept), saved to a folder and read back by BC's folder data path:
    # token-in / token-out, the sequence is exactly injected + generated ids of each step
    env_fn = lambda: make_env(cfg.synth, 2)
    inf = collect_groups(env_fn, policy, [3], 1, SamplingParams(greedy=True, max_new_tokens=6), seed=0,
                         keep_observations=True)
    folder = tmp_path / "inference"
    save_trajectories(folder / "trajectories.jsonl", inf, image_dir=folder / "images")
    back = build_data(_cfg(tmp_path / "run2", data=str(folder), batch_size=1, max_steps=1)).batch(0)[0]
    enc = policy.encode_trajectory(back)
    ids = [i for st in inf[0].steps for i in st.injected_ids + st.token_ids]
    labels = [x for st in inf[0].steps for x in [IGNORE] * len(st.injected_ids) + st.token_ids]
    assert enc.input_ids.tolist() == ids and enc.labels.tolist() == labels


def _loss(policy, batch):
    with torch.no_grad():
        return float(policy.bc_loss(batch)[0])


def test_tiny_run_lowers_the_loss_and_changes_parameters(tmp_path):
    from agents.policies.vlm import VLMPolicy

    cfg = _cfg(tmp_path / "run", batch_size=8, max_steps=25)
    summary = train(cfg)
    assert summary["steps"] == 25
    base = VLMPolicy.from_pretrained(str(tmp_path / "run" / "base"))
    final = VLMPolicy.from_pretrained(str(tmp_path / "run" / "final"))
    fixed = build_data(cfg).batch(0)  # the same trajectories for both
    before, after = _loss(base, fixed), _loss(final, fixed)
    assert after < 0.75 * before, (before, after)  # 7.4 -> about 4.7 after 25 steps
    p0 = dict(base.hf_model.named_parameters())
    changed = [n for n, p in final.hf_model.named_parameters() if not torch.equal(p, p0[n])]
    assert len(changed) > 0.9 * len(p0)
    rec = [json.loads(x) for x in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rec if "train/loss" in r]
    assert len(losses) == 25 and sum(losses[-5:]) < sum(losses[:5])
    assert any("eval/acc@0.5" in r for r in rec) and any("train/lr" in r for r in rec)
    assert (tmp_path / "run" / "best" / "eval.json").is_file()


def test_best_is_a_trained_step_never_the_start(tmp_path):
    """A fine-tune whose start validates best still keeps its best TRAINED step in best/ (here step 20)."""
    from agents.bc.trainer import _evaluate

    class Policy:
        def save(self, directory):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "weights").write_text(self.weights)

    policy, state, scores = Policy(), {"best": None, "best_step": None, "evals": []}, {0: 0.9, 10: 0.2, 20: 0.5, 30: 0.4}
    for step, score in scores.items():
        policy.weights = f"after step {step}"
        _evaluate(_cfg(tmp_path), policy, lambda p, log, s: {"acc@0.5": scores[s]}, None, state, tmp_path, step=step)
    assert (state["best"], state["best_step"]) == (0.5, 20)
    assert (tmp_path / "best" / "weights").read_text() == "after step 20"
    assert json.loads((tmp_path / "best" / "eval.json").read_text())["step"] == 20


def test_resume_rechooses_best_when_the_checkpoint_kept_the_start(tmp_path):
    """A checkpoint written before best/ excluded the start (best_step 0) is resumed with no best: the next
    evaluation after resuming picks a trained step, although the start's recorded score (2.0) beats any accuracy."""
    from agents.common.checkpoint import STATE_FILE, latest_checkpoint

    common = dict(max_steps=4, eval_every=2, eval_at_start=True, warmup_ratio=0.0)
    train(_cfg(tmp_path / "run", stop_after=2, **common))
    state_file = latest_checkpoint(tmp_path / "run") / STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["step"] == 2 and state["best_step"] == 2
    state.update(best=2.0, best_step=0)  # as an older run recorded it: the start kept as best/
    state_file.write_text(json.dumps(state))
    resumed = train(_cfg(tmp_path / "run", resume=True, **common))
    assert resumed["steps"] == 4 and resumed["best_step"] == 4
    assert json.loads((tmp_path / "run" / "best" / "eval.json").read_text())["step"] == 4


def test_killed_run_resumes_where_it_stopped(tmp_path):
    data = tmp_path / "teacher"
    run(_synth(limit=16, out=str(data), chunk_size=8))
    common = dict(data=str(data), batch_size=4, grad_accum=2, epochs=2, max_steps=0, warmup_ratio=0.25)
    # uninterrupted: 16 trajectories / (4 x 2) = 2 steps per epoch, 2 epochs, evaluation once per epoch
    full = train(_cfg(tmp_path / "full", **common))
    assert full["total_steps"] == 4 and [e["step"] for e in (full["first_eval"], full["last_eval"])] == [2, 4]
    # killed after 2 steps, then resumed
    part = train(_cfg(tmp_path / "part", stop_after=2, **common))
    assert part["steps"] == 2 and not (tmp_path / "part" / "final").exists()
    resumed = train(_cfg(tmp_path / "part", resume=True, **common))
    assert resumed["steps"] == 4
    a = torch.load(tmp_path / "full" / "checkpoints" / "iter_000004" / "trainable.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "iter_000004" / "trainable.pt", weights_only=True)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "scalars.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == [1, 2, 3, 4]  # each step logged once
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(tmp_path / "part", **common))


def test_schedule_warmup_then_cosine():
    cfg = BCConfig(lr=1.0, warmup_ratio=0.1, lr_schedule="cosine", min_lr_ratio=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = bc_scheduler(opt, 20, cfg)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0]  # warm-up over 2 steps
    assert lrs[2] == pytest.approx(1.0) and lrs[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 17 / 18)))


def test_configs_and_cli(capsys):
    for name in ("bc_cpu.yaml", "bc_paper.yaml"):
        load_yaml(BCConfig, name).validate()
    paper = load_yaml(BCConfig, "bc_paper.yaml")
    assert (paper.lora.rank, paper.lora.alpha, paper.lr, paper.batch_size, paper.grad_accum, paper.epochs,
            paper.warmup_ratio, paper.lr_schedule) == (64, 128, 2e-5, 4, 4, 10, 0.1, "cosine")
    assert main([]) == 2 and main(["fit"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--full-finetune" in out and "--resume" in out and "--synth.iou-max" in out
    with pytest.raises(ValueError, match="max_steps"):
        BCConfig(data="online", max_steps=0).validate()


def test_online_data_grounding_mix_and_determinism(tmp_path):
    cfg = _cfg(tmp_path, batch_size=4, grad_accum=2, grounding_mix=0.5, grounding_only_steps=1, max_steps=3)
    data = build_data(cfg)
    # micro-batches 0, 1 (= optimizer step 0) are single-step grounding samples answered with the GT box
    for k in (0, 1):
        batch = data.batch(k)
        assert [len(t.steps) for t in batch] == [1, 1, 1, 1]
        for t in batch:
            assert t.steps[0].iou > 0.97 and t.steps[0].text.startswith("<think>Target at ")
    mixed = data.batch(2)
    assert [len(t.steps) for t in mixed] == [1, 1, 3, 3]
    assert all(t.meta["start_iou"] <= 0.85 for t in mixed[2:])  # the IoU filter of the teacher trajectories
    again = build_data(cfg).batch(2)  # a fresh loader (a resumed run) draws the same batch
    assert [t.sample_id for t in again] == [t.sample_id for t in mixed]
    assert [s.text for t in again for s in t.steps] == [s.text for t in mixed for s in t.steps]


def test_online_data_localize_warmup(tmp_path):
    """The first localize_steps draw single-step samples of one-object scenes, then the usual 2-4 objects."""
    cfg = _cfg(tmp_path, batch_size=4, grad_accum=1, grounding_mix=0.5, grounding_only_steps=2, localize_steps=1,
               max_steps=3)
    data = build_data(cfg)
    first, second = data.batch(0), data.batch(1)
    assert [len(t.steps) for t in first + second] == [1] * 8
    assert all(len(data.localize.dataset[int(t.meta["index"])].meta["objects"]) == 1 for t in first)
    assert all(t.steps[0].iou > 0.97 for t in first)
    n_objects = [len(data.syn.dataset[int(t.meta["index"])].meta["objects"]) for t in second]
    assert min(n_objects) >= 2  # the grounding phase's scenes are the configured 2-4 objects
    with pytest.raises(ValueError, match="localize_steps"):
        BCConfig(data=str(tmp_path), localize_steps=1).validate()


def test_optimizer_is_fused_adamw_with_the_loop_update():
    from agents.bc.setup import bc_optimizer

    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(7)]
    fused_p = [torch.nn.Parameter(t.clone()) for t in init]
    loop_p = [torch.nn.Parameter(t.clone()) for t in init]
    cfg = BCConfig(lr=1e-2, weight_decay=0.1)
    fused = bc_optimizer(fused_p, cfg)
    loop = torch.optim.AdamW(loop_p, lr=1e-2, weight_decay=0.1, foreach=False)  # the per-tensor reference
    assert fused.defaults["fused"] is True
    for _ in range(5):
        grads = [torch.randn_like(t) for t in init]
        for ps, opt in ((fused_p, fused), (loop_p, loop)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b, start in zip(fused_p, loop_p, init):
        assert torch.allclose(a, b, atol=1e-6) and not torch.equal(a.detach(), start)  # moved, and as the loop moved
    on_meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]  # no fused kernel there: the default AdamW
    assert bc_optimizer(on_meta, cfg).defaults["fused"] is None


def test_schedule_stable_phase_before_decay():
    cfg = BCConfig(lr=1.0, warmup_ratio=0.1, lr_schedule="linear", lr_decay_start=0.5, min_lr_ratio=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = bc_scheduler(opt, 10, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(round(opt.param_groups[0]["lr"], 6))
        opt.step()
        sched.step()
    # warm-up 1 step, stable until step 5, then linear from 1 to 0.2 over steps 5..10
    assert lrs == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.84, 0.68, 0.52, 0.36]


def test_sinusoidal_number_embeddings(tmp_path):
    import numpy as np
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from agents.bc.setup import init_number_embeddings
    from agents.policies.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "tiny")
    assert init_number_embeddings(path) == 1001
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    emb = model.get_input_embeddings().weight.detach()
    row = lambda n: emb[tok.convert_tokens_to_ids(str(n))]  # noqa: E731
    # cosine similarity of numbers m, n = mean_k cos(w_k (m - n)), periods geometric from 2000 down to 16
    w = 2 * np.pi / np.geomspace(2000.0, 16.0, emb.shape[1] // 2)
    for m, n in ((500, 500), (500, 505), (500, 530), (100, 900)):
        cos = float(torch.nn.functional.cosine_similarity(row(m), row(n), dim=0))
        assert cos == pytest.approx(float(np.cos(w * (m - n)).mean()), abs=1e-5)
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)  # tied: the output side too


def test_base_model_appears_only_with_its_number_embeddings(tmp_path, monkeypatch):
    """A kill between building the tiny base model and writing its number embeddings leaves no base/, so the next
    run builds and initialises it again instead of silently training from random number embeddings."""
    from agents.bc import setup as bc_setup
    from agents.policies.tiny import build_tiny_model

    cfg = _cfg(tmp_path / "run", number_init="sinusoidal")
    real = bc_setup.init_number_embeddings

    def killed(model_dir):
        raise KeyboardInterrupt("killed while writing the number embeddings")

    monkeypatch.setattr(bc_setup, "init_number_embeddings", killed)
    with pytest.raises(KeyboardInterrupt):
        build_policy(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "base").exists() and not list((tmp_path / "run").glob(".base.*"))
    monkeypatch.setattr(bc_setup, "init_number_embeddings", real)
    policy = build_policy(cfg, tmp_path / "run")
    # the same weights as a fresh tiny model given sinusoidal number embeddings by hand
    ref = build_tiny_model(tmp_path / "ref", seed=cfg.tiny_seed)
    real(ref)
    from agents.policies.vlm import VLMPolicy

    want = dict(VLMPolicy.from_pretrained(str(ref)).hf_model.named_parameters())
    got = dict(VLMPolicy.from_pretrained(str(tmp_path / "run" / "base")).hf_model.named_parameters())
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert policy is not None


def test_resume_without_checkpoint_and_used_out_give_one_line(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "empty"), "--resume", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no checkpoint under" in err and "Traceback" not in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "scalars.jsonl").write_text('{"step": 1}\n')
    rc = main(["train", "--out", str(tmp_path / "used"), "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--overwrite" in err and len(err.splitlines()) == 1


def test_teacher_data_folder_works_with_the_default_config(tmp_path, capsys):
    """`agents.bc train --data DIR` with the default (CPU) config: its online-only phases are switched off with a
    note instead of failing validation."""
    data = tmp_path / "teacher"
    run(_synth(limit=8, out=str(data), chunk_size=8))
    capsys.readouterr()
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--threads", "1", "--max-steps", "1",
               "--batch-size", "4", "--eval-at-start", "False", "--eval-limit", "1", "--eval-batch", "1",
               "--eval-max-new-tokens", "4", "--progress", "False"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "online-only options {'grounding_mix': 0.5, 'grounding_only_steps': 4800, 'localize_steps': 800}" in err
    assert (tmp_path / "run" / "checkpoints" / "iter_000001").is_dir()


def test_resume_after_a_kill_logs_each_step_once_in_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agents.bc import trainer as bc_module

    real = bc_module.save_checkpoint

    def dies_at_3(directory, **kw):
        if kw["state"]["step"] == 3:  # step 3 is logged (and evaluated), its checkpoint never lands
            raise KeyboardInterrupt("killed")
        return real(directory, **kw)

    cfg = dict(max_steps=3, save_every=2, eval_every=2)
    monkeypatch.setattr(bc_module, "save_checkpoint", dies_at_3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "run", **cfg))
    monkeypatch.setattr(bc_module, "save_checkpoint", real)
    assert train(_cfg(tmp_path / "run", resume=True, **cfg))["steps"] == 3
    ea = EventAccumulator(str(tmp_path / "run"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in ea.Scalars("eval/acc@0.5")] == [2, 3]
    rows = [json.loads(x) for x in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]


def test_eval_limit_above_the_split_size_says_so(tmp_path, capsys):
    cfg = _cfg(tmp_path / "run", max_steps=1, eval_limit=50,
               synth=_synth(dataset_kwargs={"split_sizes": {"train": 100, "val": 3}}))
    summary = train(cfg)
    assert summary["last_eval"]["n"] == 3
    assert "eval_limit 50: split 'val' has 3 samples, all evaluated" in capsys.readouterr().err
