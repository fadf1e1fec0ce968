"""Ref-L4 (huggingface.co/datasets/JierunChen/Ref-L4, CC BY-NC 4.0).

Layout::

    DATA_ROOT/refl4/ref-l4-val.parquet     columns: id, caption, bbox [x, y, w, h] px, bbox_area, bbox_id,
    DATA_ROOT/refl4/ref-l4-test.parquet    ori_category_id, image_id, height, width, file_name, is_rewrite, split
    DATA_ROOT/refl4/images/<file_name>     the images (COCO 2014 and Objects365), or
    DATA_ROOT/refl4/images.tar.gz          the upstream archive: extracted once into DATA_ROOT/refl4/images/ on
                                           first use (needs write access; or extract it yourself)

Splits: Ref-L4 has no train split upstream. Our ``test`` is upstream test; our ``train`` and ``val`` both come from
upstream val, split by a hash of ``image_id`` (``holdout_fraction``, default 0.2, goes to ``val``), so no image is
in both. Sample ids: ``refl4-{id}``.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections import Counter
from typing import Optional

from .base import MAX_EXPRESSION_CHARS, DatasetError
from .images import DEFAULT_MAX_IMAGE_PIXELS, FileImage, xywh_to_xyxy
from .records import BadRecords, RawRecord, RecordDataset, data_root
from .splits import holdout_split

NAME = "refl4"
SPLITS = ("train", "val", "test")
ORIGIN = "huggingface.co/datasets/JierunChen/Ref-L4 (ref-l4-val.parquet, ref-l4-test.parquet, images.tar.gz)"
COLUMNS = ("id", "caption", "bbox", "image_id", "height", "width", "file_name")


def _extract(archive: str, dest: str) -> None:
    """Extract ``archive`` into ``dest`` atomically (temp folder + rename); a single top-level folder is flattened."""
    parent = os.path.dirname(dest)
    try:
        tmp = tempfile.mkdtemp(prefix=".images-", dir=parent)
    except OSError as e:
        raise DatasetError(
            f"refl4: cannot extract {archive}: {parent} is not writable ({e}); extract it by hand so that "
            f"{dest}/<file_name> are the images"
        ) from e
    try:
        from tqdm.auto import tqdm

        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in tqdm(members, desc=f"extracting {os.path.basename(archive)}", unit="file", disable=len(members) < 2000):
                tar.extract(m, tmp, filter="data")  # "data": no absolute paths, links out, or devices
        entries = [e for e in os.listdir(tmp) if not e.startswith(".")]
        src = os.path.join(tmp, entries[0]) if len(entries) == 1 and os.path.isdir(os.path.join(tmp, entries[0])) else tmp
        os.replace(src, dest)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"refl4: cannot extract {archive} (a gzip tar of the images expected; {ORIGIN}): {e}") from e
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def image_folder(base: str) -> str:
    """``base/images``, extracting ``base/images.tar.gz`` there first when only the archive exists."""
    folder = os.path.join(base, "images")
    if os.path.isdir(folder):
        return folder
    archive = os.path.join(base, "images.tar.gz")
    if os.path.isfile(archive):
        _extract(archive, folder)
        return folder
    raise DatasetError(f"refl4: no images: expected the folder {folder} or the archive {archive}; from {ORIGIN}")


def _index_by_basename(folder: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            out.setdefault(f, os.path.join(dirpath, f))
    return out


def read_records(
    split: str, data_root_: Optional[str] = None, *, holdout_fraction: float = 0.2
) -> tuple[list[RawRecord], Counter, str]:
    import pyarrow.parquet as pq

    if split not in SPLITS:
        raise DatasetError(f"refl4 has splits {SPLITS} (train/val from upstream val, test = upstream test), not {split!r}")
    root = data_root(data_root_, NAME)
    base = os.path.join(root, "refl4")
    upstream = "test" if split == "test" else "val"
    path = os.path.join(base, f"ref-l4-{upstream}.parquet")
    if not os.path.isfile(path):
        raise DatasetError(
            f"refl4: missing {path} (our {split!r} split reads upstream {upstream!r}); from {ORIGIN}; "
            f"`python -m ivt_env.datasets download refl4 --root {root}` fetches it where the Hub is reachable"
        )
    try:
        names = pq.read_schema(path).names
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DatasetError(f"refl4: {path} lacks columns {missing}; Ref-L4 columns: {', '.join(COLUMNS)}, ...")
        keep = [c for c in names if c in COLUMNS + ("bbox_area", "bbox_id", "ori_category_id", "is_rewrite", "split")]
        cols = pq.read_table(path, columns=keep).to_pydict()
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"refl4: cannot read parquet {path}: {type(e).__name__}: {e}") from e
    folder = image_folder(base)
    by_name: Optional[dict[str, str]] = None
    records: list[RawRecord] = []
    bad = BadRecords()
    for row in range(len(cols["id"])):
        image_id = cols["image_id"][row]
        if split != "test" and holdout_split(str(image_id), holdout_fraction) != split:
            continue
        file_name = str(cols["file_name"][row])
        img_path = os.path.join(folder, file_name)
        if not os.path.isfile(img_path):  # archives differ in sub-folders: fall back to the bare file name
            if by_name is None:
                by_name = _index_by_basename(folder)
            img_path = by_name.get(os.path.basename(file_name), img_path)
        bbox = cols["bbox"][row]
        if bbox is None or len(bbox) != 4:
            bad.note("malformed box", f"refl4-{cols['id'][row]}", f"image {img_path}")
            continue
        caption = (cols["caption"][row] or "").strip()
        if not caption:
            bad.note("empty expression", f"refl4-{cols['id'][row]}", f"image {img_path}")
            continue
        meta = {k: cols[k][row] for k in ("bbox_area", "bbox_id", "ori_category_id", "is_rewrite") if k in cols}
        meta.update(image_id=image_id, file_name=file_name, upstream_split=upstream, split=split)
        records.append(
            RawRecord(
                sample_id=f"refl4-{cols['id'][row]}",
                expression=caption,
                box=xywh_to_xyxy(bbox),
                image=FileImage(img_path),
                width=int(cols["width"][row]) if cols["width"][row] is not None else None,
                height=int(cols["height"][row]) if cols["height"][row] is not None else None,
                meta=meta,
            )
        )
    return records, bad, f"{path} + {folder}"


class RefL4(RecordDataset):
    """Ref-L4 (see module doc). kwargs: ``holdout_fraction``, ``on_bad_sample``, ``check_images``, ``limit``."""

    def __init__(self, split: str = "test", data_root: Optional[str] = None, *, on_bad_sample: str = "skip",
                 check_images=True, limit: Optional[int] = None, max_expression_chars: int = MAX_EXPRESSION_CHARS,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, **kwargs):
        records, bad, where = read_records(split, data_root, **kwargs)
        super().__init__(records, NAME, split, on_bad_sample=on_bad_sample, check_images=check_images,
                         bad_counts=bad, limit=limit, where=where, max_expression_chars=max_expression_chars,
                         max_image_pixels=max_image_pixels)
