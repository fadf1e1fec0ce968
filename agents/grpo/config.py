"""Configuration of the GRPO learner (`python -m agents.grpo train`). Every field has its own docstring: that text
is what ``--help`` prints. Paper settings: ``configs/grpo_paper.yaml``; the CPU default: ``configs/grpo_cpu.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from agents.common.schedule import SCHEDULES
from agents.grpo.losses import AGGREGATIONS, KL_ESTIMATORS
from agents.policies.vlm_setup import LoraSettings



@dataclass
class GRPOConfig:
    """Group-rollout GRPO for iterative visual thinking (IVT Sec. 3.3)."""

    # ------------------------------------------------------------------------------------------------ run
    exp_name: str = "grpo"
    """Experiment name: part of the run folder name runs/{env}__{exp}__{seed}__{time}."""
    seed: int = 0
    """Seed of everything. Prompts and sampling of rank r at iteration k use a seed derived from (seed, r, k), so a
    resumed run draws exactly what the uninterrupted run would have drawn."""
    out: Optional[str] = None
    """Run folder (TensorBoard events, checkpoints, config copy). Default: a fresh runs/{env}__{exp}__{seed}__{time}."""
    runs_root: str = "runs"
    """Parent folder of auto-named run folders."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint (optimizer, scheduler, RNG). A larger --iterations
    extends the run: the learning-rate schedule is rebuilt for the new length. A bare `--resume` means
    `--resume True`."""
    overwrite: bool = False
    """Start clean in an --out that holds a previous run: delete its logs, checkpoints and best/ first (without
    it, and without --resume, a used --out is refused)."""
    iterations: int = 200
    """Number of iterations; each = collect prompts_per_iter groups, compute advantages, one optimizer step."""

    # --------------------------------------------------------------------------------------------- env
    env_id: str = "IVT-Synthetic-v0"
    """Gymnasium id of the grounding env (registered by `import ivt_env`)."""
    max_refine_steps: int = 2
    """T: refinement steps after step 0 (episodes have T+1 steps). T=0 is the single-step variant."""
    reward: str = "ivt"
    """Reward given to the env: a name of ivt_env.rewards.get_reward (ivt = IVT Eq. 3) or 'pkg.mod:fn'."""
    env_kwargs: str = ""
    """Extra keyword arguments of the env as a JSON object (as `agents.evaluate --env-kwargs`), e.g.
    '{"allow_stop": true, "step_cost": 0.02, "stop_marker": "fits."}'; they win over the env id's defaults."""
    data_root: Optional[str] = None
    """Folder with the datasets (real datasets only; synthetic scenes need none)."""
    train_split: str = "train"
    """Split the prompts are drawn from."""
    train_limit: int = 0
    """Use only the first K samples of the train split (0: all)."""
    val_split: str = "val"
    """Split of the periodic validation."""

    # ------------------------------------------------------------------------------------------ policy
    policy: str = "vlm"
    """Policy: a name of agents.policies.make_policy or 'pkg.mod:Class' (must be a TrainablePolicy)."""
    init_from: str = "assets/tiny-ivt-bc"
    """Checkpoint folder the policy starts from (the behaviour-cloned SFT model, as in the paper)."""
    reference: str = "initial"
    """KL reference policy: initial (the start checkpoint as loaded, i.e. the SFT policy, as in the paper: a frozen
    copy of a loaded adapter, or of all weights when fully fine-tuning) | base (a loaded adapter's base model)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter settings."""
    load_in_4bit: bool = False
    """Load the base weights 4-bit NF4 (bitsandbytes), as in the paper."""
    threads: int = 0
    """torch CPU threads per process (0: torch's default). The tiny model's small matrix products gain nothing from
    more threads, and OpenMP threads spinning on an oversubscribed CPU slowed a 2-thread run 20-100x here."""
    device: Optional[str] = None
    """Torch device (None: cuda if available, else cpu)."""
    dtype: Optional[str] = None
    """Model dtype (float32, bfloat16, float16; None: the policy's default)."""

    # ---------------------------------------------------------------------------------------- sampling
    group_size: int = 6
    """N: trajectories per prompt (IVT: 6)."""
    prompts_per_iter: int = 8
    """Prompts (groups) collected per iteration on each rank."""
    rollout_batch: int = 0
    """Trajectories generated together in one lock-step batch (env slots; 0: min(prompts x N, 4 N); -1: prompts x
    N, all of an iteration's trajectories in one batch: half the decode forwards of two batches, other random draws
    per row than smaller batches, hence other trajectories)."""
    temperature_first: float = 1.0
    """Sampling temperature at step 0 (IVT: 1.0)."""
    temperature_refine: float = 0.7
    """Sampling temperature at refinement steps (IVT: 0.7)."""
    max_new_tokens: int = 160
    """Generation budget per step (IVT: 160)."""
    branch_size: int = 1
    """M: branching groups. Each group of N holds K = N / M step-0 answers, each shared by M adjacent members
    (sampled once, KV cache forked), which then refine on their own, so a refinement is compared with siblings that
    saw the same overlay (use with a per-step advantage, e.g. step_advantage: branch). 1: N independent trajectories
    (IVT)."""

    # ------------------------------------------------------------------------------------ optimisation
    lr: float = 2e-6
    """AdamW learning rate (IVT: 2e-6)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: str = "constant"
    """constant | linear | cosine (after warm-up, decaying to 0 at the last iteration)."""
    warmup_iters: int = 0
    """Linear learning-rate warm-up, in iterations (optimizer steps)."""
    grad_accum: int = 8
    """Micro-batches per optimizer step: an iteration's trajectories are split into this many (IVT: 8)."""
    updates_per_iter: int = 1
    """Optimizer steps per collected batch (>1 reuses the batch: set clip_eps)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (<= 0: off; the norm is still logged)."""

    # -------------------------------------------------------------------------------------------- loss
    advantage: str = "grpo"
    """Advantage estimator: grpo (IVT Eq. 1) | dr_grpo (Dr. GRPO: needs aggregation seq_sum_norm) | centered (R - mean,
    no std) | srpo (Ground-R1) | 'pkg.mod:fn'."""
    adv_eps: float = 1e-4
    """eps in (R - mean) / (std + eps). 1e-4 as TRL: a near-tie group (rewards 1e-5 apart) gets ~+-0.09, not ~+-0.9."""
    population_std: bool = False
    """grpo, srpo: divide by the population std (N) instead of the sample std (N - 1)."""
    srpo_bins: int = 3
    """srpo: K equal-width bins on the area fraction of the box each rollout grounds (Ground-R1: 3)."""
    step_advantage: str = ""
    """Per-step credit (agents/grpo/step_credit.py): a per-step estimator of agents.grpo.advantages (progressive:
    SIFThinker's r_t = s_t + (s_t - group mean of s_{t-1}), group-relative per step | step_delta: step 0 by the
    return, refinement t by its own s_t - s_{t-1} | branch: tree GRPO on branching groups), credited to the tokens
    of each step. Empty: one advantage per trajectory from `advantage` on every token (IVT Eq. 1)."""
    step0_weight: float = 1.0
    """Scale of the step-0 advantages under a per-step estimator (0: only the refinement tokens get a policy
    gradient; step 0 stays where behaviour cloning left it, held by the KL term)."""
    step_score: str = "iou"
    """Per-step score s_t of the per-step estimators: iou (the step's IoU, 0 when invalid) | reward (env step reward)."""
    beta: float = 0.04
    """KL coefficient against the reference (SFT) policy (IVT: 0.04; 0 skips the reference pass)."""
    kl_estimator: str = "abs"
    """abs (IVT: mean |log pi - log pi_ref|) | k3 (exp(d) - d - 1)."""
    entropy_coef: float = 0.01
    """Entropy bonus lambda (IVT: 0.01)."""
    guide_coef: float = 0.0
    """Teacher guidance (agents/grpo/guidance.py, DAgger-style): weight of a cross-entropy on the geometric teacher's
    answer to every refinement state the policy visited (keep a box with IoU >= 0.85, else move toward the GT),
    added to the GRPO loss. 0: pure GRPO (IVT Eq. 2)."""
    guide_states: str = "all"
    """Which refinement states get a guidance target: all | fit (only those whose red box fits, IoU >= 0.85: the
    target is "Box fits. Keep it." and the same box, the action behaviour cloning left unsampled)."""
    guide_sigma: float = 20.0
    """Gaussian soft-target width (of 1000) on the number tokens of the guidance targets (the BC recipe's
    number_sigma; 0: one-hot)."""
    guide_keep: str = ""
    """The guidance teacher's keep answer: "" rewrites the kept box ("Box fits. Keep it." + the same box, the paper's
    answer format); the env's keep marker ("Keep it.") answers "<think>Box fits. Keep it.</think>" with no box, which
    the env reads as "the previous box, exactly" (ivt_env keep_marker, "Keeping a box")."""
    guide_verbosity: int = 0
    """Verbosity of the guidance teacher's reasoning text (0, 1, 2): the one the policy was behaviour-cloned with."""
    clip_eps: Optional[float] = None
    """PPO ratio clipping epsilon (None: plain REINFORCE as in IVT Eq. 2)."""
    old_logprobs: str = "rollout"
    """Behaviour log-probs for the clipped ratio: rollout (Step.logprobs recorded while sampling; the VLM policy
    records log_softmax(logits / T) at each step's sampling temperature T, the same scoring as its teacher-forced
    pass) | recompute (one extra teacher-forced pass before the first update)."""
    aggregation: str = "token_mean"
    """Token aggregation of the loss: token_mean (TRL dapo) | seq_mean (TRL grpo) | seq_sum_norm (TRL dr_grpo)."""
    entropy_aggregation: str = "token_mean"
    """Aggregation of the entropy bonus: token_mean (mean entropy per generated token, as TRL for every loss type:
    the bonus keeps its strength whatever the loss aggregation) | loss (the same as `aggregation`)."""
    max_skipped_updates: int = 3
    """Stop the run when this many updates in a row were skipped for a non-finite advantage, loss or gradient."""

    # ------------------------------------------------------------------------ evaluation, logging, saving
    eval_every: int = 10
    """Validation every K iterations (and at the start and the end); 0: never. best/ holds the trained iteration
    with the highest validation return; the start's validation is the curves' baseline, never best/ (so a
    reproduction's GRPO row is always a trained policy: init_from already holds the start)."""
    eval_limit: int = 100
    """Validation samples (0: the whole split)."""
    val_size: int = 0
    """Size of the validation split (synthetic env only: its `split_sizes`; the first 200 scenes are the default
    val split's, later indices are new scenes of the same stream). 0: the dataset's default size (200 synthetic)."""
    eval_greedy: bool = True
    """Validation with greedy decoding (False: the training temperatures)."""
    save_every: int = 10
    """Checkpoint every K iterations (and at the end)."""
    keep_last: int = 2
    """Iteration checkpoints kept (the best one is kept apart in best/)."""
    image_every: int = 10
    """Trajectory strips to TensorBoard every K iterations (0: never)."""
    num_images: int = 2
    """Trajectory strips per logging."""
    progress: bool = True
    """Show tqdm progress bars."""

    def rollout_slots(self) -> int:
        """Env slots of one collection batch (``rollout_batch``; 0: min(prompts x N, 4 N); -1: prompts x N)."""
        if self.rollout_batch < 0:
            return self.prompts_per_iter * self.group_size
        return self.rollout_batch or min(self.prompts_per_iter * self.group_size, 4 * self.group_size)

    def validate(self) -> None:
        """Raise ValueError naming the field for inconsistent settings."""
        checks = [
            (self.iterations >= 0, "iterations must be >= 0"),
            (self.group_size >= 2, "group_size must be >= 2 (group-relative advantages need 2+ trajectories)"),
            (self.prompts_per_iter >= 1, "prompts_per_iter must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.updates_per_iter >= 1, "updates_per_iter must be >= 1"),
            (self.max_refine_steps >= 0, "max_refine_steps must be >= 0"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {'|'.join(SCHEDULES)}"),
            (self.old_logprobs in ("recompute", "rollout"), "old_logprobs must be recompute|rollout"),
            (self.kl_estimator in KL_ESTIMATORS, f"kl_estimator must be one of {'|'.join(KL_ESTIMATORS.names())}"),
            (self.reference in ("initial", "base"), "reference must be initial|base"),
            (self.aggregation in AGGREGATIONS, f"aggregation must be one of {'|'.join(AGGREGATIONS.names())}"),
            (self.advantage != "dr_grpo" or self.aggregation == "seq_sum_norm",
             f"advantage dr_grpo (Dr. GRPO) also replaces the length normalisation: set aggregation seq_sum_norm "
             f"(got {self.aggregation}), or use advantage centered for the std-free advantage alone"),
            (self.entropy_aggregation in ("token_mean", "loss"), "entropy_aggregation must be token_mean|loss"),
            (self.srpo_bins >= 1, "srpo_bins must be >= 1"),
            (self.max_skipped_updates >= 1, "max_skipped_updates must be >= 1"),
            (self.updates_per_iter == 1 or self.clip_eps is not None,
             "updates_per_iter > 1 reuses stale samples: set clip_eps (e.g. 0.2)"),
            (not self.resume or self.out, "--resume needs --out DIR (the run folder to continue)"),
            (not (self.resume and self.overwrite), "give --resume (continue) or --overwrite (start clean), not both"),
            (self.branch_size >= 1 and self.group_size % self.branch_size == 0,
             f"branch_size {self.branch_size} must be >= 1 and divide group_size {self.group_size} (the CPU default "
             "branches by 3: --branch-size 1 gives N independent trajectories)"),
            (self.rollout_batch >= -1, f"rollout_batch must be >= -1 (-1: prompts x N), got {self.rollout_batch}"),
            (self.branch_size == 1 or self.rollout_slots() % self.group_size == 0,
             "branch_size > 1 needs rollout_batch to be a multiple of group_size (siblings in one batch)"),
            (self.step_advantage != "branch" or self.branch_size >= 2, "step_advantage 'branch' needs branch_size >= 2"),
            (self.step_score in ("iou", "reward"), "step_score must be iou|reward"),
            (self.step0_weight == 1.0 or bool(self.step_advantage),
             "step0_weight needs a per-step estimator (step_advantage), which gives step 0 its own advantage"),
            (self.guide_coef >= 0, f"guide_coef must be >= 0, got {self.guide_coef}"),
            (self.guide_states in ("all", "fit"), f"guide_states must be all|fit, got {self.guide_states!r}"),
            (self.guide_sigma >= 0, f"guide_sigma must be >= 0, got {self.guide_sigma}"),
            (self.guide_verbosity in (0, 1, 2), f"guide_verbosity must be 0, 1 or 2, got {self.guide_verbosity}"),
            (self.guide_keep == "" or bool(self.guide_keep.strip()), "guide_keep must be '' or a marker such as "
             f"'Keep it.', got {self.guide_keep!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GRPO config: {msg}")
        self.env_options()

    def env_options(self) -> dict:
        """``env_kwargs`` parsed (a JSON object; empty: none)."""
        import json

        try:
            opts = json.loads(self.env_kwargs) if self.env_kwargs.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"GRPO config: env_kwargs is not JSON ({e.msg}): {self.env_kwargs!r}") from None
        if not isinstance(opts, dict):
            raise ValueError(f"GRPO config: env_kwargs must be a JSON object, got {self.env_kwargs!r}")
        own = {"max_refine_steps": "max_refine_steps", "reward_fn": "reward", "split": "train_split / val_split",
               "data_root": "data_root"}
        for key in own.keys() & opts.keys():
            raise ValueError(f"GRPO config: env_kwargs {key!r} is set by the option {own[key]!r}; set it there")
        return opts
