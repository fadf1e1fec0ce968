"""IVT-SyntheticMulti-v0's dataset: deterministic scenes, every expression resolves to exactly its GT objects (an
independent check through the resolver), one to three referents, depth maps and GT depths; depth folders for real
datasets (the loader option ``depth_dir``) on the RefCOCOg fixture."""

import os

import numpy as np
import pytest
from PIL import Image

from ivt_env.datasets import DatasetError, load_dataset
from ivt_env.datasets.synthetic_language import SceneObject
from ivt_env.datasets.synthetic_multi import SyntheticMultiDataset, plural, resolve_multi
from ivt_env.depth import depth_consistent, depth_in_box
from tests.ivt_env.datasets.fixtures import write_refcocog_refer


@pytest.fixture(scope="module")
def ds():
    return SyntheticMultiDataset("test", num_samples=120)


def test_deterministic_and_split_streams(ds):
    other = SyntheticMultiDataset("test", num_samples=120)
    for i in (0, 7, 119):
        a, b = ds[i], other[i]
        assert a.expression == b.expression and a.meta["gt_boxes"] == b.meta["gt_boxes"]
        assert np.array_equal(a.load_image(), b.load_image())
    val = SyntheticMultiDataset("val", num_samples=120)
    assert [ds[i].expression for i in range(20)] != [val[i].expression for i in range(20)]
    assert ds[3].sample_id == "synthetic_multi-test-000003" and ds.index_of(ds[3].sample_id) == 3


def test_every_expression_denotes_exactly_its_gt_objects(ds):
    counts = {1: 0, 2: 0, 3: 0}
    margin = ds.config.margin * min(ds.config.image_size)
    for i in range(len(ds)):
        s = ds[i]
        objects = [SceneObject(o["kind"], o["colour"], o["size"], tuple(o["box"])) for o in s.meta["objects"]]
        certain, possible = resolve_multi(s.expression, objects, margin)
        assert certain == possible == set(s.meta["targets"]), (i, s.expression)
        k = s.meta["num_targets"]
        counts[k] += 1
        assert [list(objects[j].box) for j in s.meta["targets"]] == s.meta["gt_boxes"] and len(s.meta["gt_boxes"]) == k
        cx = [(b[0] + b[2]) / 2 for b in s.meta["gt_boxes"]]
        assert cx == sorted(cx) and tuple(s.gt_box) == tuple(s.meta["gt_boxes"][0])
        if k > 1:
            assert s.expression.split()[0] in ("both", "all", "every")
    assert all(n > 15 for n in counts.values()), counts


def test_resolver_by_hand():
    blue = [SceneObject("circle", "blue", "small", (0, 0, 10, 10)), SceneObject("circle", "blue", "large", (50, 0, 80, 30)),
            SceneObject("square", "green", "small", (100, 0, 110, 10))]
    assert resolve_multi("both blue circles", blue, 2.0) == ({0, 1}, {0, 1})
    assert resolve_multi("all three shapes", blue, 2.0) == ({0, 1, 2}, {0, 1, 2})
    assert resolve_multi("every circle", blue, 2.0) == ({0, 1}, {0, 1})
    assert resolve_multi("every shape left of the green square", blue, 2.0) == ({0, 1}, {0, 1})
    assert resolve_multi("both shapes", blue, 2.0) == (set(), set())  # three shapes: "both" does not hold
    assert resolve_multi("every square", blue, 2.0) == (set(), set())  # one square: "every" needs two or more
    assert resolve_multi("the green square", blue, 2.0) == ({2}, {2})
    assert plural(type("NP", (), {"size": "large", "colour": "blue", "kind": "circle"})()) == "large blue circles"


def test_depth_maps_and_gt_depths(ds):
    for i in range(10):
        s = ds[i]
        depth = s.meta["load_depth"]()
        assert depth.shape == (128, 128) and depth.dtype == np.float32 and depth.max() == 1.0
        assert len(s.meta["gt_depths"]) == s.meta["num_targets"]
        for box, d in zip(s.meta["gt_boxes"], s.meta["gt_depths"]):
            assert 0.2 <= d <= 0.9 and depth_consistent(d, depth_in_box(depth, box))
            assert depth_in_box(depth, box) == pytest.approx(d, abs=1e-6)


def test_depth_in_box_and_check_by_hand():
    d = np.ones((10, 10), dtype=np.float32)
    d[:, :4] = 0.5  # 4 of 10 columns near: the 25th percentile of the full map is 0.5
    assert depth_in_box(d, (0, 0, 10, 10)) == 0.5
    assert depth_in_box(d, (5, 0, 10, 10)) == 1.0 and depth_in_box(d, (20, 20, 30, 30)) is None
    assert depth_consistent(0.55, 0.5) and not depth_consistent(0.56, 0.5) and not depth_consistent(0.5, None)


def test_depth_dir_loader_option(tmp_path):
    root = write_refcocog_refer(str(tmp_path / "data"))
    plain = load_dataset("refcocog", "val", data_root=root)
    depth_dir = tmp_path / "depth"
    depth_dir.mkdir()
    names = set()
    for s in plain:
        stem = os.path.splitext(os.path.basename(s.load_image.ref.path))[0]
        if stem in names:
            continue
        names.add(stem)
        arr = np.full((s.height, s.width), 2.0, dtype=np.float32)
        if len(names) % 2:
            np.save(depth_dir / f"{stem}.npy", arr)
        else:  # a 16-bit PNG in millimetres: depth_scale 1000 gives metres
            Image.fromarray((arr * 1000).astype(np.uint16)).save(depth_dir / f"{stem}.png")
    ds = load_dataset("refcocog", "val", data_root=root, depth_dir=str(depth_dir), depth_scale=1.0)
    got = {float(s.meta["load_depth"]().max()) for s in ds}
    assert got <= {2.0, 2000.0} and len(ds) == len(plain)
    ds = load_dataset("refcocog", "val", data_root=root, depth_dir=str(depth_dir), depth_scale=1000.0)
    assert all(s.meta["load_depth"]().shape == (s.height, s.width) for s in ds)
    for f in depth_dir.iterdir():
        f.unlink()
        break
    with pytest.raises(DatasetError, match="no depth map for"):
        load_dataset("refcocog", "val", data_root=root, depth_dir=str(depth_dir))


def test_env_depth_observation_on_a_real_dataset(tmp_path):
    import gymnasium as gym

    root = write_refcocog_refer(str(tmp_path / "data"))
    depth_dir = tmp_path / "depth"
    depth_dir.mkdir()
    for s in load_dataset("refcocog", "val", data_root=root):
        stem = os.path.splitext(os.path.basename(s.load_image.ref.path))[0]
        np.save(depth_dir / f"{stem}.npy", np.full((s.height, s.width), 3.0, dtype=np.float32))
    env = gym.make("IVT-RefCOCOg-v0", data_root=root, split="val", depth_observation=True,
                   dataset_kwargs={"depth_dir": str(depth_dir)})
    obs, info = env.reset(seed=0)
    assert obs["depth"].shape == obs["image"].shape[:2] and float(obs["depth"].max()) == 3.0
