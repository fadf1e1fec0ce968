"""Confidence stopping (issue 14): the stop rule, its calibration and how a model folder carries it."""

import json

import pytest

from agents.policies import make_policy
from agents.policies.confident_stop import ConfidentStop, answer_logprob, calibrate, main, recorded_threshold
from rollouts.policy import Policy, PolicyOutput, SamplingParams


class Scored(Policy):
    """Answers a fixed text with fixed log-probs per env row."""

    def __init__(self, logprobs):
        self.logprobs = logprobs
        self.seeded = None

    def act(self, observations, histories, infos, sampling):
        return [PolicyOutput(text="<think>Target at left.</think> [1, 2, 3, 4]", token_ids=[1] * len(lp),
                             logprobs=list(lp)) for lp in self.logprobs[: len(observations)]]

    def seed(self, seed):
        self.seeded = seed


def test_stops_at_step_zero_when_the_answer_is_likely():
    """Summed log-probs -1.5, -2.0 (= the threshold) and -2.5: the first two stop, the third refines; outputs are
    the inner policy's objects (changed in place); nothing happens without allow_stop or after step 0."""
    inner = Scored([[-1.0, -0.5], [-1.5, -0.5], [-2.0, -0.5]])
    pol = ConfidentStop(inner, threshold=-2.0)
    obs, info = [{"step": 0}] * 3, [{"allow_stop": True}] * 3
    outs = pol.act(obs, [[], [], []], info, SamplingParams(greedy=True))
    assert [o.text.endswith(" <stop>") for o in outs] == [True, True, False]
    assert [o.extra["answer_logprob"] for o in outs] == [-1.5, -2.0, -2.5]
    assert outs[0].text == "<think>Target at left.</think> [1, 2, 3, 4] <stop>"
    no_stop_env = pol.act(obs, [[], [], []], [{"allow_stop": False}] * 3, SamplingParams(greedy=True))
    later = pol.act(obs, [[outs[2]]] * 3, info, SamplingParams(greedy=True))
    assert not any("<stop>" in o.text for o in no_stop_env + later)
    pol.seed(7)  # everything but act is the inner policy's
    assert inner.seeded == 7


def test_env_stops_on_the_appended_marker():
    import gymnasium as gym
    import ivt_env  # noqa: F401

    env = gym.make("IVT-Synthetic-v0", split="val", max_refine_steps=2, allow_stop=True)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step("<think>Target at left.</think> [100, 200, 400, 600] <stop>")
    assert terminated and info["stopped"] and tuple(info["box_norm"]) == (100.0, 200.0, 400.0, 600.0)


def test_calibrate_is_the_refine_share_quantile(tmp_path):
    """Eight step-0 scores -1..-8: refine share 0.25 -> the 3rd lowest (-6): -8 and -7 refine, -6 and up stop."""
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps({"steps": [{"logprobs": [-k / 2, -k / 2]}]}) + "\n" for k in range(1, 9)))
    assert calibrate(path, 0.25) == -6.0 and calibrate(path, 0.0) == -8.0
    assert answer_logprob({"logprobs": [-1.0, -2.5]}) == -3.5 and answer_logprob({"logprobs": None}) is None
    with pytest.raises(ValueError, match="refine_share"):
        calibrate(path, 1.0)
    with pytest.raises(ValueError, match="confident_stop must be a finite number"):
        ConfidentStop(Scored([]), float("nan"))


def test_model_folder_records_the_threshold(tmp_path, tiny_q3):
    """--write records it in ivt_policy.json; make_policy(folder) then wraps; confident_stop=None turns it off."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_q3, folder)
    if not (folder / "ivt_policy.json").is_file():
        (folder / "ivt_policy.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "trajectories.jsonl").write_text(json.dumps({"steps": [{"logprobs": [-3.25]}]}) + "\n")
    assert main([str(evals), "--refine-share", "0.5", "--write", str(folder)]) == -3.25
    assert recorded_threshold(folder) == -3.25 and recorded_threshold(tmp_path / "none") is None
    wrapped = make_policy(str(folder), device="cpu")
    assert isinstance(wrapped, ConfidentStop) and wrapped.threshold == -3.25
    assert not isinstance(make_policy(str(folder), device="cpu", confident_stop=None), ConfidentStop)
