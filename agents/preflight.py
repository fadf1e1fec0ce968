"""Names and paths of a run checked before any work: a typo in --advantage, --reward, --policy, an env id, a model
or data folder fails in the first second with one line naming the option, not after the model loaded, the first
validation ran and a rollout was collected (and without leaving a run folder behind).

Each check raises ``ValueError("{where}: ...")`` (``where`` is the caller's config prefix, e.g. "GRPO config", which
its CLI prints as one line) or ``FileNotFoundError`` naming the folder.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional


def check_env_id(env_id: str, where: str, option: str = "--env-id") -> None:
    import gymnasium as gym

    import ivt_env  # noqa: F401  (registers the IVT ids)

    name = env_id
    if ":" in env_id:  # "module:Env-v0": gym.make imports the module first; so do we
        module, _, name = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"{where}: {option} {env_id!r}: cannot import module {module!r}: {e}") from None
    try:
        gym.spec(name)
    except gym.error.Error as e:
        ivt = ", ".join(k for k in gym.registry if k.startswith("IVT-"))
        raise ValueError(f"{where}: {option} {env_id!r} is not a registered env id ({e}); IVT envs: {ivt}") from None


def check_reward(spec: Optional[str], where: str, option: str = "--reward") -> None:
    from ivt_env.rewards import get_reward

    try:
        get_reward(spec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {option}: {e}") from None


def check_advantage(name: str, where: str, option: str = "--advantage") -> None:
    from agents.grpo.advantages import get_advantage

    try:
        get_advantage(name)
    except ValueError as e:
        raise ValueError(f"{where}: {option}: {e}") from None


def check_policy(name: str, where: str, option: str = "--policy") -> None:
    """A built-in policy name, a model folder or an importable ``pkg.mod:Class`` (nothing is built)."""
    from agents.policies import POLICIES
    from ivt_env.registries import import_object, is_import_path

    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: {option} must be a policy name, got {name!r}")
    if name.lower() in POLICIES or os.path.isdir(name):
        return
    if is_import_path(name):
        try:
            import_object(name, kind="policy")
        except ValueError as e:
            raise ValueError(f"{where}: {option}: {e}") from None
        return
    raise ValueError(f"{where}: {option}: unknown policy {name!r}; known: {POLICIES.names()}, a model folder or "
                     "an import path 'package.module:ClassName'")


def check_folder(path: Optional[str], option: str, what: str = "folder") -> None:
    if path and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"{option} {path}: no such {what}")


def check_file(path: Optional[str], option: str, search_configs: bool = True) -> None:
    """A YAML file given as a path or a name inside the project's configs/ folder."""
    if not path:
        return
    from agents.common.config import resolve_config_path

    if os.path.isfile(os.path.expanduser(path)):
        return
    try:
        if search_configs:
            resolve_config_path(path)
            return
    except FileNotFoundError:
        pass
    raise FileNotFoundError(f"{option} {path}: no such file")


def check_grpo(cfg: Any) -> None:
    """Everything of a GRPO config that names something: env id, reward, advantage, policy, data folder."""
    where = "GRPO config"
    check_env_id(cfg.env_id, where)
    check_reward(cfg.reward, where)
    check_advantage(cfg.advantage, where)
    check_policy(cfg.policy, where)
    check_folder(cfg.data_root, "--data-root", "data folder")


def check_bc(cfg: Any) -> None:
    """Everything of a BC config that names something: env id, start model, teacher-data folder, prompts file."""
    where = "bc config"
    check_env_id(cfg.synth.env, where, "--synth.env")
    if cfg.synth.student != "scripted":  # the synthesizer's own offline student, not a policy name
        check_policy(cfg.synth.student, where, "--synth.student")
    check_folder(cfg.synth.data_root, "--synth.data-root", "data folder")
    if cfg.data != "online":
        check_folder(cfg.data, "--data", "teacher-data folder (write one with `python -m agents.synthesis`)")
    if cfg.init_from != "tiny":
        from agents.policies.model_dir import resolve_model_dir

        try:
            resolve_model_dir(cfg.init_from, "--init-from")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} (use 'tiny' for a fresh tiny model)") from None
    check_file(cfg.prompts, "--prompts")


def check_synthesis(cfg: Any) -> None:
    where = "synthesis config"
    check_env_id(cfg.env, where, "--env")
    if cfg.student != "scripted":
        check_policy(cfg.student, where, "--student")
    check_folder(cfg.data_root, "--data-root", "data folder")
