"""Each real-data loader on a fixture written in its exact upstream layout (see fixtures.py)."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from ivt_env.datasets import DatasetError, load_dataset
from ivt_env.datasets.splits import hash_unit, holdout_split, proportional_sizes

from . import fixtures as fx


def red_box(img: np.ndarray):
    """Bounding box (xyxy, pixel edges) of the fixture's box colour, found in the pixels (JPEG-tolerant)."""
    m = (img[..., 0] > 170) & (img[..., 1] < 110) & (img[..., 2] < 110)
    ys, xs = np.nonzero(m)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


# ---------------------------------------------------------------------------------------------- RefCOCOg / refer
def test_refcocog_refer_all_sentences(tmp_path):
    root = fx.write_refcocog_refer(str(tmp_path))
    ds = load_dataset("refcocog", "train", data_root=root)
    # train refs 1 (2 sentences) and 2 (1 sentence), in pickle order
    assert ds.sample_ids == ["refcocog-1-11", "refcocog-1-12", "refcocog-2-21"]
    s = ds[0]
    assert s.expression == "the red box on the left"
    assert s.gt_box == (10.0, 8.0, 30.0, 24.0)  # [10, 8, 20, 16] xywh
    assert (s.width, s.height, s.source) == (64, 48, "refcocog")
    img = s.load_image()
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert red_box(img) == (10, 8, 30, 24)
    assert ds[2].gt_box == (40.0, 20.0, 56.0, 40.0)
    assert ds[1].meta["ann_id"] == 101 and ds[1].meta["file_name"] == "COCO_train2014_000000000001.jpg"
    assert ds.index_of("refcocog-2-21") == 2 and ds.bad_counts == {}


def test_refcocog_refer_splits_and_first_sentence(tmp_path):
    root = fx.write_refcocog_refer(str(tmp_path))
    assert len(load_dataset("refcocog", "val", data_root=root)) == 2
    test = load_dataset("refcocog", "test", data_root=root)
    assert test.sample_ids == ["refcocog-4-41", "refcocog-5-51"]
    assert test[1].gt_box == (12.5, 12.0, 36.5, 36.0)  # fractional COCO boxes stay floats
    first = load_dataset("refcocog", "train", data_root=root, sentences="first")
    assert first.sample_ids == ["refcocog-1-11", "refcocog-2-21"]
    assert len(load_dataset("refcocog", "val", data_root=root, sentences="first")) == 1


def test_refcocog_refer_data_root_from_env_and_image_dir(tmp_path, monkeypatch):
    root = fx.write_refcocog_refer(str(tmp_path))
    monkeypatch.setenv("IVT_DATA", root)
    assert len(load_dataset("refcocog", "train")) == 3
    os.rename(os.path.join(root, "coco", "train2014"), os.path.join(root, "elsewhere"))
    with pytest.raises(DatasetError, match=r"train2014.*image_dir"):
        load_dataset("refcocog", "train")
    ds = load_dataset("refcocog", "train", image_dir=os.path.join(root, "elsewhere"))
    assert red_box(ds[0].load_image()) == (10, 8, 30, 24)


def test_refcocog_refer_errors_name_file_layout_and_origin(tmp_path, monkeypatch):
    monkeypatch.delenv("IVT_DATA", raising=False)
    with pytest.raises(DatasetError, match="IVT_DATA"):
        load_dataset("refcocog", "train")
    with pytest.raises(DatasetError, match=r"refs\(umd\)\.p.*lmms-lab/RefCOCOg"):
        load_dataset("refcocog", "train", data_root=str(tmp_path))
    root = fx.write_refcocog_refer(str(tmp_path))
    os.remove(os.path.join(root, "refcocog", "instances.json"))
    with pytest.raises(DatasetError, match=r"instances\.json.*refer"):
        load_dataset("refcocog", "train", data_root=root)
    with open(os.path.join(root, "refcocog", "instances.json"), "w") as f:
        json.dump({"images": []}, f)
    with pytest.raises(DatasetError, match="annotations"):
        load_dataset("refcocog", "train", data_root=root)
    with pytest.raises(DatasetError, match="splits"):
        load_dataset("refcocog", "testA", data_root=root)


def test_refcocog_refuses_pickles_with_code(tmp_path):
    root = fx.write_refcocog_refer(str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(root, "refcocog", "refs(umd).p"), "wb") as f:
        pickle.dump([Evil()], f)
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset("refcocog", "train", data_root=root)


# -------------------------------------------------------------------------------------------- RefCOCOg / parquet
def test_refcocog_parquet_layout_and_split_mapping(tmp_path):
    root = fx.write_refcocog_parquet(str(tmp_path))
    test = load_dataset("refcocog", "test", data_root=root)
    # one sample per (row, answer): t0 has 1 answer, t1 has 3
    assert test.sample_ids == ["refcocog-t0-0", "refcocog-t1-0", "refcocog-t1-1", "refcocog-t1-2"]
    assert test[0].gt_box == (10.0, 10.0, 35.0, 40.0)
    assert (test[1].width, test[1].height) == (70, 30)  # no size columns upstream: read from the image bytes
    assert test[2].expression == "all of it"
    assert red_box(test[0].load_image()) == (10, 10, 35, 40)
    train = load_dataset("refcocog", "train", data_root=root)
    val = load_dataset("refcocog", "val", data_root=root)
    rows = fx.REFCOCOG_PARQUET_ROWS["val"]
    # every upstream-val (row, answer) lands in exactly one of train / val, whole images at a time
    assert len(train) + len(val) == sum(len(r[4]) for r in rows)
    assert not set(train.sample_ids) & set(val.sample_ids)
    for ds, name in ((train, "train"), (val, "val")):
        for s in ds:
            assert holdout_split(s.meta["file_name"], 0.2) == name
    # lazy image reads across row groups (row_group_size=3) give each row its own image
    for s in list(train) + list(val):
        i = int(s.meta["question_id"][1:])
        assert red_box(s.load_image()) == (4 + i, 6, 24 + i, 18)
    assert len(load_dataset("refcocog", "test", data_root=root, sentences="first")) == 2


def test_refcocog_parquet_missing_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "refcocog" / "data" / "val-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"question_id": ["a"], "answer": [["x"]]}), str(path))
    with pytest.raises(DatasetError, match=r"lacks columns \['bbox', 'file_name', 'image'\]"):
        load_dataset("refcocog", "val", data_root=str(tmp_path))
    with pytest.raises(DatasetError, match="test-\\*\\.parquet"):
        load_dataset("refcocog", "test", data_root=str(tmp_path))


# ------------------------------------------------------------------------------------------------------ Ref-L4
@pytest.mark.parametrize("images", ["folder", "tar"])
def test_refl4_layouts(tmp_path, images):
    root = fx.write_refl4(str(tmp_path), images=images)
    test = load_dataset("refl4", "test", data_root=root)
    assert test.sample_ids == ["refl4-100", "refl4-101"]
    s = test[1]
    assert s.expression == "red band at the bottom" and s.gt_box == (0.0, 30.0, 40.0, 56.0)
    assert (s.width, s.height) == (40, 56)
    assert red_box(s.load_image()) == (0, 30, 40, 56)
    assert s.meta["ori_category_id"] == "o365_5" and s.meta["upstream_split"] == "test"
    train = load_dataset("refl4", "train", data_root=root)
    val = load_dataset("refl4", "val", data_root=root)
    assert len(train) + len(val) == len(fx.REFL4_ROWS["val"])
    # split by image: both rows of an image go the same way
    for ds, name in ((train, "train"), (val, "val")):
        assert all(holdout_split(str(x.meta["image_id"]), 0.2) == name for x in ds)
    for x in train:
        i0 = int(x.sample_id.split("-")[1]) // 2 * 2  # each image shows the box of its first (even) row
        assert red_box(x.load_image()) == (2 + i0, 4, 18 + i0, 16)
    if images == "tar":
        assert os.path.isdir(os.path.join(root, "refl4", "images"))  # extracted once, top folder flattened
        assert os.path.isfile(os.path.join(root, "refl4", "images", "COCO_val2014_000000007000.jpg"))


def test_refl4_missing_files(tmp_path):
    with pytest.raises(DatasetError, match=r"ref-l4-test\.parquet.*JierunChen/Ref-L4"):
        load_dataset("refl4", "test", data_root=str(tmp_path))
    root = fx.write_refl4(str(tmp_path))
    import shutil

    shutil.rmtree(os.path.join(root, "refl4", "images"))
    with pytest.raises(DatasetError, match=r"images.*images\.tar\.gz"):
        load_dataset("refl4", "test", data_root=root)
    with open(os.path.join(root, "refl4", "images.tar.gz"), "wb") as f:
        f.write(b"not a tar")
    with pytest.raises(DatasetError, match="cannot extract"):
        load_dataset("refl4", "test", data_root=root)
    assert not os.path.exists(os.path.join(root, "refl4", "images"))  # no half-extracted folder left


# -------------------------------------------------------------------------------------------------- Ref-Adv-s
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_refadv_formats_agree(tmp_path, fmt):
    root = fx.write_refadv(str(tmp_path), fmt=fmt)
    rows = fx.refadv_rows()
    alls = load_dataset("refadv", "all", data_root=root)
    assert len(alls) == 24
    for k, s in enumerate(alls):
        assert s.sample_id == f"refadv-{k}"
        assert s.gt_box == tuple(float(v) for v in rows[k]["solution"])  # solution is already xyxy
        assert s.expression == rows[k]["normal_caption"]
        assert s.meta["image_source"] == rows[k]["image_source"]
        assert (s.width, s.height) == (rows[k]["width"], rows[k]["height"])
    for k in (0, 3, 6):  # the first row of each image is the box drawn in it
        assert red_box(alls[k].load_image()) == tuple(rows[k]["solution"])
    parts = [load_dataset("refadv", sp, data_root=root) for sp in ("train", "val", "test")]
    assert [len(p) for p in parts] == proportional_sizes(24, [800, 170, 172]) == [17, 3, 4]
    ids = [i for p in parts for i in p.sample_ids]
    assert sorted(ids) == sorted(alls.sample_ids)


def test_refadv_split_is_paper_sized_and_hash_ordered(tmp_path):
    root = fx.write_refadv(str(tmp_path), fmt="jsonl", n_rows=1142)
    sizes = [len(load_dataset("refadv", sp, data_root=root, check_images=False)) for sp in ("train", "val", "test")]
    assert sizes == [800, 170, 172]
    # independent check of the documented rule: rank rows by sha1("ivt/" + file_name), cut 800 / 170 / 172
    rows = fx.refadv_rows(1142)
    key = [int.from_bytes(hashlib.sha1(f"ivt/{r['file_name']}".encode()).digest()[:8], "big") for r in rows]
    order = sorted(range(1142), key=lambda i: (key[i], i))
    val = load_dataset("refadv", "val", data_root=root, check_images=False)
    assert sorted(val.sample_ids) == sorted(f"refadv-{i}" for i in order[800:970])
    assert hash_unit("x") == int.from_bytes(hashlib.sha1(b"ivt/x").digest()[:8], "big") / 2**64


def test_refadv_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"train-\*\.parquet.*dddraxxx/ref-adv-s.*jsonl"):
        load_dataset("refadv", "train", data_root=str(tmp_path))
    base = tmp_path / "refadv"
    base.mkdir()
    (base / "train.jsonl").write_text('{"file_name": "a.jpg"}\n')
    with pytest.raises(DatasetError, match=r"train\.jsonl line 1 lacks \['normal_caption', 'solution'"):
        load_dataset("refadv", "train", data_root=str(tmp_path))
    (base / "train.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DatasetError, match="line 1 is not a JSON object"):
        load_dataset("refadv", "train", data_root=str(tmp_path))
    with pytest.raises(DatasetError, match="splits"):
        load_dataset("refadv", "dev", data_root=str(tmp_path))


def test_refadv_solution_as_string_and_limit(tmp_path):
    root = fx.write_refadv(str(tmp_path), fmt="jsonl", n_rows=6)
    path = os.path.join(root, "refadv", "train.jsonl")
    lines = [json.loads(x) for x in open(path)]
    lines[0]["solution"] = "<answer>[2, 4, 14, 13]</answer>"
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines))
    ds = load_dataset("refadv", "all", data_root=root)
    assert ds[0].gt_box == (2.0, 4.0, 14.0, 13.0)
    assert len(load_dataset("refadv", "all", data_root=root, limit=4)) == 4


def test_max_image_size(tmp_path):
    root = fx.write_refcocog_refer(str(tmp_path))
    # test refs are on images 3 (48x64) and 4 (64x64): (max height, max width)
    assert load_dataset("refcocog", "test", data_root=root).max_image_size == (64, 64)
    assert load_dataset("refcocog", "val", data_root=root).max_image_size == (60, 80)
    assert load_dataset("synthetic", "val", image_size=(200, 160)).max_image_size == (160, 200)
