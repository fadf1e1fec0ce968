"""Policies by name: ``make_policy("oracle", noise=20)``, ``make_policy("my_pkg.mod:MyPolicy", **kw)``.

Built-in names (scripted ones need no model):

- ``oracle``  -> :class:`agents.policies.scripted.OraclePolicy` (``noise``, ``resample``, ``seed``)
- ``copy``    -> :class:`agents.policies.scripted.CopyPolicy` (``first``, ``first_kwargs``, ``first_noise``)
- ``random``  -> :class:`agents.policies.scripted.RandomPolicy` (``min_side``, ``invalid_rate``)
- ``replay``  -> :class:`agents.policies.scripted.ReplayPolicy` (``path``: JSONL of step texts)
- ``teacher`` -> :class:`agents.policies.scripted.InterpolatingTeacher` (``steps``, ``start_boxes``, ...)
- ``vlm``     -> ``agents.policies.vlm.VLMPolicy.from_pretrained(model, **rest)`` (imported only when asked for;
  ``model`` (or ``path``) is the model folder). A path to an existing folder is also taken as ``vlm``.

Anything else of the form ``package.module:ClassName`` (or ``package.module.ClassName``) is imported and called
with the keyword arguments; it must return an object with an ``act`` method (the :class:`Policy` interface).
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

from agents.policies.base import Policy, PolicyOutput, SamplingParams

BUILTIN = {
    "oracle": "agents.policies.scripted:OraclePolicy",
    "copy": "agents.policies.scripted:CopyPolicy",
    "random": "agents.policies.scripted:RandomPolicy",
    "replay": "agents.policies.scripted:ReplayPolicy",
    "teacher": "agents.policies.scripted:InterpolatingTeacher",
    "vlm": "agents.policies.vlm:VLMPolicy",
}


def import_object(path: str) -> Any:
    """``"package.module:Name"`` (or dotted ``"package.module.Name"``) -> the object; clear errors otherwise."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"not an import path: {path!r} (expected 'package.module:ClassName')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} for policy {path!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"module {module_name!r} has no attribute {attr!r} (policy {path!r})")
        obj = getattr(obj, part)
    return obj


def _make_vlm(kwargs: dict[str, Any]) -> Policy:
    kwargs = dict(kwargs)
    model = kwargs.pop("model", None) or kwargs.pop("path", None)
    if model is None:
        raise ValueError("policy 'vlm' needs model=PATH (a model folder; --model PATH on the command line)")
    cls = import_object(BUILTIN["vlm"])
    return cls.from_pretrained(model, **kwargs)


def make_policy(name_or_path: str, **kwargs: Any) -> Policy:
    """Build a policy from a built-in name, a model folder (``vlm``) or an import path, with keyword arguments."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"policy must be a non-empty name or import path, got {name_or_path!r}")
    key = name_or_path.lower()
    if key == "vlm":
        return _make_vlm(kwargs)
    if key in BUILTIN:
        target = import_object(BUILTIN[key])
    elif os.path.isdir(name_or_path):
        return _make_vlm({"model": name_or_path, **kwargs})
    elif ":" in name_or_path or "." in name_or_path:
        target = import_object(name_or_path)
    else:
        raise ValueError(
            f"unknown policy {name_or_path!r}: use one of {sorted(BUILTIN)}, a model folder, or an import path "
            "'package.module:ClassName'"
        )
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


__all__ = ["BUILTIN", "Policy", "PolicyOutput", "SamplingParams", "import_object", "make_policy"]
