"""Synthetic scenes: determinism, tight boxes, and that every expression picks out exactly one object.

Uniqueness is checked by a second, independent reading of the expression written here from the grammar's
documented semantics (regexes over the text + the objects in ``meta``), not by calling the generator's resolver.
"""

import re

import numpy as np
import pytest

from ivt_env.datasets import VOCABULARY, DatasetError, load_dataset
from ivt_env.datasets.synthetic import SyntheticDataset
from ivt_env.datasets.synthetic_language import SceneObject, is_unique, resolve

COLS = "blue|green|yellow|white"
NP = rf"(?:(small|large) )?(?:({COLS}) )?(circle|square|triangle|shape)"


def _match(o, size, colour, head):
    return (size is None or o["size"] == size) and (colour is None or o["colour"] == colour) and (
        head == "shape" or o["kind"] == head
    )


def _centre(o):
    x1, y1, x2, y2 = o["box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def _referents(expr, objs, m):
    """Independent reading: the list of objects the expression can denote (ambiguous -> several or none)."""
    if mt := re.fullmatch(rf"the {NP}", expr):
        return [j for j, o in enumerate(objs) if _match(o, *mt.groups())]
    if mt := re.fullmatch(rf"the (leftmost|rightmost|topmost|bottommost) {NP}", expr):
        d, *np_ = mt.groups()
        c = [j for j, o in enumerate(objs) if _match(o, *np_)]
        key = {"leftmost": lambda j: _centre(objs[j])[0], "rightmost": lambda j: -_centre(objs[j])[0],
               "topmost": lambda j: _centre(objs[j])[1], "bottommost": lambda j: -_centre(objs[j])[1]}[d]
        c.sort(key=key)
        if len(c) >= 2 and key(c[1]) - key(c[0]) < m:
            return c[:2]  # too close to call
        return c[:1]
    if mt := re.fullmatch(rf"the (larger|smaller) {NP}", expr):
        d, *np_ = mt.groups()
        c = [j for j, o in enumerate(objs) if _match(o, *np_)]
        if len(c) != 2 or objs[c[0]]["size"] == objs[c[1]]["size"]:
            return []
        want = "large" if d == "larger" else "small"
        return [j for j in c if objs[j]["size"] == want]
    mt = re.fullmatch(rf"the {NP} (left of|right of|above|below) the {NP}", expr)
    assert mt, f"expression outside the grammar: {expr!r}"
    g = mt.groups()
    anchors = [j for j, o in enumerate(objs) if _match(o, *g[4:7])]
    if len(anchors) != 1:
        return []
    ax, ay = _centre(objs[anchors[0]])
    out = []
    for j, o in enumerate(objs):
        if j == anchors[0] or not _match(o, *g[0:3]):
            continue
        x, y = _centre(o)
        delta = {"left of": ax - x, "right of": x - ax, "above": ay - y, "below": y - ay}[g[3]]
        if delta > -m:  # certainly or possibly on that side
            out.append(j)
            if delta < m:
                out.append(j)  # undecided counts as ambiguous
    return out


def test_expressions_identify_exactly_one_object_independent_check():
    ds = load_dataset("synthetic", "train")
    m = ds.config.margin * min(ds.config.image_size)
    types = set()
    for i in range(600):
        s = ds[i]
        objs = s.meta["objects"]
        assert _referents(s.expression, objs, m) == [s.meta["target"]], (i, s.expression, objs)
        types.add(s.meta["expression_type"])
        assert s.gt_box == tuple(objs[0]["box"])
    assert types == {"attribute", "superlative", "comparative", "relation"}


def test_distractors_of_same_category_are_common():
    ds = load_dataset("synthetic", "val")
    shared = 0
    for s in ds:
        t, *others = s.meta["objects"]
        shared += any(o["kind"] == t["kind"] or o["colour"] == t["colour"] for o in others)
    assert shared / len(ds) > 0.7
    assert all(2 <= len(s.meta["objects"]) <= 4 for s in ds)


def test_deterministic_by_seed_split_index_and_independent_of_access_order():
    a = SyntheticDataset("train", seed=3)
    b = SyntheticDataset("train", seed=3)
    late = [b[i] for i in (50, 7, 3)]
    for s in late:
        t = a[s.meta["index"]]
        assert (t.expression, t.gt_box, t.sample_id) == (s.expression, s.gt_box, s.sample_id)
        assert np.array_equal(t.load_image(), s.load_image())
    other_seed = SyntheticDataset("train", seed=4)
    assert sum(other_seed[i].gt_box != a[i].gt_box for i in range(20)) >= 15
    val = SyntheticDataset("val", seed=3)
    assert sum(val[i].gt_box != a[i].gt_box for i in range(20)) >= 15


def test_scene_memo_returns_the_built_scene_and_is_bounded():
    from ivt_env.datasets.synthetic import SCENE_MEMO

    a = SyntheticDataset("train", seed=5)
    first = a.scene(3)
    first[0].clear()  # a caller's edit of the returned lists does not reach the memo
    for i in range(4, 4 + SCENE_MEMO + 10):  # evicts index 3
        a.scene(i)
    assert len(a._scenes) == SCENE_MEMO and 3 not in a._scenes
    fresh = SyntheticDataset("train", seed=5)  # nothing memoised: built from (seed, split, index) alone
    for i in (3, 3, 200, 4 + SCENE_MEMO + 9):  # rebuilt after eviction, from the memo, recently built
        want, got = fresh._build_scene(i), a.scene(i)
        assert got == (list(want[0]), list(want[1]), want[2], want[3])
        assert (a[i].expression, a[i].gt_box) == (fresh[i].expression, fresh[i].gt_box)


def test_gt_box_is_tight_pixel_box_of_the_drawn_target():
    from ivt_env.datasets.synthetic import render_scene

    ds = SyntheticDataset("test", image_size=(200, 160))
    for i in range(40):
        objects, places, expr, _ = ds.scene(i)
        only = render_scene(objects, places, ds.config, only=0)
        bg = np.array(ds.config.background, dtype=np.uint8)
        ys, xs = np.nonzero(np.any(only != bg, axis=-1))
        assert objects[0].box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        s = ds[i]
        img = s.load_image()
        assert img.shape == (160, 200, 3) and img.dtype == np.uint8
        assert (s.width, s.height) == (200, 160)


def test_shapes_do_not_overlap_and_stay_inside():
    ds = SyntheticDataset("train")
    for i in range(300):
        objs = [o["box"] for o in ds[i].meta["objects"]]
        for j, p in enumerate(objs):
            assert 0 <= p[0] < p[2] <= 128 and 0 <= p[1] < p[3] <= 128
            for q in objs[j + 1:]:
                assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]


def test_vocabulary_covers_every_expression():
    ds = SyntheticDataset("train")
    words = {w for i in range(500) for w in ds[i].expression.split()}
    assert words <= set(VOCABULARY)
    assert len(VOCABULARY) == 22 and "red" not in VOCABULARY


def test_resolver_hand_cases():
    def obj(kind, colour, size, x, y, d=10):
        return SceneObject(kind, colour, size, (x, y, x + d, y + d))

    objs = [obj("circle", "blue", "small", 10, 10), obj("circle", "green", "large", 40, 10, 20), obj("square", "blue", "small", 42, 60)]
    assert is_unique("the green circle", objs, 1, 4)
    assert not is_unique("the circle", objs, 0, 4)
    assert is_unique("the leftmost circle", objs, 0, 4)
    assert is_unique("the larger circle", objs, 1, 4)
    assert is_unique("the smaller circle", objs, 0, 4)
    assert not is_unique("the larger blue shape", objs, 0, 4)  # both blue ones are small
    # the blue square's centre (47) is 3 px left of the green circle's (50): inside the 4 px margin -> undecided
    assert resolve("the blue shape left of the green circle", objs, 4) == ({0}, {0, 2})
    assert not is_unique("the blue shape left of the green circle", objs, 0, 4)
    moved = objs[:2] + [obj("square", "blue", "small", 52, 60)]  # centre 57: certainly not left of 50
    assert is_unique("the blue shape left of the green circle", moved, 0, 4)
    assert resolve("the blue shape right of the green circle", moved, 4) == ({2}, {2})
    assert is_unique("the blue shape below the green circle", objs, 2, 4)
    with pytest.raises(ValueError):
        resolve("a red circle", objs, 4)


def test_sample_ids_lookup_and_errors():
    ds = load_dataset("synthetic", "val", num_samples=30)
    assert len(ds) == 30 and ds.sample_ids[4] == "synthetic-val-000004"
    assert ds.index_of("synthetic-val-000004") == 4
    assert "synthetic-train-000004" not in ds.sample_ids
    with pytest.raises(IndexError):
        ds[30]
    with pytest.raises(DatasetError, match="no split"):
        load_dataset("synthetic", "dev")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet", "train")
    assert len(load_dataset("synthetic", "train")) == 20000
