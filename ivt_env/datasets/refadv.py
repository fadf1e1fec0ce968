"""Ref-Adv-s (huggingface.co/datasets/dddraxxx/ref-adv-s): 1,142 adversarial referring expressions, one ``train``
split upstream.

Layout, either of::

    DATA_ROOT/refadv/data/train-*.parquet   (the Hub layout; also DATA_ROOT/refadv/*.parquet)
    DATA_ROOT/refadv/*.jsonl                the same columns as JSON lines; ``image`` is a path (relative to
                                            DATA_ROOT/refadv/ or absolute) or absent, then DATA_ROOT/refadv/images/
                                            <file_name> is read

Columns: image (HF Image {bytes, path} in parquet), file_name, normal_caption, solution [x1, y1, x2, y2] px,
width, height, image_source (coco_val2017 | openimages), human_authored, use_negation, distractors.

Splits: the 1,142 rows are cut deterministically into ``train`` / ``val`` / ``test`` of 800 / 170 / 172 (the IVT
paper's per-dataset sizes; ``split_sizes`` sets other ratios, scaled to the file's row count): rows are ordered by a
SHA-1 hash of ``file_name`` (ties in file order) and cut into consecutive blocks, so rows of one image stay together
except at a block edge. ``all`` is every row. Sample ids: ``refadv-{row}`` (row = position in the file).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
from collections import Counter
from typing import Optional, Sequence

from .base import MAX_EXPRESSION_CHARS, DatasetError
from .images import DEFAULT_MAX_IMAGE_PIXELS, BytesImage, FileImage, RowGroupCache
from .records import BadRecords, RawRecord, RecordDataset, data_root
from .splits import proportional_sizes, rank_split

NAME = "refadv"
SPLITS = ("train", "val", "test", "all")
PAPER_SPLIT_SIZES = (800, 170, 172)
ORIGIN = "huggingface.co/datasets/dddraxxx/ref-adv-s (data/train-00000-of-00001.parquet)"
COLUMNS = ("file_name", "normal_caption", "solution", "width", "height")
META = ("image_source", "human_authored", "use_negation", "distractors")
_NUM = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _solution_box(v):
    """``solution`` as 4 numbers: a list, or a string holding them (e.g. "[10, 20, 30, 40]")."""
    if isinstance(v, str):
        nums = _NUM.findall(v)
        return tuple(float(x) for x in nums) if len(nums) == 4 else None
    if isinstance(v, (list, tuple)) and len(v) == 4:
        try:
            return tuple(float(x) for x in v)
        except (TypeError, ValueError):
            return None
    return None


def find_files(base: str) -> tuple[str, list[str]]:
    files = sorted(glob.glob(os.path.join(base, "data", "train-*.parquet"))) or sorted(
        glob.glob(os.path.join(base, "*.parquet"))
    )
    if files:
        return "parquet", files
    files = sorted(glob.glob(os.path.join(base, "*.jsonl")))
    if files:
        return "jsonl", files
    raise DatasetError(
        f"refadv: no data under {base}: expected {base}/data/train-*.parquet (or {base}/*.parquet) from {ORIGIN}, "
        f"or {base}/*.jsonl with the same columns and images in {base}/images/<file_name>; "
        f"`python -m ivt_env.datasets download refadv --root {os.path.dirname(base)}` fetches it where the Hub is reachable"
    )


def _rows_parquet(files: list[str]):
    import pyarrow.parquet as pq

    for path in files:
        try:
            names = pq.read_schema(path).names
            missing = [c for c in COLUMNS + ("image",) if c not in names]
            if missing:
                raise DatasetError(f"refadv: {path} lacks columns {missing}; Ref-Adv-s columns: image, "
                                   f"{', '.join(COLUMNS + META)} ({ORIGIN})")
            cols = pq.read_table(path, columns=[c for c in names if c in COLUMNS + META]).to_pydict()
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"refadv: cannot read parquet {path}: {type(e).__name__}: {e}") from e
        cache = RowGroupCache(path, "image")
        for row in range(len(cols["file_name"])):
            rec = {k: v[row] for k, v in cols.items()}
            where = f"{path} row {row} ({rec['file_name']})"
            yield rec, BytesImage(f"{path}#{row}", functools.partial(cache.get, row), where)


def _rows_jsonl(files: list[str], base: str):
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError as e:
            raise DatasetError(f"refadv: cannot read {path}: {e}") from e
        for ln, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise DatasetError(f"refadv: {path} line {ln} is not a JSON object: {e}") from e
            missing = [c for c in COLUMNS if c not in rec]
            if missing:
                raise DatasetError(f"refadv: {path} line {ln} lacks {missing}; Ref-Adv-s columns: "
                                   f"{', '.join(COLUMNS + META)}")
            img = rec.get("image")
            if isinstance(img, dict):
                img = img.get("path")
            if isinstance(img, str) and img:
                img_path = img if os.path.isabs(img) else os.path.join(base, img)
            else:
                img_path = os.path.join(base, "images", str(rec["file_name"]))
            yield rec, FileImage(img_path)


def read_records(
    split: str, data_root_: Optional[str] = None, *, split_sizes: Sequence[int] = PAPER_SPLIT_SIZES
) -> tuple[list[RawRecord], Counter, str]:
    if split not in SPLITS:
        raise DatasetError(f"refadv has splits {SPLITS} (derived from the single upstream train split), not {split!r}")
    root = data_root(data_root_, NAME)
    base = os.path.join(root, NAME)
    kind, files = find_files(base)
    rows = list(_rows_parquet(files) if kind == "parquet" else _rows_jsonl(files, base))
    if split == "all":
        assigned = ["all"] * len(rows)
    else:
        sizes = proportional_sizes(len(rows), split_sizes)
        assigned = rank_split([str(r["file_name"]) for r, _ in rows], sizes, ("train", "val", "test"))
    records: list[RawRecord] = []
    bad = BadRecords()
    for row, ((rec, ref), s) in enumerate(zip(rows, assigned)):
        if s != split:
            continue
        box = _solution_box(rec.get("solution"))
        if box is None:
            bad.note("malformed box", f"refadv-{row}", f"image {ref.describe()}")
            continue
        text = str(rec.get("normal_caption") or "").strip()
        if not text:
            bad.note("empty expression", f"refadv-{row}", f"image {ref.describe()}")
            continue
        meta = {k: rec.get(k) for k in META if k in rec}
        meta.update(file_name=str(rec["file_name"]), row=row, split=split)
        w, h = rec.get("width"), rec.get("height")
        records.append(
            RawRecord(
                sample_id=f"refadv-{row}",
                expression=text,
                box=box,
                image=ref,
                width=int(w) if w is not None else None,
                height=int(h) if h is not None else None,
                meta=meta,
            )
        )
    return records, bad, f"{kind} {', '.join(files)}"


class RefAdv(RecordDataset):
    """Ref-Adv-s (see module doc). kwargs: ``split_sizes``, ``on_bad_sample``, ``check_images``, ``limit``."""

    def __init__(self, split: str = "test", data_root: Optional[str] = None, *, on_bad_sample: str = "skip",
                 check_images=True, limit: Optional[int] = None, max_expression_chars: int = MAX_EXPRESSION_CHARS,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, **kwargs):
        records, bad, where = read_records(split, data_root, **kwargs)
        super().__init__(records, NAME, split, on_bad_sample=on_bad_sample, check_images=check_images,
                         bad_counts=bad, limit=limit, where=where, max_expression_chars=max_expression_chars,
                         max_image_pixels=max_image_pixels)
