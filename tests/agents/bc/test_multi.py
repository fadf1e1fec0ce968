"""Behaviour cloning and GRPO end to end on IVT-SyntheticMulti-v0 with the tiny model (a few steps each): the
multi-box teacher data, the list answers and HIoU evaluation run through both learners."""

import dataclasses

from agents.bc.config import BCConfig
from agents.bc.setup import build_data
from agents.bc.trainer import train
from agents.synthesis.synthesizer import SynthesizeConfig
from ivt_env.multibox import parse_boxes


def _cfg(out, **kw):
    synth = SynthesizeConfig(env="IVT-SyntheticMulti-v0", split="train", steps=1, iou_max=1.0, keep_fitting=True,
                             batch_size=4, progress=False)
    base = dict(init_from="tiny", full_finetune=True, threads=1, data="online", synth=synth, lr=1e-3,
                batch_size=4, grad_accum=1, max_steps=3, warmup_ratio=0.0, eval_at_start=False, eval_limit=2,
                eval_batch=2, eval_max_new_tokens=8, progress=False, out=str(out), log_every=1,
                prompts="prompts_tiny_multi.yaml", grounding_only_steps=1, grounding_mix=0.5, clone_start=False)
    base.update(kw)
    return BCConfig(**base)


def test_bc_multi_data_and_tiny_run(tmp_path):
    cfg = _cfg(tmp_path / "run")
    data = build_data(cfg)
    first, later = data.batch(0), data.batch(1)
    assert all(len(t.steps) == 1 for t in first)  # grounding phase: the prompt answered with every GT box
    for t in first:
        assert [list(b) for b in parse_boxes(t.steps[0].text).boxes] == t.steps[0].boxes_norm
        assert len(t.steps[0].boxes_norm) == len(t.meta["gt_boxes"])
    assert any(len(t.steps) == 2 for t in later)  # then multi-box teacher trajectories
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["last_eval"]["n"] == 2


def test_grpo_multi_one_iteration(tmp_path):
    from agents.grpo import trainer as grpo
    from agents.grpo.config import GRPOConfig
    from agents.policies.tiny import build_tiny_model
    from agents.policies.vlm_setup import LoraSettings

    model = tmp_path / "tiny"
    build_tiny_model(str(model), seed=0)
    cfg = GRPOConfig(init_from=str(model), out=str(tmp_path / "grpo"), env_id="IVT-SyntheticMulti-v0", reward="hiou",
                     iterations=1, max_refine_steps=1, group_size=2, prompts_per_iter=2, grad_accum=2,
                     max_new_tokens=6, lr=1e-2, eval_every=0, save_every=1, image_every=0, progress=False,
                     lora=LoraSettings(enabled=True, rank=4, alpha=8),
                     advantage="tests.agents.grpo.test_trainer:alternating_advantages")
    summary = grpo.train(cfg)
    assert summary["iterations"] == 1
