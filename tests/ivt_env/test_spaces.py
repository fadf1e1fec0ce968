"""ImageSpace and FreeText: membership, sampling, equality, pickling and the shared-memory round trip."""

import multiprocessing as mp
import pickle
from copy import deepcopy

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.vector.utils import batch_space, create_shared_memory, read_from_shared_memory, write_to_shared_memory

from ivt_env.spaces import FreeText, ImageSpace


def test_image_space_contains():
    s = ImageSpace(100, 200)
    assert s.contains(np.zeros((100, 200, 3), np.uint8)) and s.contains(np.zeros((1, 1, 3), np.uint8))
    assert not s.contains(np.zeros((101, 10, 3), np.uint8))  # too tall
    assert not s.contains(np.zeros((10, 201, 3), np.uint8))  # too wide
    assert not s.contains(np.zeros((10, 10, 3), np.float32))  # dtype
    assert not s.contains(np.zeros((10, 10), np.uint8))  # rank
    assert not s.contains(np.zeros((10, 10, 4), np.uint8))  # channels
    assert not s.contains(np.zeros((0, 10, 3), np.uint8))  # empty
    assert not s.contains([[[0, 0, 0]]])
    with pytest.raises(ValueError):
        ImageSpace(0, 10)


def test_image_space_sample_eq_pickle():
    s = ImageSpace(30, 40, seed=3)
    for _ in range(20):
        x = s.sample()
        assert s.contains(x)
    assert ImageSpace(30, 40) == s and ImageSpace(30, 41) != s and s != spaces.Box(0, 255, (30, 40, 3))
    assert pickle.loads(pickle.dumps(s)) == s
    assert not s.is_np_flattenable
    with pytest.raises(ValueError):
        s.sample(mask=1)
    assert np.array_equal(s.from_jsonable(s.to_jsonable([np.ones((2, 2, 3), np.uint8)]))[0], np.ones((2, 2, 3)))


def test_free_text():
    s = FreeText(10)
    assert s.contains("") and s.contains("héllo ✓ 中") and s.contains("<b>[1,2]")
    assert not s.contains("x" * 11) and not s.contains(b"abc") and not s.contains(3)
    assert s == FreeText(10) and s != FreeText(11) and s != spaces.Text(10, min_length=0)
    assert all(s.contains(s.sample()) for _ in range(20))


@pytest.mark.parametrize(
    "space,values",
    [
        (ImageSpace(6, 5), [np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3), np.full((2, 3, 3), 7, np.uint8)]),
        (FreeText(12), ["héllo ✓ 中", "", "\ud800 lone"]),
    ],
)
def test_shared_memory_round_trip_reads_fresh_values(space, values):
    shm = create_shared_memory(space, n=2, ctx=mp.get_context("spawn"))
    view = read_from_shared_memory(space, shm, n=2)  # created once, read after every write (AsyncVectorEnv)
    for i, v in enumerate(values):
        write_to_shared_memory(space, i % 2, v, shm)
        got = view[i % 2]
        assert (np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v)
    copied = deepcopy(view)
    assert isinstance(copied, tuple) and len(copied) == 2
    with pytest.raises(ValueError):
        too_big = np.zeros((7, 7, 3), np.uint8) if isinstance(space, ImageSpace) else "x" * 13
        write_to_shared_memory(space, 0, too_big, shm)


def test_batch_space_is_a_tuple_of_copies():
    b = batch_space(ImageSpace(4, 4), 3)
    assert isinstance(b, spaces.Tuple) and len(b) == 3 and all(s == ImageSpace(4, 4) for s in b)
    assert b.contains(tuple(np.zeros((i + 1, 2, 3), np.uint8) for i in range(3)))
