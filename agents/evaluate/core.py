"""Evaluate any policy in an IVT env and report the paper's tables: ``python -m agents.evaluate --help``.

Example (scripted oracle on the first 50 synthetic test scenes, T=2)::

    python -m agents.evaluate --env IVT-Synthetic-v0 --policy oracle --policy-kwargs '{"noise": 30}' \\
        --steps 2 --split test --limit 50 --out runs/eval_oracle

Outputs in ``--out DIR``: ``metrics.json`` (keys ``acc@0.5 acc@0.7 acc@0.9 miou iou_step delta improve_rate
stagnation_rate degradation_rate format_rate n strata best_step by_dataset`` plus ``meta``; rates are fractions),
``metrics.md`` (Table 1 / Table 2 / strata layout of the paper), ``trajectories.jsonl``, ``strips/*.png`` (one per
trajectory: every step's overlay side by side with its IoU) and TensorBoard events (``eval/...`` scalars and the
strips as images; ``tensorboard --logdir DIR``).

Adaptive refinement: ``--allow-stop`` lets a step end its episode with ``<stop>`` (metrics.json adds
``refine_steps_mean``, ``by_steps_used`` and per-stratum steps); ``--proposals FILE.jsonl`` starts every trajectory
from another model's box (:mod:`agents.evaluate.proposals`; metrics.json adds ``proposals``).

From code, :func:`evaluate` takes a policy object and returns the metrics dict (BC and GRPO call it on the val
split, logging to their own writer with a prefix and global step).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import gymnasium as gym

from agents.common import distributed
from agents.common.config import atomic_write_text, expand_bool_flags, parse_cli
from agents.evaluate.metrics import compute_metrics
from agents.policies import make_policy
from agents.policies.base import Policy, SamplingParams
from agents.common.run_logging import log_metrics, log_strips, log_text
from agents.evaluate.report import format_report
from agents.evaluate.viz import save_strip, trajectory_strip
from ivt_env.datasets.base import DatasetError
from ivt_env.make import make_env
from rollouts.collector import Collector, EnvSource
from rollouts.storage import safe_name, save_trajectories


def _build_collector(env: Union[EnvSource, Collector], split: str, steps: int, data_root: Optional[str],
                     env_kwargs: Optional[dict], num_envs: Optional[int], n_hint: int) -> tuple[Collector, bool]:
    if isinstance(env, Collector):
        return env, False
    if isinstance(env, str):  # the split is loaded once and shared by every env of the collector
        thunk = make_env(env, split=split, max_refine_steps=steps, data_root=data_root, shared_dataset=True,
                         **dict(env_kwargs or {}))
        return Collector([thunk() for _ in range(max(1, num_envs or n_hint))], own_envs=True), True
    if callable(env) and not isinstance(env, (gym.Env, gym.vector.VectorEnv)):
        return Collector([env() for _ in range(max(1, num_envs or n_hint))], own_envs=True), True
    return Collector(env, num_envs=num_envs), False


def evaluate(
    policy: Union[Policy, str],
    env: Union[EnvSource, Collector] = "IVT-Synthetic-v0",
    split: str = "test",
    limit: Optional[int] = None,
    steps: int = 2,
    sampling: Optional[SamplingParams] = None,
    out_dir: Optional[Union[str, Path]] = None,
    writer: Any = None,
    *,
    prefix: str = "eval",
    global_step: int = 0,
    group_size: int = 1,
    seed: int = 0,
    data_root: Optional[str] = None,
    env_kwargs: Optional[dict] = None,
    num_envs: Optional[int] = None,
    num_strips: int = 4,
    save_images: bool = False,
    progress: bool = False,
    name: Optional[str] = None,
    proposals: Union[str, Path, dict, None] = None,
    shard: bool = False,
) -> dict[str, Any]:
    """Roll ``policy`` out on the first ``limit`` samples of ``split`` and return the IVT metrics dict.

    ``shard`` (every rank of a ``torchrun`` job calls it): rank r rolls out samples r, r + world, ... and every rank
    gets the metrics of all of them (the trajectories are gathered in sample order), in 1 / world of the time.

    ``proposals``: a JSONL file (or its loaded ``{sample_id: box}`` dict) of start boxes, one per evaluated sample
    (:mod:`agents.evaluate.proposals`): every trajectory starts from its sample's box as step 0, and the metrics add
    ``proposals`` (Table 1 of the proposals next to the refined boxes).

    ``env``: an env id (built with ``split``, ``max_refine_steps=steps``, ``data_root``, ``env_kwargs``), an env
    factory, an env / list of envs / vector env (already configured; ``split``/``steps`` are then theirs) or a
    :class:`~rollouts.collector.Collector` to reuse across calls. ``writer``: a RunLogger or SummaryWriter that
    receives ``{prefix}/...`` scalars and ``num_strips`` strip images at ``global_step``; without one, and with
    ``out_dir``, TensorBoard events go to ``out_dir``. ``sampling`` defaults to greedy decoding.

    Returns the :func:`agents.evaluate.metrics.compute_metrics` dict plus ``meta`` (settings, seconds, trajectories/s) and
    ``report`` (the Markdown tables that the CLI prints and writes to ``metrics.md``).
    """
    if isinstance(policy, str):
        name = name or policy
        policy = make_policy(policy)
    name = name or getattr(policy, "name", type(policy).__name__)
    sampling = sampling or SamplingParams(greedy=True)
    n_hint = 4 * group_size if limit is None else max(1, min(limit * group_size, 4 * group_size))
    collector, owned = _build_collector(env, split, steps, data_root, env_kwargs, num_envs, n_hint)
    try:
        first = collector.local_env()
        n_data = collector.dataset_size()
        if n_data is None and limit is None:
            raise ValueError("evaluate: the env exposes no dataset length; pass limit=N")
        n = n_data if limit is None else (limit if n_data is None else min(limit, n_data))
        if n <= 0:
            raise ValueError(f"evaluate: nothing to evaluate (limit={limit}, dataset size {n_data})")
        reset_options = None
        if proposals is not None:
            from agents.evaluate.proposals import load_proposals, reset_options_for

            src = "proposals" if isinstance(proposals, dict) else str(proposals)
            table = proposals if isinstance(proposals, dict) else load_proposals(proposals)
            if first is None:
                raise ValueError("evaluate: proposals need envs of this process (not an async vector env)")
            ids = first.unwrapped.dataset.sample_ids
            reset_options = reset_options_for(table, [ids[i] for i in range(n)], src)
        t0 = time.perf_counter()
        dist = distributed.current()
        rank, world = (dist.rank, dist.world_size) if shard and dist.enabled else (0, 1)
        trajs = collector.collect(policy, range(rank, n, world), group_size, sampling, seed=seed,
                                  keep_observations=save_images, progress=progress, reset_options=reset_options)
        skipped = list(collector.last_skipped)  # bad records met at reset: logged by the collector, listed in meta
        if world > 1:  # every rank's share, back in sample order
            parts = distributed.gather_objects((trajs, skipped))
            trajs = sorted((t for part, _ in parts for t in part),
                           key=lambda t: (t.meta["index"], t.meta["group_member"]))
            skipped = [k for _, part in parts for k in part]
            for t in trajs:  # the group number of the unsharded call (its position in range(n))
                t.group_id = t.meta["index"]
        elapsed = time.perf_counter() - t0
        if not trajs:
            raise DatasetError(f"evaluate: every sample failed at reset, e.g. {skipped[0]}")
        metrics = compute_metrics(trajs)
        if proposals is not None:
            from agents.evaluate.proposals import proposal_block

            metrics["proposals"] = proposal_block(trajs)
        strips = []
        for traj in trajs[: max(0, num_strips)]:
            image = traj.steps[0].observation if save_images else None
            if image is None and first is not None:
                image = first.reset(options={"index": traj.meta["index"]})[0]["image"]
            if image is not None:
                strips.append(trajectory_strip(traj, image))
    finally:
        if owned:
            collector.close()

    if not isinstance(env, str):  # a pre-built env: its own id and split
        env_name = getattr(getattr(first, "spec", None), "id", None) or type(env).__name__
        split = getattr(getattr(getattr(first, "unwrapped", None), "dataset", None), "split", None)
    meta = {"policy": name, "env": env if isinstance(env, str) else env_name, "split": split,
            "steps": metrics["steps"], "limit": limit, "group_size": group_size, "seed": seed,
            "sampling": dataclasses.asdict(sampling), "seconds": elapsed, "trajectories_per_s": len(trajs) / elapsed,
            "skipped_samples": skipped}
    if proposals is not None:
        meta["proposals"] = "dict" if isinstance(proposals, dict) else str(proposals)
    report = format_report(metrics, name=name)
    if "proposals" in metrics:
        p = metrics["proposals"]
        report += (f"\nProposals (step 0) -> refined (final): Acc@0.5 {p['proposal']['acc@0.5']:.3f} -> "
                   f"{p['refined']['acc@0.5']:.3f}, IoU {p['proposal']['miou']:.3f} -> {p['refined']['miou']:.3f}; "
                   f"IoU raised {100 * p['raised_rate']:.1f}%, lowered {100 * p['lowered_rate']:.1f}% of samples.\n")
    own_logger = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps({**metrics, "meta": meta}, indent=2) + "\n")
        atomic_write_text(out / "metrics.md", report)
        save_trajectories(out / "trajectories.jsonl", trajs, image_dir=(out / "images") if save_images else None)
        for k, (traj, strip) in enumerate(zip(trajs, strips)):
            stem = f"strip_{k:03d}_{safe_name(traj.sample_id)}_g{traj.meta['group_member']}"
            save_strip(out / "strips" / f"{stem}.png", strip)
        if writer is None:
            from agents.common.run_logging import RunLogger

            writer = own_logger = RunLogger(out)
    try:
        log_metrics(writer, {**metrics, "skipped_samples": len(skipped)}, global_step, prefix)
        log_strips(writer, strips, global_step, prefix)
        log_text(writer, f"{prefix.rstrip('/')}/report", report, global_step)
    finally:
        if own_logger is not None:
            own_logger.close()
    return {**metrics, "meta": meta, "report": report}


DESCRIPTION = (
    "Roll a policy out in an IVT env (T refinement steps on the first --limit samples of --split) and print the "
    "IVT paper's Table 1 (Acc@0.5/0.7/0.9, IoU of the final box), Table 2 (mean IoU per step, delta, improve / "
    "stagnate / degrade) and the step-0 difficulty strata. With --out DIR it writes DIR/metrics.json, "
    "DIR/metrics.md, DIR/trajectories.jsonl, DIR/strips/*.png and TensorBoard events (eval/... scalars, strips). "
    "Boolean options take a bare flag (--greedy), --no-FLAG or a value (--greedy False)."
)


@dataclass
class EvalConfig:
    """Options of ``python -m agents.evaluate``."""

    env: str = "IVT-Synthetic-v0"
    """Gymnasium env id: IVT-Synthetic-v0, IVT-SyntheticMulti-v0 (several objects, HIoU), IVT-RefCOCOg-v0, IVT-RefAdv-v0,
    IVT-RefL4-v0 or IVT-Mix-v0."""
    policy: Optional[str] = None
    """oracle, copy, random, replay, teacher, vlm, a model folder, or an import path package.module:ClassName
    (None: vlm with --model, else oracle)."""
    policy_kwargs: str = "{}"
    """JSON object of keyword arguments for the policy, e.g. '{"noise": 30}' (oracle) or
    '{"path": "texts.jsonl"}' (replay)."""
    model: Optional[str] = None
    """Model folder for the vlm policy: a model folder, a run's best/ or final/, a checkpoints/iter_N/ folder or a
    run folder (its best/)."""
    steps: int = 2
    """T, refinement steps after step 0 (the paper uses 2; 0 evaluates single-shot answers)."""
    split: str = "test"
    """Dataset split: train, val or test (refadv also all: its whole upstream split)."""
    limit: Optional[int] = None
    """Evaluate the first N samples of the split (None: all of them)."""
    out: Optional[str] = None
    """Output folder for metrics.json, metrics.md, trajectories.jsonl, strips/ and TensorBoard events
    (None: print only)."""
    seed: int = 0
    """Seed of the policy's sampling and of the envs."""
    group_size: int = 1
    """Trajectories per sample (N); the metrics average over all of them."""
    greedy: bool = True
    """Argmax decoding (--greedy / --no-greedy); off: sample with the temperatures below."""
    temperature_first: float = 1.0
    """Sampling temperature at step 0 (when not greedy)."""
    temperature_refine: float = 0.7
    """Sampling temperature at refinement steps (when not greedy)."""
    max_new_tokens: int = 160
    """Generation budget per step (model policies)."""
    data_root: Optional[str] = None
    """Folder holding the datasets (None: $IVT_DATA or the loader's default)."""
    env_kwargs: str = "{}"
    """JSON object of extra env arguments, e.g. '{"reward_fn": "ivt", "overlay": {"alpha": 0.5}}'."""
    num_envs: Optional[int] = None
    """Env slots, i.e. the policy's batch size (None: 4 x group size, at most the work)."""
    strips: int = 8
    """Number of trajectory strips (PNG + TensorBoard image) to write."""
    save_images: bool = False
    """Also write every step's observation image beside trajectories.jsonl (images/)."""
    progress: bool = True
    """Show a progress bar."""
    name: Optional[str] = None
    """Row label in the tables (None: the model's name with --model, e.g. my_run/best, else the policy name)."""
    allow_stop: bool = False
    """Adaptive refinement: a step writing the stop marker (<stop>, or the "stop_marker" a --model folder's
    ivt_policy.json records) ends its episode; --steps stays the budget (the same as --env-kwargs
    '{"allow_stop": true}')."""
    proposals: Optional[str] = None
    """JSONL of start boxes, one {"sample_id": ..., "box": [x1, y1, x2, y2]} (pixels) per line: every trajectory
    starts from its sample's box (step 0) and the report shows how refinement changes them."""


def _json_arg(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{flag}: not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: expected a JSON object like '{{\"noise\": 30}}', got {text!r}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_cli(EvalConfig, expand_bool_flags(argv, EvalConfig), prog="python -m agents.evaluate",
                    description=DESCRIPTION)
    policy_name = cfg.policy or ("vlm" if cfg.model else "oracle")
    from agents.preflight import check_env_id, check_folder, check_policy

    check_env_id(cfg.env, "python -m agents.evaluate", "--env")  # names before the model loads
    check_policy(policy_name, "python -m agents.evaluate", "--policy")
    check_folder(cfg.data_root, "--data-root", "data folder")
    kwargs = _json_arg(cfg.policy_kwargs, "--policy-kwargs")
    label = policy_name
    if cfg.model is not None:
        from agents.policies.model_dir import model_label, resolve_model_dir

        kwargs.setdefault("model", resolve_model_dir(cfg.model, "--model"))  # before any work: a clear error
        label = model_label(cfg.model)
    proposals = None
    if cfg.proposals is not None:
        from agents.evaluate.proposals import load_proposals

        load_proposals(cfg.proposals)  # a bad file fails here, before the model loads
        proposals = cfg.proposals
    policy = make_policy(policy_name, **kwargs)
    sampling = SamplingParams.from_config(cfg, greedy=cfg.greedy)
    env_kwargs = _json_arg(cfg.env_kwargs, "--env-kwargs")
    if cfg.allow_stop:
        env_kwargs["allow_stop"] = True
    if "model" in kwargs:
        from agents.policies.model_dir import with_recorded_stop_marker

        env_kwargs = with_recorded_stop_marker(env_kwargs, kwargs["model"])  # the marker it was trained to stop with
    result = evaluate(policy, cfg.env, split=cfg.split, limit=cfg.limit, steps=cfg.steps, sampling=sampling,
                      out_dir=cfg.out, group_size=cfg.group_size, seed=cfg.seed, data_root=cfg.data_root,
                      env_kwargs=env_kwargs, num_envs=cfg.num_envs, num_strips=cfg.strips,
                      save_images=cfg.save_images, progress=cfg.progress, name=cfg.name or label,
                      proposals=proposals)
    print(result["report"])
    if cfg.out:
        print(f"wrote {Path(cfg.out) / 'metrics.json'}, metrics.md, trajectories.jsonl, strips/ and TensorBoard events")
    return result


def cli() -> None:
    """Console entry: expected failures (missing data, bad arguments) print one line instead of a traceback."""
    from ivt_env.datasets.base import DatasetError

    try:
        main()
    except (DatasetError, FileNotFoundError, ImportError, KeyError, ValueError, TypeError) as exc:
        sys.exit(f"python -m agents.evaluate: error: {exc}")

