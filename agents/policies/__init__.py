"""Policies by name: ``make_policy("oracle", noise=20)``, ``make_policy("my_pkg.mod:MyPolicy", **kw)``.

Built-in names (scripted ones need no model):

- ``oracle``  -> :class:`agents.policies.scripted.OraclePolicy` (``noise``, ``resample``, ``seed``)
- ``copy``    -> :class:`agents.policies.scripted.CopyPolicy` (``first``, ``first_kwargs``, ``first_noise``)
- ``random``  -> :class:`agents.policies.scripted.RandomPolicy` (``min_side``, ``invalid_rate``)
- ``replay``  -> :class:`agents.policies.scripted.ReplayPolicy` (``path``: JSONL of step texts)
- ``teacher`` -> :class:`agents.policies.scripted.InterpolatingTeacher` (``steps``, ``start_boxes``, ...)
- ``vlm``     -> ``agents.policies.vlm.VLMPolicy.from_pretrained(model, **rest)`` (imported only when asked for;
  ``model`` (or ``path``) is the model folder). A path to an existing folder is also taken as ``vlm``. A folder
  whose ``ivt_policy.json`` records ``confident_stop`` (or the keyword ``confident_stop=X``) is wrapped in
  :class:`agents.policies.confident_stop.ConfidentStop` (adaptive refinement: stop when the answer is likely).

Anything else of the form ``package.module:ClassName`` (or ``package.module.ClassName``) is imported and called
with the keyword arguments; it must return an object with an ``act`` method (the :class:`Policy` interface).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from ivt_env.registries import Registry, import_object, is_import_path
from rollouts.policy import Policy, PolicyOutput, SamplingParams

POLICIES: Registry = Registry("policy")  # entries are import paths, imported on first use (vlm pulls transformers)
POLICIES.register("oracle", "agents.policies.scripted:OraclePolicy")
POLICIES.register("copy", "agents.policies.scripted:CopyPolicy")
POLICIES.register("random", "agents.policies.scripted:RandomPolicy")
POLICIES.register("replay", "agents.policies.scripted:ReplayPolicy")
POLICIES.register("teacher", "agents.policies.scripted:InterpolatingTeacher")
POLICIES.register("vlm", "agents.policies.vlm:VLMPolicy")
register_policy = POLICIES.register


def _make_vlm(kwargs: dict[str, Any]) -> Policy:
    kwargs = dict(kwargs)
    model = kwargs.pop("model", None) or kwargs.pop("path", None)
    if model is None:
        raise ValueError("policy 'vlm' needs model=PATH (a model folder; --model PATH on the command line)")
    from agents.policies.confident_stop import FIELD, ConfidentStop, recorded_threshold

    # the folder's recorded confidence-stop threshold applies unless the caller names one (None: off)
    threshold = kwargs.pop(FIELD) if FIELD in kwargs else recorded_threshold(model)
    policy = POLICIES.get("vlm").from_pretrained(model, **kwargs)
    return policy if threshold is None else ConfidentStop(policy, threshold)


def make_policy(name_or_path: str, **kwargs: Any) -> Policy:
    """Build a policy from a built-in name, a model folder (``vlm``) or an import path, with keyword arguments."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"policy must be a non-empty name or import path, got {name_or_path!r}")
    key = name_or_path.lower()
    if key == "vlm":
        return _make_vlm(kwargs)
    if key not in POLICIES and os.path.isdir(name_or_path):
        return _make_vlm({"model": name_or_path, **kwargs})
    if key not in POLICIES and not is_import_path(name_or_path):
        raise ValueError(f"unknown policy {name_or_path!r}; known: {POLICIES.names()}, a model folder, or an import "
                         "path 'package.module:ClassName'")
    target = POLICIES.get(key if key in POLICIES else name_or_path)
    if not callable(target):
        raise TypeError(f"policy {name_or_path!r} resolves to a non-callable {type(target).__name__}")
    try:
        policy = target(**kwargs)
    except TypeError as exc:
        sig = inspect.signature(target) if inspect.isclass(target) or inspect.isfunction(target) else "(...)"
        raise TypeError(f"cannot build policy {name_or_path!r} with {sorted(kwargs)}: {exc}; signature {sig}") from exc
    if not callable(getattr(policy, "act", None)):
        raise TypeError(f"policy {name_or_path!r} built a {type(policy).__name__} without an act() method")
    return policy


__all__ = ["POLICIES", "Policy", "PolicyOutput", "SamplingParams", "import_object", "make_policy", "register_policy"]
