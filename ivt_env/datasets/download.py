"""Fetch RefCOCOg (lmms-lab parquet), Ref-L4 and Ref-Adv-s from their public Hugging Face dataset repositories into
the layouts the loaders read. Needs ``huggingface_hub`` (optional: ``pip install huggingface_hub``).

Where the Hub cannot be reached (``HF_HUB_OFFLINE=1``, or no TCP connection to the Hub host within ``timeout``
seconds) it fails at once with :class:`HubUnreachable`, whose message lists what to download by hand and where to put
it.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from .base import DatasetError


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    files: tuple[str, ...]  # allow-patterns, relative to the repository root
    folder: str  # destination under the data root (the repository layout is kept below it)
    note: str = ""


SOURCES = {
    "refcocog": HubSource(
        "lmms-lab/RefCOCOg", ("data/val-*.parquet", "data/test-*.parquet"), "refcocog",
        "umd val + test only (about 2.5 GB with images); for the umd train split use the refer layout: refcocog.zip "
        "from github.com/lichengunc/refer into DATA_ROOT/refcocog/ and COCO train2014 into DATA_ROOT/coco/train2014/",
    ),
    "refl4": HubSource(
        "JierunChen/Ref-L4", ("ref-l4-val.parquet", "ref-l4-test.parquet", "images.tar.gz"), "refl4",
        "images.tar.gz is about 3.5 GB; it is extracted into DATA_ROOT/refl4/images/ on first use",
    ),
    "refadv": HubSource("dddraxxx/ref-adv-s", ("data/train-*.parquet",), "refadv"),
}
ALIASES = {"mix": ("refcocog", "refadv", "refl4"), "all": ("refcocog", "refadv", "refl4")}


class HubUnreachable(DatasetError):
    """The Hugging Face Hub cannot be reached from here; the message says what to fetch by hand."""


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def manual_instructions(names, root: str) -> str:
    lines = ["Download by hand on a machine with internet access and copy the files here:"]
    for n in names:
        src = SOURCES[n]
        lines.append(f"  {n}: from {hub_endpoint()}/datasets/{src.repo_id}/tree/main")
        for f in src.files:
            lines.append(f"    {f}  ->  {os.path.join(root, src.folder, f)}")
        if src.note:
            lines.append(f"  ({n}: {src.note})")
    lines.append(f"then point the loaders at it: data_root={root!r} or IVT_DATA={root}")
    return "\n".join(lines)


def check_hub(timeout: float = 4.0) -> Optional[str]:
    """None if the Hub host accepts a TCP connection within ``timeout`` s, else why not (fast: no HTTP, no retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    result: list = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except Exception as e:  # OSError in practice; never let the probe thread die noisily
            result.append(f"{type(e).__name__}: {e}")

    # A thread bounds the whole check: create_connection's timeout does not cover a hanging DNS lookup.
    t = threading.Thread(target=probe, daemon=True, name="ivt-hub-check")
    t.start()
    t.join(timeout)
    if not result:
        return f"no connection to {host}:{port} within {timeout:g} s"
    if result[0] is not None:
        return f"cannot connect to {host}:{port} ({result[0]})"
    return None


def resolve_names(name: str) -> tuple[str, ...]:
    key = name.lower().replace("-", "").replace("_", "")
    key = {"refadvs": "refadv"}.get(key, key)
    if key in ALIASES:
        return ALIASES[key]
    if key in SOURCES:
        return (key,)
    if key == "synthetic":
        raise DatasetError("the synthetic dataset is generated on the fly: nothing to download")
    raise DatasetError(f"unknown dataset {name!r}; downloadable: {', '.join(list(SOURCES) + list(ALIASES))}")


def download(name: str, root: str, timeout: float = 4.0, extract: bool = True) -> list[str]:
    """Download dataset ``name`` (``refcocog``, ``refl4``, ``refadv`` or ``mix``/``all``) under ``root``; returns
    the destination folders. Raises :class:`HubUnreachable` at once when the Hub cannot be reached."""
    names = resolve_names(name)
    root = os.path.abspath(os.path.expanduser(root))
    why = check_hub(timeout)
    if why is not None:
        raise HubUnreachable(f"cannot reach the Hugging Face Hub ({hub_endpoint()}): {why}.\n"
                             + manual_instructions(names, root))
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise DatasetError("downloading needs the optional package huggingface_hub: pip install huggingface_hub\n"
                           + manual_instructions(names, root)) from e
    out = []
    for n in names:
        src = SOURCES[n]
        dest = os.path.join(root, src.folder)
        existed = os.path.isdir(dest)
        try:
            snapshot_download(repo_id=src.repo_id, repo_type="dataset", allow_patterns=list(src.files), local_dir=dest)
        except Exception as e:  # network drop, auth, disk full: say what was being fetched
            if not existed and os.path.isdir(dest) and not os.listdir(dest):
                os.rmdir(dest)  # leave no empty folder that a loader would mistake for a dataset
            raise DatasetError(f"{n}: download of {src.repo_id} into {dest} failed: {type(e).__name__}: {e}\n"
                               + manual_instructions([n], root)) from e
        if n == "refl4" and extract:
            from .refl4 import image_folder

            image_folder(dest)
        out.append(dest)
    return out
