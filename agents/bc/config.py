"""Configuration of behaviour cloning (`python -m agents.bc train`). Every field has its own docstring: that text is
what ``--help`` prints. Paper settings: ``configs/bc_paper.yaml``; the CPU default: ``configs/bc_cpu.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from agents.common.schedule import SCHEDULES
from agents.policies.vlm_setup import LoraSettings
from agents.synthesis import SynthesizeConfig


@dataclass
class BCConfig:
    """Behaviour cloning (the SFT warm-up, IVT Sec. 3.2) on teacher trajectories."""

    # ------------------------------------------------------------------------------------------------ run
    exp_name: str = "bc"
    """Experiment name: part of the run folder name runs/{env}__{exp}__{seed}__{time}."""
    seed: int = 0
    """Seed of everything. Batch k is drawn from a seed derived from (seed, k), so a resumed run trains on exactly
    the batches the uninterrupted run would have used."""
    out: Optional[str] = None
    """Run folder (TensorBoard events, checkpoints, best/ and final/ policies, config copy). Default: a fresh
    runs/{env}__{exp}__{seed}__{time}."""
    runs_root: str = "runs"
    """Parent folder of auto-named run folders."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint (a longer run extends it: the learning-rate schedule is
    rebuilt for the new length). A bare `--resume` means `--resume True`."""
    overwrite: bool = False
    """Start clean in an --out that holds a previous run: delete its logs, checkpoints, base/, best/ and final/
    first (without it, and without --resume, a used --out is refused)."""

    # ------------------------------------------------------------------------------------------------ model
    init_from: str = "tiny"
    """Model folder (or local hub name) to clone into; 'tiny' builds a fresh random tiny Qwen3-VL
    (agents.policies.tiny) into {out}/base and trains it from scratch."""
    tiny_seed: int = 0
    """Weight seed of the fresh tiny model (init_from=tiny)."""
    number_init: str = "random"
    """init_from=tiny: 'sinusoidal' gives the whole-number tokens 0..1000 embeddings that encode their value
    (agents.bc.init_number_embeddings; numbers then start as values, not unrelated symbols), 'random' keeps the
    random initialisation."""
    full_finetune: bool = False
    """Train every weight (needed from scratch) instead of a LoRA adapter."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter settings (ignored with full_finetune)."""
    load_in_4bit: bool = False
    """Load the base weights 4-bit NF4 (bitsandbytes), as in the paper."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, slower)."""
    prompts: Optional[str] = None
    """Prompt file of the policy (None: the model folder's prompts.yaml, else configs/prompts.yaml). It is saved
    with every checkpoint, so inference uses the prompts the model was trained with."""
    device: Optional[str] = None
    """Torch device (None: cuda if available, else cpu)."""
    dtype: Optional[str] = None
    """Model dtype (float32, bfloat16, float16; None: the policy's default)."""
    threads: int = 0
    """torch.set_num_threads (0: leave torch's default); under torchrun the run's threads, split over its ranks
    (threads 2 with 2 ranks: one each)."""

    # ------------------------------------------------------------------------------------------------ data
    data: str = "online"
    """Teacher trajectories: a folder written by `python -m agents.synthesis`, or 'online' to synthesize fresh
    ones for every batch with the settings in `synth` (scripted student or GT perturbation only). With a folder,
    the online-only phases (grounding_mix, grounding_only_steps, localize_steps) are off, whatever the config
    says (a note names the values dropped): the folder's trajectories are the whole training set."""
    data_limit: int = 0
    """Use only the first K trajectories of the data folder (0: all)."""
    prefetch: int = 0
    """Micro-batches drawn and encoded (synthesis, overlay rendering, image processor) this many steps ahead in ONE
    worker process (agents.bc.data.Prefetcher), overlapping the model's forward and backward; 0: in the training
    process, step by step. The batches are the same either way (batch k depends only on seed and k). Off by
    default: it pays only with a spare core (on a 2-core machine already running other jobs,
    benchmarks/grpo_iteration.py measured steps 0.9-1.05x as fast with it)."""
    grounding_mix: float = 0.0
    """data=online: fraction of every micro-batch that is single-step grounding samples (the step-0 prompt
    answered with the GT box, '<think>Target at R.</think> [GT]'). They stand in for the grounding pre-training a
    base VLM already has (the paper's student grounds at about 80% Acc@0.5 before SFT; a tiny model trained from
    scratch has none). 0: teacher trajectories only, as in the paper."""
    grounding_only_steps: int = 0
    """data=online: the first K optimizer steps train on single-step grounding samples only (a pre-training
    phase before the teacher trajectories)."""
    localize_steps: int = 0
    """data=online: the first K optimizer steps train on single-step grounding samples of EASIER scenes, built
    with the dataset arguments `localize_kwargs` on top of `synth.dataset_kwargs` (default: one object per
    scene). A model from scratch first learns to box an object at all (measured: about 750 steps on single-object
    synthetic scenes, against a plateau of thousands of steps on 2-4 objects), then which object the expression
    names."""
    localize_kwargs: dict = field(default_factory=lambda: {"min_objects": 1, "max_objects": 1})
    """Dataset arguments of the localize_steps scenes (the synthetic dataset's SyntheticConfig fields)."""
    synth: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    """Synthesis settings of data=online (env, split, steps T, student, IoU filter, verbosity, ...). With a data
    folder, `synth.env` and `synth.dataset_kwargs` still name the env used to replay trajectories without images."""

    # ---------------------------------------------------------------------------------------------- optimisation
    lr: float = 2e-5
    """Peak learning rate (IVT: 2e-5 with LoRA)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 4
    """Trajectories per micro-batch (IVT: 4); under torchrun each rank draws batch_size / ranks of it."""
    grad_accum: int = 4
    """Micro-batches per optimizer step (IVT: 4)."""
    epochs: float = 10.0
    """Passes over a data folder (IVT: 10); sets the number of optimizer steps when max_steps is 0."""
    max_steps: int = 0
    """Optimizer steps (0: from epochs; required for data=online)."""
    warmup_ratio: float = 0.1
    """Linear warm-up over this fraction of the steps (IVT: 10%)."""
    lr_schedule: str = "cosine"
    """After warm-up: cosine (IVT), linear or constant."""
    lr_decay_start: float = 0.0
    """The decay begins after this fraction of the steps (0: right after warm-up, IVT; e.g. 0.7 keeps the peak lr
    through a pre-training phase and decays over the rest)."""
    min_lr_ratio: float = 0.0
    """The decayed schedules end at lr * min_lr_ratio."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    clone_start: bool = True
    """Clone step 0 of teacher trajectories (the student's answer) too, as in IVT, where the student IS the model
    (its own answer: harmless self-distillation). False: step 0 of a trajectory with refinement steps is context
    only (labels -100): with a scripted student it is a deliberately wrong box the model should not learn to give
    (single-step grounding samples still train their answer)."""
    clone_start_numbers: bool = True
    """False: step 0's number tokens (its box coordinates) are context, not targets; the rest of step 0 (reasoning,
    the stop marker) still trains. For stopping data built from the model's own answers (adaptive refinement):
    the fine-tune learns WHEN to stop without a direct gradient on the step-0 box it already gives."""
    train_only_tokens: str = ""
    """Non-empty: only the embedding rows of this text's tokens train (input and output rows: the tiny model ties
    them); every other weight is frozen. For a new phrase the model never wrote (adaptive refinement's
    " It fits <stop>"): Adam moves every weight with any gradient by about lr per step, and on the tiny model a
    full fine-tune that teaches the phrase also moves its step-0 boxes and its refinements (issue 14, measured)."""
    number_sigma: float = 0.0
    """> 0: a target that is a whole-number token (the tiny tokenizer's "0".."1000", i.e. a box coordinate) is
    trained towards a Gaussian of this width over the number tokens instead of a one-hot (a coordinate a few
    units off then costs little; agents.policies.number_targets.NumberSmoothing). 0: plain cross-entropy (IVT)."""

    # ------------------------------------------------------------------------------------------------ eval
    eval_every: int = 0
    """Evaluate on the val split every K optimizer steps (0: once per epoch of a data folder; with data=online
    only at the end)."""
    eval_at_start: bool = True
    """Also evaluate before the first step (the start of the curves; never kept as best/, which holds a trained step)."""
    val_split: str = "val"
    """Split of the periodic evaluation (same env as synth.env)."""
    eval_limit: int = 200
    """Evaluate on the first N samples of the val split (0: all)."""
    eval_steps: int = -1
    """T of the evaluation (-1: synth.steps)."""
    eval_batch: int = 50
    """Trajectories the policy generates in one batch during evaluation."""
    eval_max_new_tokens: int = 160
    """Generation budget per step during evaluation (IVT: 160)."""
    best_metric: str = "acc@0.5"
    """Validation metric that picks the best checkpoint (any key of agents.evaluate.metrics, e.g. miou)."""

    # ------------------------------------------------------------------------------------------------ checkpoints
    save_every: int = 0
    """Checkpoint every K optimizer steps (0: only at evaluations and at the end)."""
    keep_last: int = 2
    """Iteration checkpoints kept on disk (best/ and final/ are kept apart)."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this many optimizer steps in THIS invocation, as if killed (0: run to the
    end). Continue with --resume."""
    time_limit_min: float = 0.0
    """Stop (with a checkpoint) once this many minutes of training have passed in this invocation (0: none)."""

    # ------------------------------------------------------------------------------------------------ logging
    log_every: int = 10
    """Log train/... scalars every K optimizer steps."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.data != "online" or self.max_steps > 0, "data=online needs max_steps > 0 (there are no epochs)"),
            (self.max_steps > 0 or self.epochs > 0, "give max_steps or epochs > 0"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)"),
            (0.0 <= self.lr_decay_start < 1.0, "lr_decay_start must be in [0, 1)"),
            (self.number_sigma >= 0, "number_sigma must be >= 0"),
            (self.prefetch >= 0, "prefetch must be >= 0"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}"),
            (self.number_init in ("random", "sinusoidal"), "number_init must be random or sinusoidal"),
            (0.0 <= self.grounding_mix < 1.0, "grounding_mix must be in [0, 1)"),
            (self.data == "online" or (self.grounding_mix == 0 and self.grounding_only_steps == 0
                                         and self.localize_steps == 0),
             "grounding_mix / grounding_only_steps / localize_steps need data=online"),
            (not (self.full_finetune and self.load_in_4bit), "full_finetune excludes load_in_4bit"),
            (not self.train_only_tokens or self.full_finetune, "train_only_tokens needs full_finetune: true"),
            (not self.resume or bool(self.out), "--resume needs --out DIR (the run folder to continue)"),
            (not (self.resume and self.overwrite), "give --resume (continue) or --overwrite (start clean), not both"),
            (self.synth.start != "student" or self.data != "online" or self.synth.student == "scripted",
             "data=online runs the student per batch: use synth.student=scripted (or synthesize a folder first)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bc config: {msg}")
