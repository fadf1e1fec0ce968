"""Wrappers for :class:`ivt_env.env.GroundingRefineEnv`: reward shaping and per-episode IoU records.

A per-refinement-step cost for adaptive refinement: :class:`StepCost` (or the env's ``step_cost=``).

Reward shaping two ways (same numbers, pick whichever fits the code around it):

- as the env's reward: ``gym.make("IVT-Synthetic-v0", reward_fn="shaped")`` (replaces Eq. 3);
- as a wrapper on top of the env's reward: ``ShapedRewardWrapper(env, shaping="shaped", scale=0.5)`` gives
  ``r_env + 0.5 * shaped``; with ``shaping="dense"`` it adds potential-based shaping (potential = IoU), which
  leaves the optimal policy unchanged (Ng et al. 1999) while paying for improvement at every step.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Optional, Union

import gymnasium as gym

from ivt_env.rewards import RewardFn, call_reward, get_reward, reward_extras, reward_name

log = logging.getLogger(__name__)


class ShapedRewardWrapper(gym.Wrapper):
    """Adds ``scale * shaping(ious, valids, step=..., max_steps=...)`` to the env's reward.

    ``shaping`` is any reward callable or name (:func:`ivt_env.rewards.get_reward`). The inner env's reward is kept
    in ``info["base_reward"]`` and the added term in ``info["shaping_reward"]``. A plain ``gym.Wrapper`` (not a
    ``RewardWrapper``, whose ``reward(r)`` sees only the reward): the shaping reads the step's IoUs from ``info``
    and adds keys to it.

    >>> import ivt_env
    >>> env = ShapedRewardWrapper(gym.make("IVT-Synthetic-v0", max_refine_steps=1), shaping="dense", scale=0.5)
    >>> _ = env.reset(seed=0)
    >>> _, r, _, _, info = env.step("[0, 0, 1000, 1000]")
    >>> r == info["base_reward"] + info["shaping_reward"]
    True
    >>> info["shaping_reward"] == 0.5 * ivt_env.get_reward("dense")(info["ious"], info["valids"], step=0, max_steps=1)
    True
    """

    def __init__(self, env: gym.Env, shaping: Union[str, RewardFn] = "shaped", scale: float = 1.0):
        super().__init__(env)
        self.shaping = get_reward(shaping)
        self._extras = reward_extras(self.shaping)
        self.scale = float(scale)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        extra = self.shaping_reward(info)
        info = dict(info, base_reward=float(reward), shaping_reward=extra)
        return obs, float(reward) + extra, terminated, truncated, info

    def shaping_reward(self, info: dict[str, Any]) -> float:
        """``scale * shaping(...)`` for the step ``info`` describes."""
        T = info.get("max_steps", self.env.unwrapped.max_refine_steps)
        extra = call_reward(self.shaping, self._extras, info["ious"], info["valids"], step=info["step"], max_steps=T,
                            boxes=info.get("boxes_norm"))
        return self.scale * float(extra)

    def __repr__(self) -> str:
        return f"<ShapedRewardWrapper{self.env} shaping={reward_name(self.shaping)} scale={self.scale}>"


class StepCost(gym.RewardWrapper):
    """Adaptive refinement: ``cost`` off the reward of every refinement step (``info["step"] >= 1``; step 0 is the
    answer itself), so a policy that may stop (``allow_stop=True``) pays for each step it takes. The same numbers as
    the env's own ``step_cost=cost``; a ``RewardWrapper`` whose ``reward`` also reads the step index of the last
    ``step`` (the base class passes only the reward).

    >>> import ivt_env
    >>> env = StepCost(gym.make("IVT-Synthetic-Adaptive-v0", max_refine_steps=2), cost=0.05)
    >>> _ = env.reset(seed=0)
    >>> env.step("[0, 0, 10, 10]")[1]                  # step 0: no cost (IVT Eq. 3 pays 0 before the end)
    0.0
    >>> _, r, terminated, _, info = env.step("<stop> [0, 0, 1000, 1000]")
    >>> terminated, info["steps_used"], round(r - (info["iou"] + 0.1 * 2 / 2), 6)   # Eq. 3 at the stop, - 0.05
    (True, 1, -0.05)
    """

    def __init__(self, env: gym.Env, cost: float = 0.01):
        super().__init__(env)
        if not isinstance(cost, (int, float)) or cost != cost or cost < 0:
            raise ValueError(f"StepCost: cost must be a number >= 0, got {cost!r}")
        self.cost = float(cost)
        self._refining = False

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._refining = int(info.get("step", 0)) >= 1
        return obs, self.reward(reward), terminated, truncated, info

    def reward(self, reward: float) -> float:
        return float(reward) - (self.cost if self._refining else 0.0)


class RecordStepIoUs(gym.Wrapper):
    """Records each finished episode's per-step IoUs, validity and return.

    At the end of an episode ``info["episode"] = {"ious", "valids", "return", "length", "sample_id", "delta"}``
    (``delta`` = final IoU minus step-0 IoU, the quantity behind the paper's improve / stagnate / degrade rates),
    and the record is appended to :attr:`history` (the last ``maxlen`` episodes). Like Gymnasium's
    ``RecordEpisodeStatistics`` it only adds to ``info``, hence a plain ``gym.Wrapper``.

    >>> import ivt_env
    >>> env = RecordStepIoUs(gym.make("IVT-Synthetic-v0", max_refine_steps=1))
    >>> _ = env.reset(seed=0)
    >>> _ = env.step("[0, 0, 10, 10]")
    >>> *_, info = env.step("[0, 0, 1000, 1000]")
    >>> info["episode"]["length"], len(env.history)
    (2, 1)
    """

    def __init__(self, env: gym.Env, maxlen: int = 1000):
        super().__init__(env)
        self.history: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._return = 0.0

    def reset(self, **kwargs):
        self._return = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._return += float(reward)
        if terminated or truncated:
            ious = list(info["ious"])
            record = {
                "sample_id": info["sample_id"],
                "ious": ious,
                "valids": list(info["valids"]),
                "return": self._return,
                "length": len(ious),
                "delta": ious[-1] - ious[0],
            }
            self.history.append(record)
            info = dict(info, episode=dict(record))
        return obs, reward, terminated, truncated, info


def close_vector_env(vec: Any, timeout: float = 5.0) -> None:
    """Close a vector env even when one of its workers died, and leave no worker process behind.

    Gymnasium's ``AsyncVectorEnv.close`` sends every worker "close" and then waits for each answer: a dead worker's
    pipe raises (BrokenPipeError / EOFError), ``close`` stops there and the live workers are never joined. Here a
    failed close is logged (one line naming the exit codes), every worker still alive is terminated (killed after
    ``timeout`` seconds), every pipe is closed and the env is marked closed, so its finaliser does not try again.
    Any other env (sync vector env, plain env) is simply closed.
    """
    try:
        vec.close()
        return
    except Exception as e:  # noqa: BLE001 - the cleanup below must run whatever the close raised
        error = e
    processes = list(getattr(vec, "processes", []) or [])
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(timeout)
    for pipe in getattr(vec, "parent_pipes", []) or []:
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass
    try:
        vec.closed = True
    except AttributeError:
        pass
    codes = [p.exitcode for p in processes]
    log.warning("%s: close failed (%s: %s); stopped its %d workers (exit codes %s)",
                type(vec).__name__, type(error).__name__, error, len(processes), codes)
