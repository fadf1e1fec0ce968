"""The balanced 1:1:1 Mix: balance, interleaving, reproducibility, replacement of bad records, paper sizes."""

import zlib

import numpy as np
import pytest

from ivt_env.datasets import DatasetError, load_dataset
from ivt_env.datasets.mix import PAPER_PER_DATASET
from ivt_env.datasets.refadv import read_records as refadv_records

from . import fixtures as fx


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fx.write_all(str(tmp_path_factory.mktemp("mix")))


def test_balanced_interleaved_and_prefixed(root):
    m = load_dataset("mix", "test", data_root=root, per_dataset=2)
    assert len(m) == 6 and m.per_source == {"refcocog": 2, "refadv": 2, "refl4": 2} and m.shortfall == {}
    assert [s.source for s in m] == ["refcocog", "refadv", "refl4"] * 2
    assert all(s.sample_id.startswith(s.source + "-") for s in m)
    assert (m.name, m.split) == ("mix", "test")
    assert m.index_of(m.sample_ids[4]) == 4
    img = m[2].load_image()
    assert img.shape == (m[2].height, m[2].width, 3)


def test_reproducible_and_seeded(root):
    a = load_dataset("mix", "train", data_root=root, per_dataset=3, seed=0)
    b = load_dataset("mix", "train", data_root=root, per_dataset=3, seed=0)
    assert a.sample_ids == b.sample_ids
    assert [s.gt_box for s in a] == [s.gt_box for s in b]
    others = {tuple(load_dataset("mix", "train", data_root=root, per_dataset=3, seed=s).sample_ids) for s in range(1, 5)}
    assert len(others | {tuple(a.sample_ids)}) > 1


def test_selection_follows_the_documented_rule(root):
    # refadv/train: the first 3 records of the permutation default_rng([seed, crc32(source), crc32(split)])
    recs, _, _ = refadv_records("train", root)
    order = np.random.default_rng([7, zlib.crc32(b"refadv"), zlib.crc32(b"train")]).permutation(len(recs))
    m = load_dataset("mix", "train", data_root=root, per_dataset=3, seed=7, sources=("refadv",))
    assert m.sample_ids == [recs[i].sample_id for i in order[:3]]


def test_refcocog_contributes_one_sample_per_object_by_default(root):
    m = load_dataset("mix", "train", data_root=root, per_dataset=5, sources=("refcocog",))
    assert sorted(m.sample_ids) == ["refcocog-1-11", "refcocog-2-21"]  # first sentence of refs 1 and 2
    assert m.shortfall == {"refcocog": 3}
    m = load_dataset("mix", "train", data_root=root, per_dataset=5, sources=("refcocog",),
                     dataset_kwargs={"refcocog": {"sentences": "all"}})
    assert len(m) == 3


def test_bad_records_are_replaced_to_keep_balance(tmp_path):
    r = fx.write_refl4(str(tmp_path), bad=True)
    fx.write_refadv(r, n_rows=60)
    fx.write_refcocog_parquet(r)
    # refl4/test has 15 rows of which 10 usable; refadv/test 60 * 172/1142 -> 9 rows; refcocog/test 2 objects
    m = load_dataset("mix", "test", data_root=r, per_dataset=2)
    assert m.per_source == {"refcocog": 2, "refadv": 2, "refl4": 2} and m.shortfall == {}
    assert all(k.startswith("refl4: ") for k in m.bad_counts)  # bad refl4 rows met while drawing were skipped
    big = load_dataset("mix", "test", data_root=r, per_dataset=10)
    assert big.per_source["refl4"] == 10 and big.shortfall == {"refcocog": 8, "refadv": 1}
    assert big.bad_counts["refl4: unreadable image"] == 2 and big.bad_counts["refl4: zero-area box"] == 1
    # interleaving continues with the sources that still have samples
    assert [s.source for s in big][:6] == ["refcocog", "refadv", "refl4"] * 2
    assert [s.source for s in big][6:] == ["refadv", "refl4"] * 7 + ["refl4"]
    with pytest.raises(DatasetError, match="bad record"):
        load_dataset("mix", "test", data_root=r, per_dataset=10, on_bad_sample="raise")


def test_paper_sizes_from_the_1142_row_ref_adv(tmp_path):
    assert PAPER_PER_DATASET == {"train": 800, "val": 170, "test": 172}
    r = fx.write_refadv(str(tmp_path), fmt="jsonl", n_rows=1142)
    sizes = [len(load_dataset("mix", sp, data_root=r, sources=("refadv",))) for sp in ("train", "val", "test")]
    assert sizes == [800, 170, 172]


def test_errors(root):
    with pytest.raises(DatasetError, match="unknown source"):
        load_dataset("mix", "train", data_root=root, sources=("imagenet",))
    with pytest.raises(DatasetError, match="no count for split"):
        load_dataset("mix", "dev", data_root=root, per_dataset={"train": 1})


def test_datasets_and_samples_pickle_for_worker_processes(root, tmp_path):
    import pickle

    fx.write_refcocog_parquet(str(tmp_path))
    for ds in (load_dataset("mix", "test", data_root=root, per_dataset=2),
               load_dataset("refcocog", "test", data_root=str(tmp_path)),
               load_dataset("synthetic", "val")):
        back = pickle.loads(pickle.dumps(ds))
        assert list(back.sample_ids) == list(ds.sample_ids)
        s, t = ds[1], back[1]
        assert (s.expression, s.gt_box) == (t.expression, t.gt_box)
        assert np.array_equal(s.load_image(), t.load_image())
        assert np.array_equal(pickle.loads(pickle.dumps(s)).load_image(), s.load_image())
