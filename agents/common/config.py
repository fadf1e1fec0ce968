"""Typed configs: dataclasses with a docstring per field, loaded from YAML, then overridden on the command line.

Pattern (CleanRL ``Args`` + tyro): ``--config FILE`` is read first into the dataclass, which then becomes the
default that tyro's parser overrides field by field (``--lr 1e-5``, nested ``--lora.rank 8``). ``--help`` lists
every field with its docstring and the value this command line would use. Unknown YAML keys are an error that
names the file and the key.

Layering (lowest first): the dataclass defaults (the paper's settings) < the command's default config (``train``
commands: ``configs/grpo_cpu.yaml``, ``configs/bc_cpu.yaml``) < ``--config FILE`` < flags. So a small FILE changes
only the fields it names and keeps the CPU defaults that ``--help`` shows. A FILE may name its own base with a
top-level ``base:`` key: ``base: defaults`` starts from the dataclass defaults (the shipped ``*_paper.yaml`` do),
``base: OTHER.yaml`` from another config file (itself layered the same way).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Type, TypeVar

import yaml

from ivt_env.atomic import atomic_write_text  # noqa: F401 - re-exported for callers

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the repository (or site-packages) holding configs/ and assets/
CONFIG_DIR = PROJECT_ROOT / "configs"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A path as given, else relative to the project's ``configs/`` folder (``grpo_cpu.yaml`` works anywhere)."""
    p = Path(path)
    if p.exists():
        return p
    q = CONFIG_DIR / p
    if q.exists():
        return q
    raise FileNotFoundError(f"config file not found: {path} (also looked in {CONFIG_DIR})")


def from_dict(cls: Type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise ``ValueError`` naming ``where``."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    kwargs = {}
    base = cls()
    for name, value in data.items():
        current = getattr(base, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            kwargs[name] = from_dict(type(current), value, where=f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


BASE_KEY = "base"
#: ``base:`` values that mean the dataclass defaults.
DEFAULTS_BASE = ("defaults", "none")


def apply_dict(obj: T, data: dict[str, Any], *, where: str = "config") -> T:
    """A copy of dataclass ``obj`` with the (nested) fields in ``data`` replaced; unknown keys raise (naming
    ``where``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {type(obj).__name__}; known: {sorted(fields)}")
    changes = {}
    for name, value in data.items():
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[name] = apply_dict(current, value, where=f"{where}.{name}")
        else:
            changes[name] = value
    return dataclasses.replace(obj, **changes)


def load_yaml(cls: Type[T], path: str | os.PathLike, base_config: Optional[str] = None, _depth: int = 0) -> T:
    """Config ``path`` layered on its base (see the module docstring): the file's ``base:`` key, else
    ``base_config`` (a command's default config), else the dataclass defaults."""
    p = resolve_config_path(path)
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of fields, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None) or base_config
    start = cls()
    if base is not None and str(base).lower() not in DEFAULTS_BASE:
        if _depth >= 8:
            raise ValueError(f"{p}: 'base:' chain deeper than 8 files (a loop?)")
        base_path = resolve_config_path(base)
        if base_path.resolve() != p.resolve():  # the default config itself has no base but the defaults
            start = load_yaml(cls, base_path, None, _depth + 1)
    return apply_dict(start, data, where=str(p))


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_cli(
    cls: Type[T], argv: Optional[Sequence[str]] = None, *, prog: Optional[str] = None, description: str = "",
    base_config: Optional[str] = None,
) -> T:
    """``--config FILE`` (optional, layered on ``base_config``: see the module docstring) then field overrides;
    returns the filled dataclass."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    default = cls()
    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise SystemExit("--config needs a file path")
            config_path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config_path = a.split("=", 1)[1]
            i += 1
            continue
        rest.append(a)
        i += 1
    if config_path is not None:
        try:
            default = load_yaml(cls, config_path, base_config)
        except (FileNotFoundError, ValueError, yaml.YAMLError) as e:  # a user's file: one line, no traceback
            print(f"{prog or 'error'}: error: --config {config_path}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    if base_config:
        layering = (f"--config FILE: a YAML file of these fields (see configs/), layered on the default config "
                    f"{base_config} (a FILE with `base: defaults` starts from the paper's dataclass defaults); flags "
                    "below override it. The defaults shown are the values this command line uses.")
    else:
        layering = "--config FILE: a YAML file of these fields (see configs/); flags below override it."
    desc = description + "\n\n" + layering
    return tyro.cli(cls, args=rest, default=default, prog=prog, description=desc, config=(tyro.conf.FlagConversionOff,))


def expand_bool_flags(argv: Sequence[str], cls: type) -> list[str]:
    """Accept bare ``--flag`` and ``--no-flag`` for the bool fields of dataclass ``cls`` (the shared parser wants
    ``--flag True``): ``["--resume", "--out", "x"]`` -> ``["--resume", "True", "--out", "x"]``."""
    bools = {f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
    out: list[str] = []
    argv = list(argv)
    for i, a in enumerate(argv):
        key = a[2:] if a.startswith("--") else None
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if key is not None and key.replace("_", "-") in bools and (nxt is None or nxt.startswith("--")):
            out += [a, "True"]
        elif key is not None and key.startswith("no-") and key[3:].replace("_", "-") in bools:
            out += ["--" + key[3:], "False"]
        else:
            out.append(a)
    return out


def train_argv(argv: Sequence[str], cls: type, default_config: str) -> list[str]:
    """The arguments of a ``train`` command as ``parse_cli`` wants them: bare bool flags expanded
    (:func:`expand_bool_flags`) and ``--config default_config`` in front when no ``--config`` is given."""
    out = expand_bool_flags(argv, cls)
    if not any(a == "--config" or a.startswith("--config=") for a in out):
        out = ["--config", default_config, *out]
    return out


def parse_train_command(argv: Optional[Sequence[str]], cls: Type[T], *, default_config: str, prog: str, usage: str,
                        description: str) -> "T | int":
    """``python -m PKG train [--config FILE] [--FIELD VALUE ...]`` (argv None: ``sys.argv[1:]``): the parsed config,
    or the exit code to return after printing the usage (no command, ``--help``, an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] != "train":
        print(f"unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
        return 2
    return parse_cli(cls, train_argv(argv[1:], cls, default_config), prog=prog, description=description,
                     base_config=default_config)
