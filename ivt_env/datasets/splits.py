"""Deterministic split derivation for upstream files without the split we need (no RNG state, no row order).

A record's split depends only on a stable key (an image id, a file name), hashed with SHA-1: the same rows give the
same splits on any machine, in any order, from parquet or JSONL alike, and all expressions of one image land in the
same split (no image leaks between train and val).
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def hash_unit(key: str, salt: str = "ivt") -> float:
    """A uniform-looking number in [0, 1) from ``key`` (first 8 bytes of SHA-1 of ``salt/key``)."""
    h = hashlib.sha1(f"{salt}/{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def holdout_split(key: str, holdout_fraction: float, salt: str = "ivt") -> str:
    """``"val"`` for about ``holdout_fraction`` of keys, else ``"train"`` (Ref-L4 / RefCOCOg-parquet upstream val)."""
    return "val" if hash_unit(key, salt) < holdout_fraction else "train"


def rank_split(keys: Sequence[str], sizes: Sequence[int], names: Sequence[str], salt: str = "ivt") -> list[str]:
    """Order ``keys`` by hash and cut the order into consecutive blocks of ``sizes`` named ``names``.

    Exact block sizes (Ref-Adv-s: 800 / 170 / 172 of 1,142 rows). Ties (duplicate keys) keep their input order.
    """
    if sum(sizes) != len(keys):
        raise ValueError(f"split sizes {list(sizes)} do not add up to {len(keys)} records")
    order = sorted(range(len(keys)), key=lambda i: (hash_unit(keys[i], salt), i))
    out = [""] * len(keys)
    pos = 0
    for name, size in zip(names, sizes):
        for i in order[pos : pos + size]:
            out[i] = name
        pos += size
    return out


def proportional_sizes(n: int, ratios: Sequence[float]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``ratios`` (largest remainders; the parts sum to ``n``)."""
    total = float(sum(ratios))
    raw = [n * r / total for r in ratios]
    parts = [int(x) for x in raw]
    rest = n - sum(parts)
    for i in sorted(range(len(raw)), key=lambda i: (parts[i] - raw[i], i))[:rest]:
        parts[i] += 1
    return parts
