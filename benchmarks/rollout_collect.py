"""Collector throughput with OraclePolicy on IVT-Synthetic-v0 (T=2), and its overhead over bare ``env.step``.

Each round times, on the same samples (rounds interleave the variants; the fastest round of each is reported):

- ``bare``: a hand loop ``env.reset(options={"index": i})`` + T+1 ``env.step(text)`` with the oracle's texts
  computed beforehand (the env's own cost: the floor);
- ``policy``: ``OraclePolicy.act`` alone on the same observations (what any collection loop must pay for it);
- ``collector_single``: :func:`rollouts.collector.collect_groups` with one env;
- ``collector_list``: with a list of ``--num-envs`` envs (lock-step batches of that size);
- ``collector_vector``: with ``gymnasium.make_vec(..., vectorization_mode="sync")`` of ``--num-envs`` envs.

``overhead_us_per_step`` = (collector_single - bare - policy) / number of steps: what the collector itself adds to
every env step (building Steps, batching, info annotation). ``overhead_vs_env_step`` divides it by the bare
env's time per step (the reset is counted apart). As a difference of two larger timings it is sensitive to machine
load; ``overhead_us_per_step_recorded_env`` measures the same on an env that replays recorded observations at
near-zero cost (collector on it, minus a hand loop on it, minus the policy), which isolates the collector's own
code; ``overhead_recorded_env_share_of_bare_trajectory`` relates it to a whole bare episode (reset + T+1 steps).
``collector_vector_env_copy_false`` passes ``vector_kwargs={"copy": False}`` to ``make_vec`` (no deep copy
of the batched observations at every reset/step).

    python benchmarks/rollout_collect.py [--samples 64] [--num-envs 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gymnasium as gym  # noqa: E402

import ivt_env  # noqa: E402,F401  (registers the env ids)
from ivt_env.wrappers import close_vector_env  # noqa: E402
from agents.policies.base import SamplingParams  # noqa: E402
from agents.policies.scripted import OraclePolicy  # noqa: E402
from rollouts.collector import Collector  # noqa: E402

ENV_ID, T = "IVT-Synthetic-v0", 2
SAMPLING = SamplingParams(greedy=True)


def make_env():
    return gym.make(ENV_ID, split="test", max_refine_steps=T)


class RecordedEnv(gym.Env):
    """Replays the (obs, info) of real episodes at near-zero cost: isolates the collector's own per-step cost."""

    def __init__(self, episodes):
        self.episodes, self.max_refine_steps = episodes, T
        self.observation_space = self.action_space = gym.spaces.Discrete(1)  # unused: never checked here

    def reset(self, *, seed=None, options=None):
        self._ep, self._t = self.episodes[options["index"]], 0
        return self._ep[0]

    def step(self, action):
        self._t += 1
        obs, info = self._ep[self._t]
        return obs, info["reward"], self._t == T + 1, False, info


def _bare(env, indices, texts) -> tuple[float, float]:
    """(seconds in resets, seconds in steps) of the hand loop."""
    reset_s = step_s = 0.0
    for i in indices:
        t0 = time.perf_counter()
        env.reset(options={"index": i})
        t1 = time.perf_counter()
        for text in texts[i]:
            env.step(text)
        step_s += time.perf_counter() - t1
        reset_s += t1 - t0
    return reset_s, step_s


def _policy(policy, batches) -> float:
    t0 = time.perf_counter()
    for obs, infos in batches:
        policy.act(obs, [[] for _ in obs], infos, SAMPLING)
    return time.perf_counter() - t0


def _collect(collector, policy, indices) -> float:
    t0 = time.perf_counter()
    collector.collect(policy, indices, 1, SAMPLING)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="trajectories per measurement (one per sample)")
    parser.add_argument("--num-envs", type=int, default=8, help="env slots of the list / vector collectors")
    parser.add_argument("--repeats", type=int, default=7, help="measurement rounds; the fastest of each is reported")
    args = parser.parse_args(argv)

    indices = list(range(args.samples))
    policy = OraclePolicy()
    env = make_env()
    # the oracle's texts and the observations it sees, computed once outside the timed loops
    texts, batches, episodes = {}, [], {}
    for i in indices:
        obs, info = env.reset(options={"index": i})
        texts[i], per_step, episodes[i] = [], [], [(obs, info)]
        for t in range(T + 1):
            info = dict(info, group_member=0, max_steps=T)
            out = policy.act([obs], [[]], [info], SAMPLING)[0]
            per_step.append((obs, info))
            texts[i].append(out.text)
            obs, reward, _, _, info = env.step(out.text)
            episodes[i].append((obs, dict(info, reward=reward)))
        batches.extend(([o], [f]) for o, f in per_step)
    recorded = RecordedEnv(episodes)

    single = Collector([env])
    listed = Collector([make_env() for _ in range(args.num_envs)])
    vec = gym.make_vec(ENV_ID, num_envs=args.num_envs, vectorization_mode="sync", split="test", max_refine_steps=T)
    vector = Collector(vec)
    vec_nocopy = gym.make_vec(ENV_ID, num_envs=args.num_envs, vectorization_mode="sync", split="test",
                              max_refine_steps=T, vector_kwargs={"copy": False})
    vector_nocopy = Collector(vec_nocopy)
    null = Collector([recorded])
    for c in (single, listed, vector, vector_nocopy, null):  # warm-up (first vector reset, caches)
        _collect(c, policy, indices[:4])

    rows = []
    for _ in range(args.repeats):
        reset_s, step_s = _bare(env, indices, texts)
        null_reset_s, null_step_s = _bare(recorded, indices, texts)
        rows.append({"reset": reset_s, "step": step_s, "policy": _policy(policy, batches),
                     "single": _collect(single, policy, indices), "list": _collect(listed, policy, indices),
                     "vector": _collect(vector, policy, indices),
                     "vector_nocopy": _collect(vector_nocopy, policy, indices),
                     "null_loop": null_reset_s + null_step_s, "null_collect": _collect(null, policy, indices)})
    # the minimum over rounds: load from other processes only ever adds time (timeit's advice)
    med = {k: min(r[k] for r in rows) for k in rows[0]}
    n, n_steps = len(indices), len(indices) * (T + 1)
    bare = med["reset"] + med["step"]
    overhead = (med["single"] - bare - med["policy"]) / n_steps
    # same, on the recorded env whose own cost is near zero: far less sensitive to machine load
    overhead_null = (med["null_collect"] - med["null_loop"] - med["policy"]) / n_steps
    result = {
        "env": ENV_ID, "T": T, "samples": n, "num_envs": args.num_envs, "repeats": args.repeats,
        "trajectories_per_s": {
            "bare_env_loop": round(n / bare, 1),
            "collector_single_env": round(n / med["single"], 1),
            "collector_list_envs": round(n / med["list"], 1),
            "collector_vector_env": round(n / med["vector"], 1),
            "collector_vector_env_copy_false": round(n / med["vector_nocopy"], 1),
        },
        "bare_env_us_per_step": round(1e6 * med["step"] / n_steps, 2),
        "bare_env_us_per_reset": round(1e6 * med["reset"] / n, 2),
        "policy_us_per_step": round(1e6 * med["policy"] / n_steps, 2),
        "overhead_us_per_step": round(1e6 * overhead, 2),
        "overhead_vs_env_step": round(overhead / (med["step"] / n_steps), 3),
        "overhead_us_per_step_recorded_env": round(1e6 * overhead_null, 2),
        "overhead_recorded_env_vs_env_step": round(overhead_null / (med["step"] / n_steps), 3),
        "overhead_recorded_env_share_of_bare_trajectory": round(overhead_null * n_steps / bare, 4),
        "collector_single_vs_bare_loop": round(med["single"] / (bare + med["policy"]), 3),
    }
    for c in (single, listed, vector, vector_nocopy, null):
        c.close()
    close_vector_env(vec)  # robust: a dead worker must not leave the others running
    close_vector_env(vec_nocopy)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
