"""The synthesis pipeline's settings and engine (IVT Sec. 3.2): start boxes, IoU filter, interpolated box
trajectories and per-step reasoning, played through the env. ``python -m agents.synthesis`` (the CLI, output
folder and resume) and on-the-fly behaviour cloning (``agents.bc.data.OnlineData``) both drive :class:`Synthesizer`.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ivt_env.boxes import format_box, hiou, iou, to_norm, to_pixels
from ivt_env.multibox import format_boxes
from agents.teacher.starts import (
    PerturbConfig,
    ScriptedStudentConfig,
    perturbed_gt_box,
    scripted_student_box,
)
from agents.teacher.geometric import hold_fitting_boxes, interpolate_boxes, stop_plan
from agents.teacher.multi import gt_boxes_norm, interpolate_box_sets, is_multi_sample, is_nested, multi_student_boxes
from rollouts.types import Trajectory

STAGES = ("kept", "invalid_start", "iou_below_min", "iou_above_max")


@dataclass
class SynthesizeConfig:
    """Settings of ``python -m agents.synthesis`` (defaults: IVT Sec. 3.2 with the offline CPU stand-ins)."""

    env: str = "IVT-Synthetic-v0"
    """Registered env id whose dataset supplies the samples (IVT-Synthetic-v0, IVT-Mix-v0, ...)."""
    split: str = "train"
    """Dataset split to synthesize from."""
    limit: int = 0
    """Use the first N samples of the split (0: all)."""
    data_root: Optional[str] = None
    """Root folder of real datasets (default: the IVT_DATA environment variable)."""
    dataset_kwargs: dict = field(default_factory=dict)
    """Extra dataset arguments, e.g. {num_samples: 50000} for a larger synthetic train split."""
    steps: int = 2
    """T, the number of refinement steps (trajectories have T+1 boxes)."""
    start: str = "student"
    """Where trajectories start: 'student' (the student's step-0 answer, IVT), 'perturbed' (random GT
    perturbation, the paper's ablation) or 'gt' (the GT itself: with steps=0, plain single-step grounding
    samples; needs iou_max=1)."""
    student: str = "scripted"
    """The student: 'scripted' (offline stand-in, see module doc) or a policy name / import path (vlm, oracle,
    pkg.module:Class) answering each sample once at step 0 through the env."""
    student_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the student policy, e.g. {model: Qwen/Qwen3-VL-4B-Instruct} for 'vlm'."""
    student_greedy: bool = True
    """Greedy decoding for the student's single pass (False: sample at the policy's step-0 temperature)."""
    scripted: ScriptedStudentConfig = field(default_factory=ScriptedStudentConfig)
    """Error model of the scripted student."""
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    """GT perturbation of start=perturbed."""
    iou_min: float = 0.0
    """Keep samples whose start IoU is at least this (IVT: 0)."""
    iou_max: float = 0.85
    """... and at most this (IVT: 0.85; near-perfect starts leave nothing to correct)."""
    keep_fitting: bool = False
    """Once a box fits (IoU >= 0.85: the geometric teacher writes "Box fits. Keep it."), later steps keep it
    unchanged instead of moving on to the exact GT (agents.teacher.geometric.hold_fitting_boxes). IVT interpolates all
    the way; its filter iou_max 0.85 drops fitting starts anyway. Useful with iou_max > 0.85 for a student that
    should learn to leave a good box alone."""
    keep_iou: float = 0.85
    """With keep_fitting: the IoU from which a box counts as good enough and later steps keep it (the geometric
    teacher's FIT_IOU, 0.85; the kept steps say "Box fits. Keep it." whatever the threshold). Lower values keep
    near-fits a small model cannot tell from fits at its image resolution, instead of nudging them by a few units."""
    keep_marker: str = ""
    """With keep_fitting: a step that keeps a fitting box writes the env's keep action, the reasoning ending with
    this marker and no box (``"Keep it."``: ``<think>Box fits. Keep it.</think>``; the env carries the previous box
    exactly), instead of writing the same box again ('' : the paper's format). A tiny model cannot copy four
    numbers exactly (issue 17), so keeping by words is what lets it leave a good box alone."""
    stop: bool = False
    """Adaptive refinement: trajectories stop at the first box that fits the GT (IoU >= stop_iou; the teacher says
    why and writes stop_marker before the box), in an env with allow_stop, so they have 1..T+1 steps."""
    stop_iou: float = 0.85
    """stop=true: the IoU at which a box fits and the teacher stops (the geometric teacher's FIT_IOU)."""
    stop_marker: str = "<stop>"
    """stop=true: the env's stop marker."""
    teacher: str = "geometric"
    """Reasoning source: 'geometric' (offline, from the boxes) or 'vlm' (a teacher VLM sees each step's image)."""
    teacher_model: str = ""
    """teacher=vlm: model name or path loadable by the VLM policy."""
    teacher_prompts: str = "teacher_prompts.yaml"
    """teacher=vlm: YAML file of the teacher's prompts (looked up in configs/ too)."""
    teacher_max_new_tokens: int = 96
    """teacher=vlm: generation budget of one reasoning text."""
    verbosity: int = 0
    """Geometric teacher length: 0 terse phrases, 1 two short sentences, 2 with the expression named."""
    seed: int = 0
    """Seed of the scripted student, the perturbations and the student's sampling."""
    batch_size: int = 32
    """Episodes the collector runs in lock-step (batched policy calls)."""
    chunk_size: int = 512
    """Samples per shard (the unit of resume)."""
    save_images: bool = True
    """Write each step's observation as PNG under images/ (the inspectable dataset; BC reads them)."""
    overwrite: bool = False
    """Delete an existing output folder's shards and start over instead of resuming."""
    out: str = "data/teacher/synthetic-T2"
    """Output folder."""
    progress: bool = True
    """Show a progress bar."""


# ------------------------------------------------------------------------------------------------ environment
def dataset_kwargs(cfg: SynthesizeConfig) -> dict:
    """``cfg.dataset_kwargs`` with command-line strings read as YAML values ("50000" -> 50000, "{train: 9}" -> dict)."""
    import yaml

    return {k: (yaml.safe_load(v) if isinstance(v, str) else v) for k, v in dict(cfg.dataset_kwargs or {}).items()}


def load_env_dataset(cfg: SynthesizeConfig) -> Any:
    """The dataset behind ``cfg.env`` for ``cfg.split`` (built once; every env of a run shares it)."""
    from ivt_env.make import load_env_dataset as load

    return load(cfg.env, cfg.split, cfg.data_root, dataset_kwargs(cfg))


def make_env(cfg: SynthesizeConfig, steps: int, dataset: Any = None):
    """The configured env with ``steps`` refinement steps; ``dataset`` (an object) is shared when given."""
    from ivt_env.make import make_env as env_thunk

    stop = {"allow_stop": True, "stop_marker": cfg.stop_marker} if cfg.stop else {}
    return env_thunk(cfg.env, split=cfg.split, max_refine_steps=steps, data_root=cfg.data_root, dataset=dataset,
                     dataset_kwargs=None if dataset is not None else dataset_kwargs(cfg), disable_env_checker=True,
                     **stop)()


def _rng_for(seed: int, sample_id: str) -> random.Random:
    # per-sample streams: the result of a sample never depends on chunking, batch order or resume
    return random.Random(f"{seed}/{sample_id}")


class _OneBox:
    """A view of a sample with one of its GT boxes as ``gt_box`` (to perturb each box of a multi-box sample)."""

    def __init__(self, sample: Any, box_norm: Sequence[float]):
        self.width, self.height, self.meta = sample.width, sample.height, sample.meta
        self.gt_box = to_pixels(box_norm, sample.width, sample.height)


def _stage(valid: bool, value: float, lo: float, hi: float) -> str:
    if not valid:
        return "invalid_start"
    if value < lo:
        return "iou_below_min"
    if value > hi:
        return "iou_above_max"
    return "kept"


class Synthesizer:
    """Builds teacher trajectories chunk by chunk (the CLI below and on-the-fly behaviour cloning use it)."""

    def __init__(self, cfg: SynthesizeConfig, dataset: Any = None, reasoner: Any = None, student: Any = None):
        if cfg.start not in ("student", "perturbed", "gt"):
            raise ValueError(f"start must be 'student', 'perturbed' or 'gt', got {cfg.start!r}")
        if cfg.teacher not in ("geometric", "vlm"):
            raise ValueError(f"teacher must be 'geometric' or 'vlm', got {cfg.teacher!r}")
        if not (0.0 <= cfg.iou_min <= cfg.iou_max <= 1.0):
            raise ValueError(f"need 0 <= iou_min <= iou_max <= 1, got [{cfg.iou_min}, {cfg.iou_max}]")
        if cfg.steps < 0:
            raise ValueError(f"steps must be >= 0, got {cfg.steps}")
        self.cfg = cfg
        self.dataset = dataset if dataset is not None else load_env_dataset(cfg)
        self._collectors: dict[int, Any] = {}
        self.student = student
        if self.student is None and cfg.start == "student" and cfg.student != "scripted":
            from agents.policies import make_policy

            self.student = make_policy(cfg.student, **dict(cfg.student_kwargs))
        self.reasoner = reasoner
        if self.reasoner is None and cfg.teacher == "vlm":
            from agents.synthesis.vlm_reasoner import VLMTeacher

            if not cfg.teacher_model:
                raise ValueError("teacher=vlm needs teacher_model (a model name or path the VLM policy loads)")
            self.reasoner = VLMTeacher.from_config(cfg.teacher_model, cfg.teacher_prompts, cfg.teacher_max_new_tokens)
        self.fallbacks = 0

    def _collector(self, steps: int, student: bool = False) -> Any:
        """A collector over ``batch_size`` envs with ``steps`` refinement steps, kept across calls. ``student``: the
        student's single pass, in an env without stopping (the student answers its usual prompt)."""
        key = (steps, student)
        if key not in self._collectors:
            from rollouts.collector import Collector

            cfg = self.cfg if not student else dataclasses.replace(self.cfg, stop=False)
            self._collectors[key] = Collector([make_env(cfg, steps, self.dataset)
                                               for _ in range(max(1, self.cfg.batch_size))])
        return self._collectors[key]

    def close(self) -> None:
        for c in self._collectors.values():
            c.close()
        self._collectors = {}

    # ---------------------------------------------------------------------------------------------- stage 1
    def starts(self, indices: Sequence[int]) -> list[dict]:
        """One start record per index: ``sample_id, index, start, text, box_norm, valid, iou, stage``."""
        cfg = self.cfg
        recs: list[dict] = []
        if cfg.start == "student" and self.student is not None:
            from agents.policies.base import SamplingParams

            # T=0 envs: the student answers once
            trajs = self._collector(0, student=True).collect(self.student, list(indices), 1, SamplingParams(greedy=cfg.student_greedy),
                                               seed=cfg.seed + (int(indices[0]) if len(indices) else 0))
            by_id = {t.sample_id: t for t in trajs}
            for i in indices:
                s = self.dataset[int(i)]
                t = by_id[s.sample_id]
                st = t.steps[0]
                recs.append({"sample_id": s.sample_id, "index": int(i), "start": "student", "text": st.text,
                             "box_norm": list(st.box_norm) if st.valid and st.box_norm is not None else None,
                             "valid": bool(st.valid), "iou": float(st.iou)})
        else:
            for i in indices:
                s = self.dataset[int(i)]
                rng = _rng_for(cfg.seed, s.sample_id)
                if is_multi_sample(s, self.dataset):  # several boxes: a list of boxes, scored with HIoU
                    recs.append(self._multi_start(s, int(i), rng))
                    continue
                if cfg.start == "perturbed":
                    box = perturbed_gt_box(s, rng, cfg.perturb)
                elif cfg.start == "gt":
                    box = list(to_norm(s.gt_box, s.width, s.height))
                else:
                    box = scripted_student_box(s, rng, cfg.scripted)
                value = iou(to_pixels(box, s.width, s.height), s.gt_box)
                recs.append({"sample_id": s.sample_id, "index": int(i), "start": "scripted" if cfg.start == "student"
                             else cfg.start, "text": format_box(box), "box_norm": box, "valid": True, "iou": value})
        for r in recs:
            r["stage"] = _stage(r["valid"], r["iou"], cfg.iou_min, cfg.iou_max)
        return recs

    def _multi_start(self, s: Any, index: int, rng: random.Random) -> dict:
        """The start record of a multi-box sample: the scripted student's boxes (count errors included), each GT box
        perturbed, or the GT boxes; ``iou`` is the HIoU of the start with the GT boxes."""
        cfg = self.cfg
        gts = gt_boxes_norm(s)
        if cfg.start == "perturbed":
            boxes = [perturbed_gt_box(_OneBox(s, g), rng, cfg.perturb) for g in gts]
        elif cfg.start == "gt":
            boxes = [list(g) for g in gts]
        else:
            boxes = multi_student_boxes(s, rng, cfg.scripted)
        gt_px = (s.meta or {}).get("gt_boxes") or [s.gt_box]
        value = hiou([to_pixels(b, s.width, s.height) for b in boxes], gt_px)
        return {"sample_id": s.sample_id, "index": index, "start": "scripted" if cfg.start == "student" else cfg.start,
                "text": format_boxes(boxes), "box_norm": boxes, "valid": True, "iou": value}

    # ---------------------------------------------------------------------------------------------- stages 3-4
    def trajectories(self, recs: Sequence[dict], keep_observations: bool = True) -> list[Trajectory]:
        """Teacher trajectories of the kept records, played through the env (observations kept in memory)."""
        from agents.policies.base import SamplingParams
        from agents.teacher.planned import PlannedTeacher

        cfg = self.cfg
        kept = [r for r in recs if r["stage"] == "kept"]
        if not kept:
            return []
        plans = {}
        for r in kept:
            s = self.dataset[r["index"]]
            if is_nested(r["box_norm"]):  # a multi-box start: every box interpolated to its matched GT box
                plans[r["sample_id"]] = interpolate_box_sets(r["box_norm"], gt_boxes_norm(s), cfg.steps,
                                                             keep_fitting=cfg.keep_fitting)
                continue
            gt = to_norm(s.gt_box, s.width, s.height)
            plans[r["sample_id"]] = interpolate_boxes(r["box_norm"], gt, cfg.steps)
            if cfg.keep_fitting:
                plans[r["sample_id"]] = hold_fitting_boxes(plans[r["sample_id"]], gt, cfg.keep_iou)
            if cfg.stop:
                plans[r["sample_id"]] = stop_plan(plans[r["sample_id"]], gt, cfg.stop_iou)
        teacher = PlannedTeacher(plans, verbosity=cfg.verbosity, reasoner=self.reasoner, seed=cfg.seed,
                                 stop_marker=cfg.stop_marker if cfg.stop else None, stop_iou=cfg.stop_iou,
                                 keep_marker=cfg.keep_marker if cfg.keep_fitting else None)
        trajs = self._collector(cfg.steps).collect(teacher, [r["index"] for r in kept], 1, SamplingParams(greedy=True),
                                                   seed=cfg.seed, keep_observations=keep_observations)
        self.fallbacks += teacher.fallbacks
        by_id = {r["sample_id"]: r for r in kept}
        for t in trajs:
            r = by_id[t.sample_id]
            t.meta = dict(t.meta or {}, teacher=cfg.teacher, start=r["start"], start_iou=r["iou"],
                          planned_boxes=plans[t.sample_id], index=r["index"])
        return trajs
