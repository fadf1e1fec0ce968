"""Teacher trajectories for behaviour cloning (IVT Sec. 3.2): ``python -m agents.synthesis``.

Pipeline, per training sample:

1. **Start box.** ``start=student`` (the paper's recipe): a student answers the sample once at step 0. The student
   is any policy by name or import path (``vlm`` with ``student_kwargs`` naming the model, ``oracle``,
   ``pkg.mod:Class``), run through the env by the rollout collector; or ``scripted``, the CPU default's stand-in
   for a base VLM (no pre-trained VLM exists offline): it answers a distractor object with probability ``p_wrong``
   and otherwise the GT box shifted and rescaled by Gaussian noise (:mod:`agents.teacher.starts`).
   ``start=perturbed``: the paper's ablation, a uniform random perturbation of the GT (causes step-0 sandbagging).
2. **IoU filter.** Keep samples whose start box is valid with IoU in ``[iou_min, iou_max]`` (default [0, 0.85]).
3. **Box trajectory.** Linear interpolation from the start box to the GT over ``steps`` = T steps (default 2).
4. **Reasoning per step** (forward-reasoning framing): the offline geometric teacher (default) or a teacher VLM
   (``teacher=vlm``) prompted with exactly the image the student will see: the original at step 0, the env's
   overlay of box t-1 at step t. The trajectory is played through the env, so overlays, IoUs and validity are the
   env's own.

Output folder ``out``::

    config.yaml            the settings used (a re-run with other settings refuses to mix them)
    starts.jsonl           one record per sample: start text/box, IoU, and the stage that kept or dropped it
    trajectories.jsonl     one Trajectory per kept sample (rollouts.types; step image_path relative to out)
    images/<sample_id>/step<t>.png   the observation each step saw (step 0 original, step t overlay of t-1)
    summary.json           how many samples each stage kept, start / per-step IoUs, wall time
    shards/                per-chunk files written atomically as work proceeds (resume reads them)

The pipeline itself lives in :mod:`agents.synthesis.synthesizer`. Resumable: re-running the same command skips the sample ids already in ``shards/`` (each chunk's start shard is
written last, atomically, and marks the chunk done).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from agents.common.config import atomic_write_text, parse_cli, save_yaml, to_dict
from rollouts.storage import save_png, trajectory_record
from agents.synthesis.synthesizer import (
    STAGES,
    SynthesizeConfig,
    Synthesizer,
    dataset_kwargs,
    load_env_dataset,
    make_env,
)
from rollouts.types import Trajectory

__all__ = ["STAGES", "SynthesizeConfig", "Synthesizer", "dataset_kwargs", "load_env_dataset", "main", "make_env",
           "read_jsonl", "run", "summarize", "write_images"]


# ----------------------------------------------------------------------------------------------------- output
def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, default=_plain) + "\n" for r in records)


def _plain(o: Any) -> Any:
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, (np.ndarray, tuple)):
        return list(o.tolist() if isinstance(o, np.ndarray) else o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a bad line raises ``ValueError`` naming the file and line."""
    out = []
    with open(path) as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k}: not valid JSON ({e.msg}); delete the file to redo its chunk") from e
    return out


def write_images(trajs: Sequence[Trajectory], out: Path) -> None:
    """Write each step's observation to ``images/<sample_id>/step<t>.png`` and set ``image_path`` (relative)."""
    for t in trajs:
        for st in t.steps:
            if st.observation is None:
                continue
            rel = f"images/{t.sample_id}/step{st.t}.png"
            save_png(out / rel, st.observation)
            st.image_path = rel


def summarize(starts: Sequence[dict], trajs: Sequence[Trajectory], cfg: SynthesizeConfig, extra: dict) -> dict:
    """How many samples each stage kept, and the IoUs of the starts and of each teacher step."""
    counts = {k: sum(r["stage"] == k for r in starts) for k in STAGES}
    kept_ious = [r["iou"] for r in starts if r["stage"] == "kept"]
    steps = [[s.iou for s in t.steps] for t in trajs]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None
    return {
        "samples": len(starts),
        "start": cfg.start,
        "student": cfg.student if cfg.start == "student" else None,
        "teacher": cfg.teacher,
        "stages": {"answered": len(starts), "valid_start": len(starts) - counts["invalid_start"],
                   "iou_filter_kept": counts["kept"], "trajectories": len(trajs)},
        "dropped": {k: counts[k] for k in STAGES if k != "kept"},
        "iou_range": [cfg.iou_min, cfg.iou_max],
        "start_iou_mean": mean([r["iou"] for r in starts if r["valid"]]),
        "kept_start_iou_mean": mean(kept_ious),
        # with stop: over the trajectories that reached step t (a stopped one has fewer steps)
        "step_iou_mean": [mean([s[t] for s in steps if len(s) > t]) for t in range(cfg.steps + 1)] if steps else [],
        **({"refine_steps_mean": mean([len(s) - 1 for s in steps])} if cfg.stop else {}),
        "teacher_format_rate": mean([float(s.valid) for t in trajs for s in t.steps]),
        **extra,
    }


_RESUME_IGNORED = {"limit", "batch_size", "chunk_size", "progress", "overwrite", "out", "save_images"}


def _check_resume(out: Path, cfg: SynthesizeConfig) -> None:
    path = out / "config.yaml"
    if not path.is_file():
        return
    import yaml

    old = yaml.safe_load(path.read_text()) or {}
    new = to_dict(cfg)
    default = to_dict(SynthesizeConfig())  # a field newer than the folder (e.g. stop) counts as its default
    diff = sorted(k for k in new if k not in _RESUME_IGNORED and old.get(k, default.get(k)) != new[k])
    if diff:
        raise SystemExit(
            f"{out} holds a synthesis made with other settings ({', '.join(diff)} differ); use another --out, "
            "or --overwrite True to start over"
        )


def run(cfg: SynthesizeConfig, synthesizer: Optional[Synthesizer] = None) -> dict:
    """Synthesize into ``cfg.out`` (resuming what is there) and return the summary."""
    from tqdm import tqdm

    out = Path(cfg.out)
    shards = out / "shards"
    if cfg.overwrite and shards.exists():
        import shutil

        shutil.rmtree(shards)
    else:
        _check_resume(out, cfg)
    shards.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    t0 = time.time()
    syn = synthesizer or Synthesizer(cfg)
    n = len(syn.dataset) if cfg.limit <= 0 else min(cfg.limit, len(syn.dataset))
    done: set[str] = set()
    for p in sorted(shards.glob("start-*.jsonl")):
        done.update(r["sample_id"] for r in read_jsonl(p))
    todo = [i for i in range(n) if syn.dataset.sample_ids[i] not in done]
    bar = tqdm(total=n, initial=n - len(todo), desc="synthesize", unit="sample", disable=not cfg.progress,
               dynamic_ncols=True)
    for c in range(0, len(todo), cfg.chunk_size):
        chunk = todo[c : c + cfg.chunk_size]
        recs = []
        trajs = []
        for b in range(0, len(chunk), cfg.batch_size):
            batch = chunk[b : b + cfg.batch_size]
            r = syn.starts(batch)
            t = syn.trajectories(r, keep_observations=cfg.save_images)
            if cfg.save_images:
                write_images(t, out)
            recs += r
            trajs += t
            bar.update(len(batch))
            bar.set_postfix(kept=sum(x["stage"] == "kept" for x in recs), refresh=False)
        name = f"{chunk[0]:09d}"
        atomic_write_text(shards / f"traj-{name}.jsonl", _jsonl(trajectory_record(t) for t in trajs))
        atomic_write_text(shards / f"start-{name}.jsonl", _jsonl(recs))  # last: marks the chunk done
    bar.close()

    # merge every shard (also those of earlier, interrupted runs) into the final files
    wanted = set(syn.dataset.sample_ids[i] for i in range(n))
    starts = [r for p in sorted(shards.glob("start-*.jsonl")) for r in read_jsonl(p) if r["sample_id"] in wanted]
    trajs = [Trajectory.from_dict(d) for p in sorted(shards.glob("traj-*.jsonl")) for d in read_jsonl(p)
             if d["sample_id"] in wanted]
    starts.sort(key=lambda r: r["index"])
    trajs.sort(key=lambda t: t.meta.get("index", 0))
    atomic_write_text(out / "starts.jsonl", _jsonl(starts))
    atomic_write_text(out / "trajectories.jsonl", _jsonl(trajectory_record(t) for t in trajs))
    summary = summarize(starts, trajs, cfg, {"teacher_fallbacks_this_run": syn.fallbacks,
                                              "wall_s_this_run": round(time.time() - t0, 2)})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_cli(SynthesizeConfig, argv, prog="python -m agents.synthesis",
                    description=__doc__.split("\n\n")[0] + " Writes a dataset folder; re-run to resume.")
    from agents.preflight import check_synthesis
    from ivt_env.datasets.base import DatasetError

    try:
        check_synthesis(cfg)  # names and folders before any model or dataset loads
        summary = run(cfg)
    except (ValueError, FileNotFoundError, DatasetError) as e:
        if isinstance(e, ValueError) and not isinstance(e, DatasetError) and "synthesis config" not in str(e):
            raise  # not a user error: keep the traceback
        print(f"python -m agents.synthesis: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("samples", "stages", "dropped", "kept_start_iou_mean", "step_iou_mean")},
                     indent=2))
    print(f"wrote {cfg.out}/trajectories.jsonl and summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
