"""RefCOCOg (umd splits) in either of its two public layouts.

**refer layout** (github.com/lichengunc/refer; ``layout="refer"``)::

    DATA_ROOT/refcocog/refs(umd).p        pickled list of refs: ref_id, image_id, ann_id, sentences[{sent_id, sent,
                                          raw, tokens}], split in {train, val, test}
    DATA_ROOT/refcocog/instances.json     COCO-style: images[{id, file_name, width, height}], annotations[{id, bbox
                                          [x, y, w, h] px, ...}]
    IMAGES/COCO_train2014_%012d.jpg       MS-COCO train2014 (cocodataset.org, train2014.zip)

    IMAGES is ``image_dir`` if given, else the first existing of: DATA_ROOT/refcocog/images,
    DATA_ROOT/coco/train2014, DATA_ROOT/images/mscoco/images/train2014 (refer's own layout), DATA_ROOT/train2014.

    Splits train / val / test are the umd splits of the pickle.

**parquet layout** (huggingface.co/datasets/lmms-lab/RefCOCOg; ``layout="parquet"``)::

    DATA_ROOT/refcocog/data/{val,test}-*.parquet   (or DATA_ROOT/refcocog/{val,test}-*.parquet)
    columns: question_id, image (HF Image: {bytes, path}), question, answer [expressions], segmentation,
             bbox [x, y, w, h] px, iscrowd, file_name

    lmms-lab publishes only umd val (7,573 rows) and test (5,023 rows). Our ``test`` is upstream test; our
    ``train`` and ``val`` both come from upstream val, split by a hash of ``file_name`` (``holdout_fraction``, default
    0.2, goes to ``val``), so no image is in both.

One sample per (object, expression) by default (``sentences="all"``: the usual RefCOCOg counting), or one per object
with its first expression (``sentences="first"``). Sample ids: ``refcocog-{ref_id}-{sent_id}`` (refer) and
``refcocog-{question_id}-{k}`` (parquet, k = index in ``answer``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import pickle
from collections import Counter
from typing import Optional

from .base import MAX_EXPRESSION_CHARS, DatasetError
from .images import DEFAULT_MAX_IMAGE_PIXELS, BytesImage, FileImage, RowGroupCache, xywh_to_xyxy
from .records import BadRecords, RawRecord, RecordDataset, data_root
from .splits import holdout_split

NAME = "refcocog"
SPLITS = ("train", "val", "test")
REFER_ORIGIN = (
    "refs(umd).p and instances.json come from the refer toolkit's refcocog.zip (github.com/lichengunc/refer, "
    "https://bvisionweb1.cs.unc.edu/licheng/referit/data/refcocog.zip); images are MS-COCO train2014 "
    "(https://cocodataset.org, train2014.zip)"
)
PARQUET_ORIGIN = "huggingface.co/datasets/lmms-lab/RefCOCOg (data/val-*.parquet, data/test-*.parquet)"
IMAGE_DIR_CANDIDATES = ("refcocog/images", "coco/train2014", "images/mscoco/images/train2014", "train2014")


class _SafeUnpickler(pickle.Unpickler):
    """refs(umd).p holds only lists, dicts, strings and numbers: refuse any class (a pickle can run code)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a refs pickle (only plain data allowed)")


def _s(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _norm_keys(d):
    """Python-2 pickles may carry bytes keys: make them str."""
    return {_s(k): v for k, v in d.items()} if isinstance(d, dict) else d


def detect_layout(root: str) -> str:
    base = os.path.join(root, "refcocog")
    if os.path.exists(os.path.join(base, "refs(umd).p")):
        return "refer"
    if _parquet_files(base, "val") or _parquet_files(base, "test"):
        return "parquet"
    raise DatasetError(
        f"refcocog: no dataset under {base}. Expected either the refer layout ({base}/refs(umd).p + "
        f"{base}/instances.json + COCO train2014 images in one of "
        f"{', '.join(os.path.join(root, c) for c in IMAGE_DIR_CANDIDATES)}; {REFER_ORIGIN}) or the parquet layout "
        f"({base}/data/val-*.parquet, {base}/data/test-*.parquet from {PARQUET_ORIGIN}; "
        f"`python -m ivt_env.datasets download refcocog --root {root}` fetches it where the Hub is reachable)"
    )


def _parquet_files(base: str, upstream_split: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(base, "data", f"{upstream_split}-*.parquet")))
    return files or sorted(glob.glob(os.path.join(base, f"{upstream_split}-*.parquet")))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"refcocog has splits {SPLITS}, not {split!r}")


def _image_dir(root: str, image_dir: Optional[str]) -> str:
    if image_dir is not None:
        if not os.path.isdir(image_dir):
            raise DatasetError(f"refcocog: image_dir {image_dir!r} is not a directory (MS-COCO train2014 images)")
        return image_dir
    for c in IMAGE_DIR_CANDIDATES:
        p = os.path.join(root, c)
        if os.path.isdir(p):
            return p
    raise DatasetError(
        "refcocog: no COCO train2014 image folder; looked for "
        + ", ".join(os.path.join(root, c) for c in IMAGE_DIR_CANDIDATES)
        + " (or pass image_dir=...). Images: COCO_train2014_%012d.jpg from train2014.zip at https://cocodataset.org"
    )


def read_refer(
    root: str, split: str, sentences: str = "all", image_dir: Optional[str] = None, split_by: str = "umd"
) -> tuple[list[RawRecord], Counter]:
    base = os.path.join(root, "refcocog")
    refs_path = os.path.join(base, f"refs({split_by}).p")
    inst_path = os.path.join(base, "instances.json")
    for p in (refs_path, inst_path):
        if not os.path.isfile(p):
            raise DatasetError(f"refcocog (refer layout): missing {p}; {REFER_ORIGIN}")
    try:
        with open(refs_path, "rb") as f:
            refs = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as e:
        raise DatasetError(f"refcocog: cannot unpickle {refs_path} (refer refs list expected): {e}") from e
    if not isinstance(refs, list):
        raise DatasetError(f"refcocog: {refs_path} holds a {type(refs).__name__}, expected the refer list of refs")
    try:
        with open(inst_path) as f:
            inst = json.load(f)
        images = {int(im["id"]): im for im in inst["images"]}
        anns = {int(a["id"]): a for a in inst["annotations"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"refcocog: {inst_path} is not a COCO instances file with images[id, file_name, width, height] and "
            f"annotations[id, bbox]: {type(e).__name__}: {e}"
        ) from e
    img_dir = _image_dir(root, image_dir)
    records: list[RawRecord] = []
    bad = BadRecords()
    for k, ref in enumerate(refs):
        ref = _norm_keys(ref)
        try:
            if _s(ref["split"]) != split:
                continue
            ref_id, image_id, ann_id = int(ref["ref_id"]), int(ref["image_id"]), int(ref["ann_id"])
            sents = [_norm_keys(s) for s in ref["sentences"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"refcocog: ref #{k} in {refs_path} lacks {e} (refer fields: ref_id, image_id, "
                               "ann_id, sentences, split)") from e
        ann = anns.get(ann_id)
        im = images.get(image_id)
        if ann is None or im is None:
            bad.note("annotation or image missing from instances.json", f"refcocog-ref{ref_id}",
                     f"ann_id {ann_id}, image_id {image_id} in {inst_path}")
            continue
        file_name = _s(im.get("file_name") or "COCO_train2014_%012d.jpg" % image_id)
        ref_image = FileImage(os.path.join(img_dir, file_name))
        try:
            box = xywh_to_xyxy(ann["bbox"])
        except (KeyError, TypeError, ValueError):
            bad.note("malformed box", f"refcocog-ref{ref_id}", f"image {ref_image.describe()}")
            continue
        chosen = sents if sentences == "all" else sents[:1]
        for s in chosen:
            text = _s(s.get("sent") or s.get("raw") or "").strip()
            if not text:
                bad.note("empty expression", f"refcocog-{ref_id}-{int(s.get('sent_id', 0))}",
                         f"image {ref_image.describe()}")
                continue
            records.append(
                RawRecord(
                    sample_id=f"refcocog-{ref_id}-{int(s.get('sent_id', 0))}",
                    expression=text,
                    box=box,
                    image=ref_image,
                    width=int(im["width"]) if "width" in im else None,
                    height=int(im["height"]) if "height" in im else None,
                    meta={"ref_id": ref_id, "image_id": image_id, "ann_id": ann_id, "file_name": file_name,
                          "category_id": ref.get("category_id"), "split": split},
                )
            )
    return records, bad


def read_parquet(
    root: str, split: str, sentences: str = "all", holdout_fraction: float = 0.2
) -> tuple[list[RawRecord], Counter]:
    import pyarrow.parquet as pq

    base = os.path.join(root, "refcocog")
    upstream = "test" if split == "test" else "val"
    files = _parquet_files(base, upstream)
    if not files:
        raise DatasetError(
            f"refcocog (parquet layout): no {base}/data/{upstream}-*.parquet; our {split!r} split reads upstream "
            f"{upstream!r}; from {PARQUET_ORIGIN}"
        )
    need = ["question_id", "answer", "bbox", "file_name"]
    records: list[RawRecord] = []
    bad = BadRecords()
    for path in files:
        try:
            schema = pq.read_schema(path)
            missing = [c for c in need + ["image"] if c not in schema.names]
            if missing:
                raise DatasetError(
                    f"refcocog: {path} lacks columns {missing}; lmms-lab/RefCOCOg columns are question_id, image, "
                    f"question, answer, segmentation, bbox, iscrowd, file_name ({PARQUET_ORIGIN})"
                )
            table = pq.read_table(path, columns=need)
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"refcocog: cannot read parquet {path}: {type(e).__name__}: {e}") from e
        cols = table.to_pydict()
        images = RowGroupCache(path, "image")
        for row in range(table.num_rows):
            file_name = str(cols["file_name"][row])
            if split != "test" and holdout_split(file_name, holdout_fraction) != split:
                continue
            qid = str(cols["question_id"][row])
            bbox = cols["bbox"][row]
            if bbox is None or len(bbox) != 4:
                bad.note("malformed box", f"refcocog-{qid}", f"{path} row {row} ({file_name})")
                continue
            box = xywh_to_xyxy(bbox)
            answers = [a for a in (cols["answer"][row] or []) if isinstance(a, str)]
            if isinstance(cols["answer"][row], str):
                answers = [cols["answer"][row]]
            chosen = list(enumerate(answers)) if sentences == "all" else list(enumerate(answers))[:1]
            ref_image = BytesImage(f"{path}#{row}", functools.partial(images.get, row), f"{path} row {row} ({file_name})")
            if not chosen:
                bad.note("empty expression", f"refcocog-{qid}", ref_image.describe())
            for k, text in chosen:
                text = text.strip()
                if not text:
                    bad.note("empty expression", f"refcocog-{qid}-{k}", ref_image.describe())
                    continue
                records.append(
                    RawRecord(
                        sample_id=f"refcocog-{qid}-{k}",
                        expression=text,
                        box=box,
                        image=ref_image,
                        meta={"question_id": qid, "file_name": file_name, "upstream_split": upstream, "split": split},
                    )
                )
    return records, bad


def read_records(
    split: str,
    data_root_: Optional[str] = None,
    *,
    layout: str = "auto",
    sentences: str = "all",
    image_dir: Optional[str] = None,
    holdout_fraction: float = 0.2,
) -> tuple[list[RawRecord], Counter, str]:
    """Annotation records of ``split`` (no image is opened), dropped-record counts, and a description of the source."""
    _check_split(split)
    if sentences not in ("all", "first"):
        raise ValueError(f"sentences must be 'all' or 'first', got {sentences!r}")
    root = data_root(data_root_, NAME)
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "refer":
        recs, bad = read_refer(root, split, sentences, image_dir)
        return recs, bad, f"refer layout in {os.path.join(root, 'refcocog')}"
    if layout == "parquet":
        recs, bad = read_parquet(root, split, sentences, holdout_fraction)
        return recs, bad, f"parquet layout in {os.path.join(root, 'refcocog')}"
    raise ValueError(f"layout must be 'auto', 'refer' or 'parquet', got {layout!r}")


class RefCOCOg(RecordDataset):
    """RefCOCOg umd (see module doc). kwargs: ``layout``, ``sentences``, ``image_dir``, ``holdout_fraction``,
    ``on_bad_sample`` ("skip" | "raise"), ``check_images`` (True | "full" | False), ``limit``."""

    def __init__(self, split: str = "train", data_root: Optional[str] = None, *, on_bad_sample: str = "skip",
                 check_images=True, limit: Optional[int] = None, max_expression_chars: int = MAX_EXPRESSION_CHARS,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, **kwargs):
        records, bad, where = read_records(split, data_root, **kwargs)
        super().__init__(records, NAME, split, on_bad_sample=on_bad_sample, check_images=check_images,
                         bad_counts=bad, limit=limit, where=where, max_expression_chars=max_expression_chars,
                         max_image_pixels=max_image_pixels)
