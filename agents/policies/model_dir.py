"""Where the model of a user-given folder lies: a model folder, a run's ``best/`` / ``final/``, a checkpoint
``checkpoints/iter_N/`` (the model in its ``policy/``) or a whole run folder (its ``best/``).

A path that does not exist is a clear :class:`FileNotFoundError` naming it, instead of the Hugging Face Hub's
"Repo id must use alphanumeric chars" that a missing folder turns into; a bare ``org/name`` is left to the Hub
(cache) as before.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODEL_FILES = ("config.json", "adapter_config.json")
_RUN_PARTS = {"best", "final", "policy", "base"}


def _is_model(p: Path) -> bool:
    return any((p / f).is_file() for f in _MODEL_FILES)


def resolve_model_dir(path: str | os.PathLike, option: str = "--model") -> str:
    """The folder to load for ``path`` (see the module docstring); ``option`` names the flag in errors."""
    given = str(path)
    p = Path(given).expanduser()
    if not p.exists():
        if _REPO_ID.match(given) and not given.startswith((".", "~")):
            return given  # a hub name: the Hub (or its local cache) resolves it
        raise FileNotFoundError(f"{option} {given}: no such model folder")
    if not p.is_dir():
        raise FileNotFoundError(f"{option} {given}: not a folder (give a model folder, a run's best/ or final/, or "
                                "a checkpoints/iter_N/ folder)")
    for cand in (p, p / "policy", p / "best", p / "best" / "policy", p / "final"):
        if _is_model(cand):
            return str(cand)
    if (p / "trainable.pt").is_file():
        raise FileNotFoundError(f"{option} {given}: this checkpoint holds only the trained tensors (behaviour "
                                "cloning checkpoints do): give the run's best/ or final/ folder")
    raise FileNotFoundError(f"{option} {given}: not a model folder (no config.json or adapter_config.json in it, "
                            "in its policy/, best/ or final/)")


def model_label(path: str | os.PathLike) -> str:
    """A short table label for a model path: ``grpo_run/best``, ``bc_run/iter_000040``, ``tiny-ivt-bc``."""
    parts = [x for x in Path(str(path)).parts if x not in ("/", "")]
    if not parts:
        return str(path)
    keep = 1
    while keep < len(parts) and (parts[-keep] in _RUN_PARTS or parts[-keep].startswith("iter_")
                                 or parts[-keep] == "checkpoints"):
        keep += 1
    return "/".join(p for p in parts[-keep:] if p not in ("checkpoints", "policy"))


def recorded_stop_marker(path: str | os.PathLike) -> str | None:
    """The env stop marker a model folder was trained to write (``"stop_marker"`` in its ``ivt_policy.json``, e.g.
    ``"fits."`` for a model that stops with its own words, issue 14); None when none is recorded or the path is not
    a local folder. ``python -m agents.evaluate --model DIR --allow-stop`` runs the env with it unless
    ``--env-kwargs`` names one."""
    import json

    f = Path(str(path)) / "ivt_policy.json"
    if not f.is_file():
        return None
    value = json.loads(f.read_text()).get("stop_marker")
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{f}: stop_marker must be a non-empty string, got {value!r}")
    return value


def with_recorded_stop_marker(env_kwargs: dict, path: str | os.PathLike) -> dict:
    """``env_kwargs`` with the model folder's recorded ``stop_marker`` (:func:`recorded_stop_marker`) added when the
    env stops (``allow_stop``) and names no marker of its own; otherwise ``env_kwargs`` as given."""
    if not env_kwargs.get("allow_stop") or "stop_marker" in env_kwargs:
        return env_kwargs
    marker = recorded_stop_marker(path)
    return env_kwargs if marker is None else {**env_kwargs, "stop_marker": marker}
