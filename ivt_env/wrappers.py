"""Wrappers for :class:`ivt_env.env.GroundingRefineEnv`: reward shaping and per-episode IoU records.

Reward shaping two ways (same numbers, pick whichever fits the code around it):

- as the env's reward: ``gym.make("IVT-Synthetic-v0", reward_fn="shaped")`` (replaces Eq. 3);
- as a wrapper on top of the env's reward: ``ShapedRewardWrapper(env, shaping="shaped", scale=0.5)`` gives
  ``r_env + 0.5 * shaped``; with ``shaping="dense"`` it adds potential-based shaping (potential = IoU), which
  leaves the optimal policy unchanged (Ng et al. 1999) while paying for improvement at every step.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional, Union

import gymnasium as gym

from ivt_env.rewards import RewardFn, call_reward, get_reward, reward_extras, reward_name


class ShapedRewardWrapper(gym.RewardWrapper):
    """Adds ``scale * shaping(ious, valids, step=..., max_steps=...)`` to the env's reward.

    ``shaping`` is any reward callable or name (:func:`ivt_env.rewards.get_reward`). The inner env's reward is kept
    in ``info["base_reward"]`` and the added term in ``info["shaping_reward"]``.
    """

    def __init__(self, env: gym.Env, shaping: Union[str, RewardFn] = "shaped", scale: float = 1.0):
        super().__init__(env)
        self.shaping = get_reward(shaping)
        self._extras = reward_extras(self.shaping)
        self.scale = float(scale)
        self._info: Optional[dict[str, Any]] = None

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._info = info
        shaped = self.reward(reward)
        info = dict(info, base_reward=float(reward), shaping_reward=shaped - float(reward))
        return obs, shaped, terminated, truncated, info

    def reward(self, reward: float) -> float:
        info = self._info
        if info is None:
            raise RuntimeError("ShapedRewardWrapper.reward needs the step's info: call step()")
        T = info.get("max_steps", self.env.unwrapped.max_refine_steps)
        extra = call_reward(self.shaping, self._extras, info["ious"], info["valids"], step=info["step"], max_steps=T,
                            boxes=info.get("boxes_norm"))
        return float(reward) + self.scale * float(extra)

    def __repr__(self) -> str:
        return f"<ShapedRewardWrapper{self.env} shaping={reward_name(self.shaping)} scale={self.scale}>"


class RecordStepIoUs(gym.Wrapper):
    """Records each finished episode's per-step IoUs, validity and return.

    At the end of an episode ``info["episode"] = {"ious", "valids", "return", "length", "sample_id", "delta"}``
    (``delta`` = final IoU minus step-0 IoU, the quantity behind the paper's improve / stagnate / degrade rates),
    and the record is appended to :attr:`history` (the last ``maxlen`` episodes).
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
