"""The one env builder every command uses (CleanRL's ``make_env`` thunk): GRPO, behaviour cloning, evaluation and
teacher synthesis all build their envs here, so an env id, a split and a reward mean the same thing everywhere.

>>> import ivt_env
>>> thunk = ivt_env.make_env("IVT-Synthetic-v0", split="val", max_refine_steps=1, shared_dataset=True)
>>> envs = [thunk() for _ in range(2)]
>>> envs[0].unwrapped.dataset is envs[1].unwrapped.dataset      # the split is loaded once
True
>>> envs[0].unwrapped.max_refine_steps
1
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import gymnasium as gym

from ivt_env.datasets.base import GroundingDataset
from ivt_env.rewards import RewardFn


def load_env_dataset(env_id: str, split: str = "train", data_root: Optional[str] = None,
                     dataset_kwargs: Optional[Mapping[str, Any]] = None) -> GroundingDataset:
    """The dataset behind ``env_id`` for ``split``, built once so that several envs can share it."""
    import ivt_env

    key = env_id.split(":")[-1]
    name = ivt_env.ENV_DATASETS.get(key) or ivt_env.MULTI_ENV_DATASETS.get(key)
    if name is None:  # an env id registered elsewhere: build it once and take its dataset
        env = make_env(env_id, split=split, data_root=data_root, dataset_kwargs=dataset_kwargs)()
        try:
            return env.unwrapped.dataset
        finally:
            env.close()
    from ivt_env.datasets import load_dataset

    return load_dataset(name, split, data_root=data_root, **dict(dataset_kwargs or {}))


def make_env(
    env_id: str,
    *,
    split: str = "train",
    max_refine_steps: int = 2,
    reward_fn: Union[str, RewardFn, None] = None,
    data_root: Optional[str] = None,
    dataset: Optional[GroundingDataset] = None,
    dataset_kwargs: Optional[Mapping[str, Any]] = None,
    shared_dataset: bool = False,
    **env_kwargs: Any,
) -> Callable[[], gym.Env]:
    """A zero-argument constructor of ``env_id`` (a registered IVT env or any ``module:Id``).

    ``dataset``: a dataset object every env built by the thunk shares (``split``/``data_root``/``dataset_kwargs``
    then do not apply). ``shared_dataset=True`` loads the split once, now, and shares it the same way (a vector of
    envs or an evaluation collector then reads the data once and reports bad records once). Other keyword
    arguments go to :class:`~ivt_env.env.GroundingRefineEnv` (``overlay``, ``render_mode``, ...) or to
    ``gym.make`` (``disable_env_checker``).
    """
    import ivt_env  # noqa: F401  (registers the ids: gymnasium 1.x no longer loads entry points)

    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env id must be a non-empty string, got {env_id!r}")
    if env_id.split(":")[-1] not in gym.registry and ":" not in env_id:
        known = sorted(k for k in gym.registry if k.startswith("IVT-"))
        raise ValueError(f"unknown env id {env_id!r}; known: {known} (or 'module:EnvId' for one registered elsewhere)")
    if dataset is None and shared_dataset:
        dataset = load_env_dataset(env_id, split, data_root, dataset_kwargs)
    kwargs: dict[str, Any] = {"max_refine_steps": max_refine_steps, **env_kwargs}
    if reward_fn is not None:
        kwargs["reward_fn"] = reward_fn
    if dataset is not None:
        kwargs["dataset"] = dataset
    else:
        kwargs["split"] = split
        if data_root:
            kwargs["data_root"] = data_root
        if dataset_kwargs:
            kwargs["dataset_kwargs"] = dict(dataset_kwargs)

    def thunk() -> gym.Env:
        return gym.make(env_id, **kwargs)

    return thunk
