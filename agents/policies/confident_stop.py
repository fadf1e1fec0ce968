"""Confidence stopping (issue 14): a model policy stops at step 0 when its own answer is likely enough.

The stop decision is the model's summed log-probability of its step-0 answer (every generated token: reasoning and
box), thresholded: at or above ``threshold`` the step's text gets the env's stop marker appended (``"... [x1, y1,
x2, y2] <stop>"``, the env stops on the marker anywhere in the text) and the episode ends with that box; below it the
model refines as it always did, up to the budget T. No weight changes, so the step-0 box is exactly the model's.

A rule, not a trained stop: the shipped ``assets/tiny-ivt-adaptive`` is trained to write a stop token right after
a box that fits (``PromptConfig.stop_token``, its README). This rule needs no training and works for any model
folder; the log-probability separates right from wrong step-0 boxes (val AUC 0.76 for IoU >= 0.5 on the tiny model),
while a stop text taught BEFORE the box moved the boxes written after it (measured: the asset's README, "History").

``threshold`` is calibrated on the VAL split (:func:`calibrate`): the ``refine_share`` quantile of the step-0
log-probabilities of the model's own greedy val trajectories, so about that share of episodes refines.
``python -m agents.policies.confident_stop EVAL_DIR --refine-share 0.25 [--write MODEL_DIR]`` prints it and can
record it in a model folder's ``ivt_policy.json`` (``"confident_stop"``), which loading that folder as a policy
(``--model DIR``) then applies; ``--policy-kwargs '{"confident_stop": null}'`` turns it off again.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from rollouts.policy import Policy, PolicyOutput, SamplingParams

FIELD = "confident_stop"  # the ivt_policy.json key and the policy keyword


def answer_logprob(output: Any) -> Optional[float]:
    """The summed log-probability of a step's generated tokens (None when the step carries none)."""
    lps = getattr(output, "logprobs", None) if not isinstance(output, Mapping) else output.get("logprobs")
    return float(sum(lps)) if lps else None


class ConfidentStop(Policy):
    """Wraps a policy whose outputs carry token log-probs; in a stopping env (``info["allow_stop"]``), a step-0
    answer with ``answer_logprob >= threshold`` gets `` {marker}`` appended. Outputs are changed in place (the VLM
    policy finds its engine rows by the identity of the outputs it returned); everything else is the inner policy's.
    ``extra["answer_logprob"]`` records the score of every step-0 answer."""

    def __init__(self, inner: Policy, threshold: float, marker: str = "<stop>"):
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"{FIELD} must be a finite number (a summed log-probability), got {threshold!r}")
        if not isinstance(marker, str) or not marker.strip():
            raise ValueError(f"{FIELD}: the stop marker must be a non-empty string, got {marker!r}")
        self.inner, self.threshold, self.marker = inner, float(threshold), marker
        self.name = f"{getattr(inner, 'name', 'policy')}+{FIELD}"

    def __getattr__(self, attr: str) -> Any:  # seed, save, engine, tokenizer, ...: the inner policy's
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def seed(self, seed: Optional[int]) -> None:  # Policy defines seed, so __getattr__ would not reach it
        self.inner.seed(seed)

    def act(self, observations: Sequence[Mapping[str, Any]], histories: Sequence[Sequence[PolicyOutput]],
            infos: Sequence[Mapping[str, Any]], sampling: SamplingParams) -> list[PolicyOutput]:
        outs = self.inner.act(observations, histories, infos, sampling)
        for out, hist, info in zip(outs, histories, infos):
            if len(hist) != 0 or not info.get("allow_stop"):
                continue
            score = answer_logprob(out)
            if score is None:
                raise ValueError(f"{FIELD}: the policy's step-0 output carries no log-probs to score")
            out.extra = dict(out.extra or {}, answer_logprob=score)
            if score >= self.threshold and self.marker not in out.text:
                out.text = f"{out.text} {self.marker}"
        return outs


def recorded_threshold(model: Any) -> Optional[float]:
    """The ``confident_stop`` threshold recorded in a model folder's ``ivt_policy.json`` (None: none recorded, or
    not a local folder)."""
    path = Path(str(model)) / "ivt_policy.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get(FIELD)
    return None if value is None else float(value)


def calibrate(trajectories: str | Path, refine_share: float) -> float:
    """The threshold at which ``refine_share`` of the episodes in an ``agents.evaluate`` ``trajectories.jsonl``
    (the model's own greedy rollouts, val split) score below it: their step-0 answers' log-probability quantile."""
    if not 0.0 <= refine_share < 1.0:
        raise ValueError(f"refine_share must be in [0, 1), got {refine_share}")
    scores = []
    with open(trajectories) as f:
        for line in f:
            if line.strip():
                score = answer_logprob(json.loads(line)["steps"][0])
                if score is None:
                    raise ValueError(f"{trajectories}: a step 0 without logprobs (not a model policy's rollout)")
                scores.append(score)
    if not scores:
        raise ValueError(f"{trajectories}: no trajectories")
    scores.sort()
    return scores[min(len(scores) - 1, int(math.floor(refine_share * len(scores))))]


def main(argv: Optional[Sequence[str]] = None) -> float:
    ap = argparse.ArgumentParser(prog="python -m agents.policies.confident_stop",
                                 description="Calibrate the confidence-stop threshold on a model's val rollouts.")
    ap.add_argument("eval_dir", help="an agents.evaluate --out folder of the model (its trajectories.jsonl)")
    ap.add_argument("--refine-share", type=float, default=0.25, help="share of episodes that should refine")
    ap.add_argument("--write", default=None, help="a model folder: record the threshold in its ivt_policy.json")
    args = ap.parse_args(argv)
    tau = calibrate(Path(args.eval_dir) / "trajectories.jsonl", args.refine_share)
    print(f"{FIELD}: {tau:.4f} (refine share {args.refine_share})")
    if args.write:
        path = Path(args.write) / "ivt_policy.json"
        if not path.is_file():
            raise FileNotFoundError(f"--write {args.write}: no ivt_policy.json (not a saved model policy folder)")
        info = json.loads(path.read_text())
        info[FIELD] = round(tau, 4)
        path.write_text(json.dumps(info, indent=2))
        print(f"wrote {path}")
    return tau


if __name__ == "__main__":
    main()


__all__ = ["ConfidentStop", "FIELD", "answer_logprob", "calibrate", "main", "recorded_threshold"]
