"""Self-distillation data for adaptive refinement (issue 14): a model's OWN rollouts, relabelled to stop.

The stop is taught with words the model already writes, inside its reasoning, so the box that follows keeps
(almost) the context it was trained in, and every target is the model's own text: a step-0 answer whose box fits
the GT (IoU >= ``fit_iou``) gets ``phrase`` (default ``" It fits."``) appended to its reasoning and ends the
trajectory there (``"<think>Target at left. It fits.</think> [x1, y1, x2, y2]"``: the same box); any other
trajectory keeps its own steps as they were (its refinement, e.g. ``"<think>Box fits. Keep it.</think>"``). Trained
for an env with ``allow_stop=True`` and a ``stop_marker`` the phrase holds (``"fits."``): the stop phrase then ends
the episode at step 0, and the model's usual refinement text "Box fits. Keep it." ends it at step 1 with the box
kept (at most one refinement step; an own text that holds the marker anywhere ends it where it stands).

Input: ``trajectories.jsonl`` of ``python -m agents.evaluate --model M --split train --steps 1 --out DIR`` (greedy,
no stopping). Output: a folder ``python -m agents.bc train --data OUT`` reads: ``trajectories.jsonl`` (texts only;
the trainer replays them through the env to render the observations) and ``config.yaml`` (the replay env's T).

    python -m agents.synthesis.self_distill runs/own_train --fit-iou 0.5 --anchors --out runs/sd_data

``--anchors`` (:func:`anchor`) adds box-only targets written after the phrase, which kept the fine-tuned boxes
closest to the model's own; measured runs and figures: ``assets/tiny-ivt-adaptive/README.md``.

``--stop-token TOKEN`` (:func:`distill_token`): the stop as ONE token written right AFTER a complete step
(``PromptConfig.stop_token``, e.g. ``"<|box_end|>"``), so every box and reasoning token keeps exactly its context:
each rollout's own steps up to the first one that fits, that one followed by the token; the steps before it
went on (their go-on decisions are targets too: ``meta["stop_decisions"]``). Input: rollouts at the full budget
(``agents.evaluate ... --steps 2``).

    python -m agents.synthesis.self_distill runs/own_train --fit-iou 0.5 --stop-token "<|box_end|>" --out runs/sd_tok
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from rollouts.types import Step, Trajectory

PHRASE = " It fits."  # appended to the reasoning of a step-0 answer that fits (agents.teacher.geometric.stop_reasoning)
MARKER = "fits."  # the env's stop marker this data is made for: in PHRASE and in the refinement text "Box fits."


def with_phrase(text: str, phrase: str = PHRASE) -> Optional[str]:
    """``text`` with ``phrase`` at the end of its closed reasoning (before ``</think>``); None without one.

    >>> with_phrase("<think>Target at left.</think> [1, 2, 3, 4]")
    '<think>Target at left. It fits.</think> [1, 2, 3, 4]'
    >>> with_phrase("[1, 2, 3, 4]") is None
    True
    """
    k = text.find("</think>")
    if k < 0 or "<think>" not in text[:k]:
        return None
    return text[:k].rstrip() + phrase + text[k:]


def _clean(st: Step, t: int, text: Optional[str] = None) -> Step:
    """A text-only copy of ``st`` (ids, log-probs and image dropped: the trainer encodes the text and replays it)."""
    return dataclasses.replace(st, t=t, text=st.text if text is None else text, token_ids=None, logprobs=None,
                               injected_ids=None, image_path=None, observation=None, temperature=None, extra={})


def distill(traj: Trajectory, fit_iou: float, phrase: str = PHRASE, marker: str = MARKER,
            max_steps: Optional[int] = None) -> Optional[Trajectory]:
    """The self-distillation target of one own rollout, or None when step 0 has no valid box in closed reasoning.

    Step 0 fits (``iou >= fit_iou``): one step, its own text with ``phrase`` (its box unchanged). Otherwise its own
    steps, cut after the first one whose text holds ``marker`` (where the stopping env ends the episode) and after
    ``max_steps`` refinement steps (None: all)."""
    if not traj.steps:
        return None
    s0 = traj.steps[0]
    if not s0.valid or with_phrase(s0.text, phrase) is None or marker in s0.text:
        return None
    fits = s0.iou >= fit_iou
    if fits:
        steps = [_clean(s0, 0, with_phrase(s0.text, phrase))]
    else:
        steps = []
        for t, st in enumerate(traj.steps[: None if max_steps is None else max_steps + 1]):
            steps.append(_clean(st, t))
            if marker in st.text:
                break
    meta = {k: v for k, v in (traj.meta or {}).items() if k in ("index", "group_member")}
    meta.update(allow_stop=True, stop_marker=marker, start="self", start_iou=float(s0.iou), fits=fits)
    return dataclasses.replace(traj, steps=steps, meta=meta)


def distill_token(traj: Trajectory, fit_iou: float, token: str, max_steps: Optional[int] = None
                  ) -> Optional[Trajectory]:
    """The stop-token target of one own rollout, or None when step 0 has no valid box: its own steps up to the
    first whose box fits (``iou >= fit_iou``; a step that keeps its box has the kept box's IoU), that step's text
    followed by ``token``; without a fitting step, its own steps (at most ``max_steps`` refinement steps), never
    stopping.

    >>> st = [Step(t=t, text=f"<think>s{t}</think> [1, 2, 3, 4]", valid=True, iou=u) for t, u in enumerate([.3, .6])]
    >>> tr = Trajectory("a", "synthetic", "x", [0, 0, 9, 9], 10, 10, steps=st)
    >>> [s.text for s in distill_token(tr, 0.5, "<|box_end|>").steps]
    ['<think>s0</think> [1, 2, 3, 4]', '<think>s1</think> [1, 2, 3, 4]<|box_end|>']
    """
    if not traj.steps or not traj.steps[0].valid:
        return None
    steps, stop_at = [], None
    for t, st in enumerate(traj.steps[: None if max_steps is None else max_steps + 1]):
        fits = bool(st.valid) and st.iou is not None and st.iou >= fit_iou
        steps.append(_clean(st, t, st.text + token if fits else None))
        if fits:
            stop_at = t
            break
    meta = {k: v for k, v in (traj.meta or {}).items() if k in ("index", "group_member")}
    meta.update(allow_stop=True, stop_decisions=True, stop_marker=token, start="self",
                start_iou=float(traj.steps[0].iou), fits=stop_at == 0, stop_step=stop_at)
    return dataclasses.replace(traj, steps=steps, meta=meta)


def anchor(d: Trajectory, phrase: str = PHRASE, text: Optional[str] = None) -> Trajectory:
    """A box anchor of a non-fitting target ``d``: its step 0 with ``phrase`` in the reasoning as CONTEXT
    (``extra["context_prefix"]``: no target) and its own box as the target, so the box the model writes after the
    stop phrase stays the box it writes without it, whatever the decision (the phrase itself is learned only from
    the answers that fit). ``text``: that step-0 text instead (``build(..., anchors="all")`` gives a fitting answer
    its own text WITHOUT the phrase: its box in the context where it does not stop)."""
    text = with_phrase(d.steps[0].text, phrase) if text is None else text
    k = text.find("</think>") + len("</think>")
    step = dataclasses.replace(d.steps[0], text=text, extra={"context_prefix": text[:k]})
    return dataclasses.replace(d, steps=[step], meta=dict(d.meta, anchor=True))


def build(trajs: Iterable[Trajectory], fit_iou: float, phrase: str = PHRASE, marker: str = MARKER,
          max_steps: Optional[int] = None, anchors: bool | str = False, token: str = ""
          ) -> tuple[list[Trajectory], dict]:
    """Every rollout's target (:func:`distill`; with ``token``, :func:`distill_token`), with ``anchors`` also an
    :func:`anchor` after each non-fitting one (``"all"``: after each fitting one too, its own phrase-less text), and
    counts: ``n_in``, ``n_out``, ``skipped``, ``fits``, ``anchors``, ``steps_hist`` (trajectory lengths)."""
    if token and anchors:
        raise ValueError("self_distill: --anchors is for the stop phrase, not --stop-token (boxes keep their context)")
    if not token and (not phrase.strip() or marker not in phrase):
        raise ValueError(f"the stop phrase {phrase!r} must hold the env's stop marker {marker!r}")
    out, n_in, hist = [], 0, {}
    for tr in trajs:
        n_in += 1
        d = distill_token(tr, fit_iou, token, max_steps) if token else distill(tr, fit_iou, phrase, marker, max_steps)
        if d is not None:
            out.append(d)
            hist[len(d.steps)] = hist.get(len(d.steps), 0) + 1
            if anchors and not d.meta["fits"]:
                out.append(anchor(d, phrase))
            elif anchors == "all":
                out.append(anchor(d, phrase, tr.steps[0].text))
    fits = sum(1 for d in out if d.meta["fits"] and not d.meta.get("anchor"))
    n_anchor = sum(1 for d in out if d.meta.get("anchor"))
    return out, {"n_in": n_in, "n_out": len(out), "skipped": n_in - len(out) + n_anchor, "fits": fits,
                 "anchors": n_anchor, "fit_share": fits / max(1, len(out) - n_anchor),
                 "steps_hist": dict(sorted(hist.items())), "fit_iou": fit_iou,
                 **({"stop_token": token, "stops": sum(d.meta["stop_step"] is not None for d in out),
                     "stop_marker": token} if token else {"phrase": phrase, "stop_marker": marker})}


def record_stop_marker(model_dir: str | Path, marker: str = MARKER) -> Path:
    """Record ``marker`` as ``"stop_marker"`` in a saved model folder's ``ivt_policy.json``
    (:func:`agents.policies.model_dir.recorded_stop_marker` reads it)."""
    path = Path(model_dir) / "ivt_policy.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no ivt_policy.json (not a saved model policy folder)")
    info = json.loads(path.read_text())
    info["stop_marker"] = marker
    path.write_text(json.dumps(info, indent=2))
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from rollouts.storage import load_trajectories, save_trajectories

    ap = argparse.ArgumentParser(prog="python -m agents.synthesis.self_distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("rollouts", nargs="?", default=".", help="a folder (or file) holding the model's own trajectories.jsonl")
    ap.add_argument("--out", default=None, help="output folder (trajectories.jsonl, config.yaml, summary.json)")
    ap.add_argument("--fit-iou", type=float, default=0.5, help="step-0 IoU at which the answer stops (default 0.5)")
    ap.add_argument("--phrase", default=PHRASE, help=f"appended to the reasoning of a fitting answer ({PHRASE!r})")
    ap.add_argument("--stop-marker", default=MARKER, help=f"the env's stop marker ({MARKER!r})")
    ap.add_argument("--max-steps", type=int, default=None, help="refinement steps kept (default: all)")
    ap.add_argument("--anchors", nargs="?", const="stop", default=None, choices=["stop", "all"],
                    help="also a box anchor per non-fitting answer (the phrase as context, its own box the target); "
                         "'all': per fitting answer too (its phrase-less text as context)")
    ap.add_argument("--stop-token", default="", metavar="TOKEN",
                    help="instead of the phrase: teach a stop TOKEN written right after the step that fits "
                         "(PromptConfig.stop_token, e.g. '<|box_end|>'); rollouts at the full budget")
    ap.add_argument("--write-marker", default=None, metavar="MODEL_DIR",
                    help="instead: record --stop-marker in a trained model folder's ivt_policy.json (evaluate's "
                         "--allow-stop then runs the env with it)")
    a = ap.parse_args(argv)
    if a.write_marker:
        return {"ivt_policy": str(record_stop_marker(a.write_marker, a.stop_marker))}
    if a.out is None:
        ap.error("--out is required (or --write-marker MODEL_DIR)")
    src = Path(a.rollouts)
    src = src / "trajectories.jsonl" if src.is_dir() else src
    trajs, summary = build(load_trajectories(src), a.fit_iou, a.phrase, a.stop_marker, a.max_steps,
                           {"stop": True, "all": "all", None: False}[a.anchors], a.stop_token)
    out = Path(a.out)
    save_trajectories(out / "trajectories.jsonl", trajs)
    steps = max(summary["steps_hist"], default=1) - 1
    (out / "config.yaml").write_text(f"steps: {steps}\nstop: true\nstop_marker: {json.dumps(summary['stop_marker'])}\n"
                                     f"source: {json.dumps(str(src))}\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
