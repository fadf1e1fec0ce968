"""One registry pattern for every pluggable piece: rewards, advantage estimators, policies, loss aggregations, KL
estimators (the shape of verl's ``core_algos.py``: a decorator registry and one getter whose error lists the known
names), and one resolver for ``package.module:name`` import paths.

>>> SCORES = Registry("score")
>>> @SCORES.register("double")
... def double(x):
...     return 2 * x
>>> SCORES.get("double")(3)
6
>>> SCORES.get("math:sqrt")(9.0)
3.0
>>> SCORES.get("nope")
Traceback (most recent call last):
...
ValueError: unknown score 'nope'; known: ['double'] (or an import path 'package.module:name')

It lives in ``ivt_env`` (the lowest layer) so the env's rewards use it too; ``agents`` imports it from here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


def import_object(path: str, *, kind: str = "object") -> Any:
    """``"package.module:name"`` (or the dotted ``"package.module.name"``) -> the object it names.

    ``name`` may be dotted (``module:Class.attr``). Raises ``ValueError`` naming ``kind`` and the path when the
    path is malformed, the module cannot be imported or the attribute does not exist.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"{kind}: not an import path: {path!r} (expected 'package.module:name')")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{kind} {path!r}: not an import path (expected 'package.module:name')")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{kind} {path!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def is_import_path(spec: str) -> bool:
    """Whether ``spec`` looks like an import path rather than a registry name (names hold no ``:`` or ``.``)."""
    return ":" in spec or "." in spec


class Registry(Mapping, Generic[T]):
    """Named objects of one kind. ``@REG.register("name")`` adds one; :meth:`get` returns one by name or by
    import path. An entry may be registered as an import-path string: it is imported on first use, so a registry
    can name heavy objects (a VLM policy class) without importing them.

    A read-only mapping of the names: ``"name" in REG``, ``sorted(REG)``, ``REG["name"]`` (resolved).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Any:
        """``REG.register("name", obj)``, or ``@REG.register("name")`` as a decorator; returns ``obj``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def add(o: Any) -> Any:
            if not isinstance(o, str) and not callable(o):
                raise TypeError(f"{self.kind} {name!r} must be callable, got {type(o).__name__}")
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, spec: str, default: Any = None) -> T:  # type: ignore[override]
        """The entry named ``spec``, else the object at import path ``spec``; the error lists the known names.
        (``default`` exists for Mapping compatibility and is ignored: an unknown name always raises.)"""
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"{self.kind} must be a non-empty name or import path, got {spec!r}")
        if spec in self._entries:
            entry = self._entries[spec]
            if isinstance(entry, str):  # registered lazily by import path
                entry = self._entries[spec] = import_object(entry, kind=self.kind)
            return entry
        if not is_import_path(spec):
            raise ValueError(f"unknown {self.kind} {spec!r}; known: {self.names()} (or an import path "
                             "'package.module:name')")
        obj = import_object(spec, kind=self.kind)
        if not callable(obj):
            raise ValueError(f"{self.kind} {spec!r} resolves to a non-callable {type(obj).__name__}")
        return obj

    def name_of(self, obj: Any) -> Optional[str]:
        """The name under which ``obj`` is registered (None when it is not)."""
        for name, entry in self._entries.items():
            if entry is obj or (not isinstance(entry, str) and entry == obj):
                return name
        return None

    def unregister(self, name: str) -> None:
        """Remove an entry (a plug-in's teardown, a test's clean-up); ``del REG[name]`` does the same."""
        if name not in self._entries:
            raise KeyError(f"no {self.kind} named {name!r}")
        del self._entries[name]

    __delitem__ = unregister

    def names(self) -> list[str]:
        return sorted(self._entries)

    # Mapping interface (read-only)
    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(name)
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

