"""Write tiny datasets in the EXACT upstream layouts (real JPEG/PNG bytes, a real pickle, real parquet, a real
tar.gz) into a folder, for the loader tests and the env's check_env tests.

Each ``write_*`` returns the data root to pass as ``data_root``. Every image is a flat background with the object's
box filled in :data:`BOX_COLOUR`, so a test can find the box again in the pixels. Contents are fixed tables
(``REFCOCOG_*``, ``REFL4_*``, ...) that tests read to state expectations by hand.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from typing import Optional

import numpy as np
from PIL import Image

BOX_COLOUR = (240, 40, 40)  # luminance ~100 vs ~40 for the background: visible in grey too
BACKGROUND = (20, 40, 90)


def image_bytes(width: int, height: int, box_xyxy=None, fmt: str = "JPEG", mode: str = "RGB", orientation: int = 1) -> bytes:
    """Encoded image: background + the box filled with BOX_COLOUR (box in the STORED pixel frame), converted to
    ``mode`` ("RGB", "L", "RGBA", "CMYK", "P", "I;16"); ``orientation`` != 1 writes that EXIF orientation tag."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[:] = BACKGROUND
    if box_xyxy is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in box_xyxy)
        arr[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = BOX_COLOUR
    img = Image.fromarray(arr, "RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)  # uint16 -> mode I;16
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    elif mode != "RGB":
        img = img.convert(mode)
    kw = {"quality": 95} if fmt == "JPEG" else {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _xywh_to_xyxy(b):
    return (b[0], b[1], b[0] + b[2], b[1] + b[3])


# ----------------------------------------------------------------------------------------------------- RefCOCOg
#: image_id -> (width, height)
REFCOCOG_IMAGES = {1: (64, 48), 2: (80, 60), 3: (48, 64), 4: (64, 64)}
#: ann_id -> (image_id, bbox [x, y, w, h])
REFCOCOG_ANNS = {101: (1, [10, 8, 20, 16]), 102: (1, [40, 20, 16, 20]), 201: (2, [5, 5, 30, 25]),
                 301: (3, [8, 30, 20, 20]), 401: (4, [12.5, 12, 24, 24])}
#: ref_id -> (ann_id, split, [(sent_id, sentence), ...])
REFCOCOG_REFS = {
    1: (101, "train", [(11, "the red box on the left"), (12, "left red thing")]),
    2: (102, "train", [(21, "the box on the right side")]),
    3: (201, "val", [(31, "big red block"), (32, "red rectangle at top left")]),
    4: (301, "test", [(41, "square near the bottom")]),
    5: (401, "test", [(51, "the red square in the middle")]),
}


def write_refcocog_refer(root: str) -> str:
    """refer layout: ``refcocog/refs(umd).p`` (pickle protocol 2, as the Python-2 original), ``refcocog/instances.json``
    and JPEGs in ``coco/train2014/COCO_train2014_%012d.jpg``."""
    base = os.path.join(root, "refcocog")
    os.makedirs(base, exist_ok=True)
    refs = []
    for ref_id, (ann_id, split, sents) in REFCOCOG_REFS.items():
        image_id = REFCOCOG_ANNS[ann_id][0]
        refs.append({
            "sent_ids": [s for s, _ in sents],
            "file_name": "COCO_train2014_%012d_%d.jpg" % (image_id, ann_id),  # refer's per-ref name (unused)
            "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split, "category_id": 1,
            "sentences": [{"tokens": t.split(), "raw": t.capitalize(), "sent_id": s, "sent": t} for s, t in sents],
        })
    with open(os.path.join(base, "refs(umd).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    images = [{"id": i, "file_name": "COCO_train2014_%012d.jpg" % i, "width": w, "height": h}
              for i, (w, h) in REFCOCOG_IMAGES.items()]
    anns = [{"id": a, "image_id": im, "bbox": b, "category_id": 1, "area": b[2] * b[3], "iscrowd": 0,
             "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3]]]}
            for a, (im, b) in REFCOCOG_ANNS.items()]
    with open(os.path.join(base, "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)
    for i, (w, h) in REFCOCOG_IMAGES.items():
        box = next(_xywh_to_xyxy(b) for a, (im, b) in REFCOCOG_ANNS.items() if im == i)
        _write(os.path.join(root, "coco", "train2014", "COCO_train2014_%012d.jpg" % i), image_bytes(w, h, box))
    return root


#: upstream split -> rows (question_id, file_name, (width, height), bbox [x, y, w, h], answers)
REFCOCOG_PARQUET_ROWS = {
    "val": [(f"q{i}", "COCO_train2014_%012d.jpg" % (900 + i), (60, 40), [4 + i, 6, 20, 12],
             [f"thing number {i}", f"object {i}"]) for i in range(12)],
    "test": [("t0", "COCO_train2014_000000000777.jpg", (50, 50), [10, 10, 25, 30], ["the only one"]),
             ("t1", "COCO_train2014_000000000778.jpg", (70, 30), [0, 0, 70, 30], ["everything", "all of it", "whole"])],
}


def write_refcocog_parquet(root: str, row_group_size: int = 3) -> str:
    """lmms-lab/RefCOCOg layout: ``refcocog/data/{val,test}-00000-of-00001.parquet`` with its exact columns; the
    image column is a Hugging Face Image struct {bytes, path}. Small row groups exercise lazy row-group reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("question_id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()),
        ("answer", pa.list_(pa.string())),
        ("segmentation", pa.list_(pa.float32())),
        ("bbox", pa.list_(pa.float32())),
        ("iscrowd", pa.int8()),
        ("file_name", pa.string()),
    ])
    for split, rows in REFCOCOG_PARQUET_ROWS.items():
        data = {k: [] for k in schema.names}
        for qid, fn, (w, h), bbox, answers in rows:
            data["question_id"].append(qid)
            data["image"].append({"bytes": image_bytes(w, h, _xywh_to_xyxy(bbox)), "path": None})
            data["question"].append("Please carefully observe the area circled in the image and come up with a caption.")
            data["answer"].append(answers)
            data["segmentation"].append([float(v) for v in bbox])
            data["bbox"].append([float(v) for v in bbox])
            data["iscrowd"].append(0)
            data["file_name"].append(fn)
        path = os.path.join(root, "refcocog", "data", f"{split}-00000-of-00001.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.Table.from_pydict(data, schema=schema), path, row_group_size=row_group_size)
    return root


# -------------------------------------------------------------------------------------------------------- Ref-L4
#: upstream split -> rows (id, image_id, file_name, (width, height), bbox [x, y, w, h], caption)
REFL4_ROWS = {
    "val": [(i, 5000 + i // 2, f"COCO_val2014_{5000 + i // 2:012d}.jpg" if i % 4 < 2 else f"objects365_v2_{5000 + i // 2:08d}.jpg",
             (64, 48), [2 + i, 4, 16, 12], f"caption {i} of the red thing") for i in range(16)],
    "test": [(100, 7000, "COCO_val2014_000000007000.jpg", (64, 48), [8, 8, 20, 10], "red box up left"),
             (101, 7001, "objects365_v2_00007001.jpg", (40, 56), [0, 30, 40, 26], "red band at the bottom")],
}

#: Bad / unusual records added to Ref-L4 test by ``write_refl4(..., bad=True)``:
#: (id, file_name, annotated (w, h), bbox [x, y, w, h], how the file is written, expected outcome)
REFL4_BAD_ROWS = [
    (200, "bad_garbage.jpg", (64, 48), [4, 4, 10, 10], "garbage", "unreadable image"),
    (201, "bad_missing.jpg", (64, 48), [4, 4, 10, 10], "missing", "unreadable image"),
    (202, "ok_zero.jpg", (64, 48), [4, 4, 0, 10], "rgb", "zero-area box"),
    (203, "ok_outside.jpg", (64, 48), [70, 4, 10, 10], "rgb", "box outside image"),
    (204, "ok_partial.jpg", (64, 48), [50, 40, 20, 20], "rgb", "clipped box"),
    (205, "gray.jpg", (64, 48), [8, 8, 16, 16], "L", "ok"),
    (206, "rgba.png", (64, 48), [8, 8, 16, 16], "RGBA", "ok"),
    (207, "cmyk.jpg", (64, 48), [8, 8, 16, 16], "CMYK", "ok"),
    (208, "palette.png", (64, 48), [8, 8, 16, 16], "P", "ok"),
    (209, "deep16.png", (64, 48), [8, 8, 16, 16], "I;16", "ok"),
    (210, "rotated6.jpg", (64, 48), [8, 10, 16, 20], "exif6", "ok"),
    (211, "rotated3.jpg", (64, 48), [8, 10, 16, 20], "exif3", "ok"),
    (212, "mismatch.jpg", (100, 100), [8, 8, 16, 16], "rgb", "image size mismatch"),
]


def _refl4_file(kind: str, w: int, h: int, box) -> Optional[bytes]:
    if kind == "garbage":
        return b"\xff\xd8\xff\xe0 this is not a jpeg"
    if kind == "missing":
        return None
    if kind.startswith("exif"):
        return image_bytes(w, h, box, "JPEG", orientation=int(kind[4:]))
    if kind == "rgb":
        return image_bytes(64, 48, box)  # "mismatch" rows annotate another size than the 64x48 written here
    fmt = "PNG" if kind in ("RGBA", "P", "I;16") else "JPEG"
    return image_bytes(w, h, box, fmt, mode=kind)


def write_refl4(root: str, images: str = "folder", bad: bool = False) -> str:
    """Ref-L4 layout: ``refl4/ref-l4-{val,test}.parquet`` with its exact columns and the images either in
    ``refl4/images/`` (``images="folder"``) or in ``refl4/images.tar.gz`` under a top folder ``images/`` (``"tar"``).
    ``bad`` appends :data:`REFL4_BAD_ROWS` to the test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if images not in ("folder", "tar"):
        raise ValueError("images must be 'folder' or 'tar'")
    base = os.path.join(root, "refl4")
    os.makedirs(base, exist_ok=True)
    files: dict[str, bytes] = {}
    for split, rows in REFL4_ROWS.items():
        extra = [(i, 8000 + k, fn, wh, b, f"odd record {i}") for k, (i, fn, wh, b, _, _) in enumerate(REFL4_BAD_ROWS)] \
            if (bad and split == "test") else []
        data = {k: [] for k in ("id", "caption", "bbox", "bbox_area", "bbox_id", "ori_category_id", "image_id",
                                "height", "width", "file_name", "is_rewrite", "split")}
        for i, image_id, fn, (w, h), bbox, caption in rows + extra:
            data["id"].append(i)
            data["caption"].append(caption)
            data["bbox"].append([float(v) for v in bbox])
            data["bbox_area"].append(float(bbox[2] * bbox[3]))
            data["bbox_id"].append(f"{image_id}_{i}")
            data["ori_category_id"].append("coco_1" if fn.startswith("COCO") else "o365_5")
            data["image_id"].append(f"{image_id}")
            data["height"].append(h)
            data["width"].append(w)
            data["file_name"].append(fn)
            data["is_rewrite"].append(bool(i % 2))
            data["split"].append(split)
        for i, image_id, fn, (w, h), bbox, caption in rows:
            files.setdefault(fn, image_bytes(w, h, _xywh_to_xyxy(bbox)))
        pq.write_table(pa.Table.from_pydict(data), os.path.join(base, f"ref-l4-{split}.parquet"))
    if bad:
        for i, fn, (w, h), bbox, kind, _ in REFL4_BAD_ROWS:
            blob = _refl4_file(kind, w, h, _xywh_to_xyxy(bbox))
            if blob is not None:
                files[fn] = blob
    if images == "folder":
        for fn, blob in files.items():
            _write(os.path.join(base, "images", fn), blob)
    else:
        with tarfile.open(os.path.join(base, "images.tar.gz"), "w:gz") as tar:
            for fn, blob in sorted(files.items()):
                info = tarfile.TarInfo(f"images/{fn}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return root


# ----------------------------------------------------------------------------------------------------- Ref-Adv-s
def refadv_rows(n_rows: int = 24) -> list[dict]:
    """The fixture's Ref-Adv-s rows (without image bytes): 3 rows per image, boxes as ``solution`` xyxy."""
    rows = []
    for r in range(n_rows):
        img = r // 3
        w, h = (64, 48) if img % 2 == 0 else (48, 64)
        x1, y1 = 2 + (r % 3) * 10, 4 + (img % 5)
        rows.append({
            "file_name": f"{'coco' if img % 2 == 0 else 'openimages'}_{img:05d}.jpg",
            "normal_caption": f"the red patch number {r}",
            "solution": [x1, y1, x1 + 12, y1 + 9],
            "width": w,
            "height": h,
            "image_source": "coco_val2017" if img % 2 == 0 else "openimages",
            "human_authored": bool(r % 2),
            "use_negation": r % 5 == 0,
            "distractors": [f"another patch {r}"],
        })
    return rows


def write_refadv(root: str, fmt: str = "parquet", n_rows: int = 24) -> str:
    """Ref-Adv-s layout: ``refadv/data/train-00000-of-00001.parquet`` (HF columns, image as {bytes, path}) or
    ``refadv/train.jsonl`` + ``refadv/images/<file_name>`` (``fmt="jsonl"``; ``image`` holds the relative path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt not in ("parquet", "jsonl"):
        raise ValueError("fmt must be 'parquet' or 'jsonl'")
    base = os.path.join(root, "refadv")
    rows = refadv_rows(n_rows)
    blobs: dict[str, bytes] = {}
    for r in rows:
        # each image shows the box of its first row (the other rows' boxes are elsewhere: fine for loaders)
        blobs.setdefault(r["file_name"], image_bytes(r["width"], r["height"], r["solution"]))
    if fmt == "parquet":
        table = {"image": [{"bytes": blobs[r["file_name"]], "path": r["file_name"]} for r in rows]}
        for k in rows[0]:
            table[k] = [r[k] for r in rows]
        path = os.path.join(base, "data", "train-00000-of-00001.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.Table.from_pydict(table), path, row_group_size=50)
    else:
        os.makedirs(base, exist_ok=True)
        with open(os.path.join(base, "train.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps({"image": f"images/{r['file_name']}", **r}) + "\n")
        for fn, blob in blobs.items():
            _write(os.path.join(base, "images", fn), blob)
    return root


def write_all(root: str) -> str:
    """RefCOCOg (refer layout), Ref-L4 (folder) and Ref-Adv-s (parquet) under one root: enough for every real env
    and for ``load_dataset("mix", split, data_root=root, per_dataset=1)`` on train, val and test."""
    write_refcocog_refer(root)
    write_refl4(root, images="folder")
    write_refadv(root, fmt="parquet")
    return root
